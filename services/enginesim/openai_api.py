"""The engine simulator's OpenAI-compatible HTTP face: what a gateway (Envoy, sglang-router) calls.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream: true` as
server-sent events), `GET /v1/models`, `/health`, `/server_info`; `/model_info` answers 404 as
engines without it do. A request runs through the same simulated engine as `EngineSim.Generate`
(its LRU prefix cache, the cache pool, the roofline timing model), so the uncached part of the
prompt is what costs prefill time. The answer's `usage.prompt_tokens_details.cached_tokens` and
the `x-kvmesh-*` headers say where the prompt was found, which is how benchmarks measure hit rates.

Prompts are cut into blocks the way the router cuts them (`kvmesh/openai_prompt.py` renders chat
messages; token ids in blocks of `--block-tokens`, text in blocks of `--text-block-bytes`, chained
hashes of the request's model and `--hash-namespace`), so the KV events the engine reports name
the blocks the router looks up. A trailing partial block gets its own id so that short prompts
still occupy the cache; one text block counts as `--block-tokens` tokens.

aiohttp serves it: it is already a dependency of the stack (in the constraints, and pulled by the
vLLM integration), speaks HTTP/1.1 keep-alive and chunked streaming correctly, and runs on the
engine's own event loop next to its gRPC server, where a hand-written asyncio HTTP parser would be
one more thing to get right.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import socket
import ssl
import time
import uuid
from array import array
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvmesh.blocks import BlockHasher, block_id
from kvmesh.openai_prompt import BadBody, PromptSpec, parse_body
from kvmesh.runtime.errors import KvmeshError
from kvmesh.v1 import enginesim_pb2, router_pb2

if TYPE_CHECKING:
    from kvmesh.services.enginesim.service import EngineSimService

log = logging.getLogger("kvmesh.enginesim.http")

DEFAULT_MAX_TOKENS = 16
_MAX_HASHERS = 8


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)


class OpenAIFace:
    """An aiohttp application over one `EngineSimService`."""

    def __init__(self, service: EngineSimService, ssl_context: ssl.SSLContext | None = None) -> None:
        self.service = service
        self.settings = service.settings
        self._ssl = ssl_context
        self._hashers: dict[str, BlockHasher] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        app = web.Application(client_max_size=self.settings.http_max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_server_info", self.server_info)
        self.app = app

    # ---- lifecycle
    async def start(self, listen: str) -> str:
        """Serves on `listen` (HOST:PORT, port 0 picks one); returns the bound HOST:PORT."""
        if self._runner is not None:
            return await self.address(listen)
        host, _, port = listen.rpartition(":")
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port), ssl_context=self._ssl)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])  # port 0's choice
        return await self.address(listen)

    async def address(self, listen: str) -> str:
        """The `ip:port` a gateway dials: --advertise's host, else the listen host (this host's name
        for a wildcard), resolved once at start-up, since Envoy's ORIGINAL_DST cluster takes IP
        literals only (a compose service name would not do)."""
        host = listen.rpartition(":")[0]
        if self.settings.advertise:
            host = self.settings.advertise.rpartition(":")[0]
        elif host in ("0.0.0.0", "::", "[::]", ""):
            host = socket.gethostname()
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=socket.AF_INET)
            host = str(infos[0][4][0])
        return f"{host}:{self.port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- prompts
    def hasher(self, model: str) -> BlockHasher:
        h = self._hashers.get(model)
        if h is None:
            if len(self._hashers) >= _MAX_HASHERS:
                self._hashers.clear()
            s = self.settings
            h = BlockHasher(namespace=s.hash_namespace, model=model, block_size=s.block_tokens,
                            text_block_bytes=s.text_block_bytes)
            self._hashers[model] = h
        return h

    def blocks_of(self, spec: PromptSpec) -> tuple[list[int], int]:
        """(block ids, input tokens) of a prompt: full blocks as the router hashes them, plus a tail."""
        hasher = self.hasher(spec.model)
        if spec.tokens is not None:
            keys = hasher.token_keys(spec.tokens)
            rest = array("I", spec.tokens[len(keys) * hasher.block_size:]).tobytes()
            tokens = len(spec.tokens)
        else:
            raw = (spec.text or "").encode("utf-8")
            keys = hasher.text_keys(spec.text or "")
            rest = raw[len(keys) * hasher.text_block_bytes:]
            step = hasher.text_block_bytes
            tokens = max(1, -(-len(raw) * self.settings.block_tokens // step))
        ids = [block_id(k) for k in keys]
        if rest or not ids:
            parent = keys[-1] if keys else b""
            ids.append(block_id(hashlib.blake2b(b"tail" + parent + rest, digest_size=16).digest()))
        return ids, max(tokens, 1)

    # ---- handlers
    async def _run(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            spec = parse_body(await request.read())
        except BadBody as exc:
            return _error(400, str(exc))
        model = self.settings.model
        if spec.model and spec.model != model:
            return _error(404, f"the model `{spec.model}` does not exist", "NotFoundError")
        if spec.text is None and spec.tokens is None:
            return _error(400, "messages are required" if chat else "prompt is required")
        blocks, input_tokens = self.blocks_of(spec)
        output = DEFAULT_MAX_TOKENS if spec.max_tokens is None else max(spec.max_tokens, 1)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        sim = enginesim_pb2.GenerateRequest(
            request_id=f"{request_id}-{uuid.uuid4().hex[:8]}",
            blocks=router_pb2.BlockIds(ids=blocks),
            input_tokens=input_tokens,
            output_tokens=output,
        )
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        first_token: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if spec.stream:
            self.service.first_tokens[sim.request_id] = first_token
        work = asyncio.ensure_future(self.service.generate(sim))
        response: web.StreamResponse | None = None
        try:
            if spec.stream:
                # The stream opens at the first token, as a real engine's does; the rest follows
                # when the simulated decode finishes.
                waiting: set[asyncio.Future[Any]] = {work, first_token}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if first_token.done():
                    response = await self._open_stream(request, chat, model, cid, created)
            done = await work
        except KvmeshError as exc:
            if response is not None:
                raise
            return _error(400 if exc.code.name == "INVALID_ARGUMENT" else 503, str(exc), "engine_error")
        finally:
            self.service.first_tokens.pop(sim.request_id, None)
            if not work.done():
                work.cancel()
        cached_tokens = min(input_tokens, (done.local_hit_blocks + done.pool_hit_blocks) * self.settings.block_tokens)
        usage = {
            "prompt_tokens": input_tokens,
            "completion_tokens": output,
            "total_tokens": input_tokens + output,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }
        info = {
            "member_id": done.member_id,
            "prompt_blocks": done.prompt_blocks,
            "local_hit_blocks": done.local_hit_blocks,
            "pool_hit_blocks": done.pool_hit_blocks,
            "queue_ms": round(done.queue_ms, 3),
            "ttft_ms": round(done.ttft_ms, 3),
            "e2e_ms": round(done.e2e_ms, 3),
        }
        headers = {
            "x-kvmesh-engine": self.service.member_id,
            "x-kvmesh-prompt-blocks": str(done.prompt_blocks),
            "x-kvmesh-hit-blocks": str(done.local_hit_blocks + done.pool_hit_blocks),
        }
        text = "".join(f" w{i % 1000}" for i in range(output))
        if not spec.stream:
            if chat:
                choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "length"}
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
            body = {"id": cid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": model, "choices": [choice], "usage": usage, "kvmesh": info}
            return web.json_response(body, headers=headers)
        if response is None:
            response = await self._open_stream(request, chat, model, cid, created)
        kind = "chat.completion.chunk" if chat else "text_completion"
        for i in range(output):
            piece = f" w{i % 1000}"
            delta: dict[str, Any] = (
                {"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                else {"index": 0, "text": piece, "finish_reason": None}
            )
            if i == output - 1:
                delta["finish_reason"] = "length"
            chunk: dict[str, Any] = {"id": cid, "object": kind, "created": created, "model": model,
                                     "choices": [delta]}
            if i == output - 1:
                chunk["usage"] = usage
                chunk["kvmesh"] = info
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _open_stream(
        self, request: web.Request, chat: bool, model: str, cid: str, created: int
    ) -> web.StreamResponse:
        """Sends the headers and a first, empty chunk (the assistant role, for chat)."""
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                               "x-kvmesh-engine": self.service.member_id})
        await response.prepare(request)
        delta: dict[str, Any] = (
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} if chat
            else {"index": 0, "text": "", "finish_reason": None}
        )
        chunk = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                 "model": model, "choices": [delta]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.settings.model, "object": "model", "created": 0, "owned_by": "kvmesh"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def server_info(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({
            "model_path": s.model, "served_model_name": s.model, "member_id": self.service.member_id,
            "block_tokens": s.block_tokens, "capacity_blocks": s.capacity_blocks,
            "text_block_bytes": s.text_block_bytes, "engine": "kvmesh-enginesim",
        })
