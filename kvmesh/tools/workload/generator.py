"""A built-in workload with the shape that makes KV-cache reuse matter, so a demo needs no file.

Conversations open on one of a few shared system prompts, then go turn by turn: every turn
re-sends the whole history plus a new user message, so each prompt extends the previous
one. Some turns call tools: the same prefix fans out into parallel branches (one per tool
call) that differ only in their last blocks, and the conversation continues from one of
them. Output is in the trace format (chained 512-token block ids), deterministic per seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import count

from kvmesh.tools.workload.trace import MOONCAKE_BLOCK_TOKENS, TraceRequest


@dataclass(frozen=True)
class WorkloadSpec:
    """Knobs of the generated workload (defaults: a short demo)."""

    conversations: int = 40
    system_prompts: int = 4
    system_prompt_blocks: int = 6
    max_turns: int = 5
    user_blocks: tuple[int, int] = (1, 3)
    output_tokens: tuple[int, int] = (32, 400)
    tool_use_probability: float = 0.3
    tool_branches: tuple[int, int] = (2, 3)
    conversation_rate_per_s: float = 0.5
    think_time_s: tuple[float, float] = (1.0, 8.0)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS
    seed: int = 0


def generate_workload(spec: WorkloadSpec = WorkloadSpec()) -> list[TraceRequest]:
    """The requests of `spec`, sorted by arrival time."""
    rng = random.Random(spec.seed)
    ids = count()
    systems = [[next(ids) for _ in range(spec.system_prompt_blocks)] for _ in range(spec.system_prompts)]
    out: list[TraceRequest] = []
    start_s = 0.0
    for _ in range(spec.conversations):
        start_s += rng.expovariate(spec.conversation_rate_per_s)
        history = list(rng.choice(systems))
        t = start_s
        for _turn in range(rng.randint(1, spec.max_turns)):
            history += [next(ids) for _ in range(rng.randint(*spec.user_blocks))]
            branches = 1
            if rng.random() < spec.tool_use_probability:
                branches = rng.randint(*spec.tool_branches)
            chosen: list[int] = history
            for b in range(branches):
                # A tool branch adds its own call/result block after the shared history.
                prompt = [*history, next(ids)] if branches > 1 else history
                out.append(_request(t, prompt, rng.randint(*spec.output_tokens), spec.block_tokens, rng))
                if b == 0:
                    chosen = prompt
            # The answer becomes part of the history the next turn re-sends.
            history = [*chosen, next(ids)]
            t += rng.uniform(*spec.think_time_s)
    out.sort(key=lambda r: r.timestamp_ms)
    return out


def _request(t_s: float, blocks: list[int], output: int, block_tokens: int, rng: random.Random) -> TraceRequest:
    # The last block is partial, as in Mooncake traces.
    input_length = (len(blocks) - 1) * block_tokens + rng.randint(1, block_tokens)
    return TraceRequest(round(t_s * 1000.0, 3), input_length, output, tuple(blocks))
