"""The routing-relevant part of an OpenAI request body: model, and the prompt as text or token ids.

A gateway forwards `/v1/completions` (`prompt`: a string, a list of token ids, or a list of one of
those) and `/v1/chat/completions` (`messages`). Chat messages are rendered to one text in a fixed
way (`role: content` lines, text parts of a content list joined in order), so the same
conversation always gives the same blocks and a longer conversation extends the blocks of its
earlier turns. The rendering only has to be deterministic and prefix-preserving: the router
compares prompts with each other, never with the engine's own chat template. The router's
endpoint picker and the engine simulator's OpenAI face both read bodies here, so they cut a
conversation into the same blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_TOKEN_ID = (1 << 32) - 1


class BadBody(ValueError):
    """The body is not an OpenAI request the router can read (answered with HTTP 400)."""


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """What routing needs from one request."""

    model: str
    text: str | None = None
    tokens: list[int] | None = None
    stream: bool = False
    max_tokens: int | None = None


def render_messages(messages: list[Any]) -> str:
    """Chat messages as one text: `role: content` per message, each ending with a newline."""
    lines: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadBody(f"messages[{i}] is not an object")
        role = message.get("role", "")
        if not isinstance(role, str):
            raise BadBody(f"messages[{i}].role is not a string")
        content = message.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts: list[str] = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    parts.append(part)
                elif isinstance(part, dict):
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise BadBody(f"messages[{i}].content[{j}].text is not a string")
                    parts.append(text)
                else:
                    raise BadBody(f"messages[{i}].content[{j}] is not a string or an object")
            content = "".join(parts)
        elif not isinstance(content, str):
            raise BadBody(f"messages[{i}].content is not a string or a list")
        lines.append(f"{role}: {content}\n")
    return "".join(lines)


def _token_ids(values: list[Any], where: str) -> list[int]:
    for v in values:
        if type(v) is not int or not 0 <= v <= MAX_TOKEN_ID:
            raise BadBody(f"{where} holds {v!r}: token ids are integers in [0, 2^32)")
    return values


def _prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list):
        if not prompt:
            return "", None
        first = prompt[0]
        if isinstance(first, str):  # a batch of prompts: the first one decides
            return first, None
        if isinstance(first, list):
            return None, _token_ids(first, "prompt[0]")
        return None, _token_ids(prompt, "prompt")
    raise BadBody("prompt must be a string, a list of token ids, or a list of those")


def parse_body(body: bytes) -> PromptSpec:
    """Reads an OpenAI completions or chat body; raises `BadBody` on anything else."""
    if not body:
        return PromptSpec(model="")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadBody(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadBody("body must be a JSON object")
    model = doc.get("model", "")
    if not isinstance(model, str):
        raise BadBody("model must be a string")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise BadBody("stream must be true or false")
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
        raise BadBody("max_tokens must be a non-negative integer")
    if "messages" in doc:
        messages = doc["messages"]
        if not isinstance(messages, list):
            raise BadBody("messages must be a list")
        return PromptSpec(model, text=render_messages(messages), stream=stream, max_tokens=max_tokens)
    if "prompt" in doc:
        text, tokens = _prompt(doc["prompt"])
        return PromptSpec(model, text=text, tokens=tokens, stream=stream, max_tokens=max_tokens)
    return PromptSpec(model, stream=stream, max_tokens=max_tokens)
