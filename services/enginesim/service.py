"""`kvmesh enginesim` as a kvmesh `Service`: a simulated inference pod that joins the mesh.

It registers as ROLE_ENGINE (reporting running/waiting requests and KV usage with every
heartbeat), serves `EngineSim.Generate`, looks each prompt up in its own prefix cache, fetches
the missing prefix from the cache pool, offloads the blocks it computed, and streams its KV
events to the router so the router's tree mirrors what the engine really holds.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc

from kvmesh.blocks import BlockHasher
from kvmesh.membership import MemberSession, MembershipWatcher
from kvmesh.runtime.errors import InvalidArgument, KvmeshError
from kvmesh.runtime.server import Service
from kvmesh.services.enginesim.engine import BatchingEngine, EngineEvent, EventKind, SimRequest, offloaded_blocks
from kvmesh.services.enginesim.enginesim_api import EngineSimApi
from kvmesh.services.enginesim.events import EventReporter
from kvmesh.services.enginesim.pool import BlockPool, BlockStore
from kvmesh.services.enginesim.runner import EngineRunner
from kvmesh.services.enginesim.settings import EngineSimSettings
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import common_pb2, enginesim_pb2, enginesim_pb2_grpc

if TYPE_CHECKING:
    from kvmesh.services.enginesim.openai_api import OpenAIFace

log = logging.getLogger("kvmesh.enginesim")

MAX_PROMPT_BLOCKS = 1_000_000
MAX_OUTPUT_TOKENS = 1_000_000


class DeadlineExceeded(KvmeshError):
    """The simulated request did not finish within --request-timeout-seconds."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


StoreFactory = Callable[[EngineSimSettings], Awaitable[tuple[BlockStore, Callable[[], Awaitable[None]]]]]


async def open_cache_client(settings: EngineSimSettings) -> tuple[BlockStore, Callable[[], Awaitable[None]]]:
    """The client library, following the cache nodes registered with the metadata service."""
    from kvmesh.services.enginesim.pool_client import connect_pool

    return await connect_pool(settings)


class EngineSimService(Service):
    """One simulated engine pod."""

    name = "enginesim"
    service_names = (enginesim_pb2.DESCRIPTOR.services_by_name["EngineSim"].full_name,)

    def __init__(self, settings: EngineSimSettings, store_factory: StoreFactory | None = None) -> None:
        self.settings = settings
        self.member_id = settings.member_id or f"engine-{uuid.uuid4().hex[:12]}"
        self.timing = settings.timing()
        self.engine = BatchingEngine(self.timing, settings.capacity_blocks, settings.block_tokens)
        self.runner = EngineRunner(self.engine, settings.speedup, self._on_event)
        # Pool keys of a block id live in the pool's namespace; token prompts are cut into block
        # ids exactly as the router cuts them (for requests routed with model=--model).
        self.hasher = BlockHasher(model=settings.model, namespace=settings.namespace,
                                  block_size=settings.block_tokens)
        self.prompt_hasher = BlockHasher(model=settings.model, namespace=settings.hash_namespace,
                                         block_size=settings.block_tokens)
        self.reporter = EventReporter(self.member_id, self._router_addresses, self.engine.cache.chains)
        self._store_factory = store_factory or (open_cache_client if settings.pool else None)
        self.pool: BlockPool | None = None
        self._close_store: Callable[[], Awaitable[None]] | None = None
        self.session: MemberSession | None = None
        self.router_watcher: MembershipWatcher | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.completed = 0
        # request id → future resolved at the request's first token (streaming HTTP answers).
        self.first_tokens: dict[str, asyncio.Future[None]] = {}
        self.http: OpenAIFace | None = None
        if settings.http_listen:
            from kvmesh.services.enginesim.openai_api import OpenAIFace  # only with the flag: imports aiohttp

            self.http = OpenAIFace(self)

    # ---- lifecycle
    def register(self, server: grpc.aio.Server) -> None:
        enginesim_pb2_grpc.add_EngineSimServicer_to_server(EngineSimApi(self), server)

    async def start(self, address: str) -> None:
        if self.session is not None:
            return
        await self.runner.start()
        if self._store_factory is not None:
            store, self._close_store = await self._store_factory(self.settings)
            self.pool = BlockPool(store, self.hasher, self.settings.block_bytes)
        if not self.settings.router:
            self.router_watcher = MembershipWatcher(
                self.settings.metadata_addresses, common_pb2.ROLE_ROUTER, lambda _change: self.reporter.sync_routers()
            )
            await self.router_watcher.start()
        self.reporter.sync_routers()
        labels = {"capacity_blocks": str(self.settings.capacity_blocks), "speedup": f"{self.settings.speedup:g}"}
        if self.http is not None and self.settings.http_listen:
            labels["openai-address"] = await self.http.start(self.settings.http_listen)
        member = common_pb2.Member(
            id=self.member_id,
            role=common_pb2.ROLE_ENGINE,
            address=address,
            model=self.settings.model,
            zone=self.settings.zone,
            capacity_bytes=self.settings.capacity_blocks * self.settings.block_tokens * self.timing.kv_bytes_per_token,
            labels=labels,
        )
        self.session = MemberSession(self.settings.metadata_addresses, member, self.settings.ttl_seconds, self.load)
        await self.session.start()

    async def drain(self) -> None:
        if self.session is not None:
            await self.session.close(deregister=True)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close(deregister=False)
        if self.http is not None:
            await self.http.close()
        if self.router_watcher is not None:
            await self.router_watcher.close()
        await self.runner.close()
        await cancel_and_wait(*self._background)
        await self.reporter.close()
        if self._close_store is not None:
            await self._close_store()
            self._close_store = None

    def load(self) -> common_pb2.Load:
        used = self.engine.cache.used
        block_kv = self.settings.block_tokens * self.timing.kv_bytes_per_token
        return common_pb2.Load(
            running_requests=self.engine.running,
            waiting_requests=self.engine.queued,
            kv_usage=self.engine.kv_usage,
            used_bytes=used * block_kv,
            capacity_bytes=self.settings.capacity_blocks * block_kv,
        )

    def _router_addresses(self) -> list[str]:
        if self.settings.router:
            return [a.strip() for a in self.settings.router.split(",") if a.strip()]
        if self.router_watcher is None:
            return []
        return [m.address for m in self.router_watcher.members.values() if m.address]

    # ---- requests
    def _prompt(self, request: enginesim_pb2.GenerateRequest) -> tuple[list[int], int]:
        which = request.WhichOneof("prompt")
        if which == "blocks":
            blocks = list(request.blocks.ids)
            if not blocks:
                raise InvalidArgument("empty prompt: no block ids")
            if len(blocks) > MAX_PROMPT_BLOCKS:
                raise InvalidArgument(f"prompt of {len(blocks)} blocks is over {MAX_PROMPT_BLOCKS}")
            max_tokens = len(blocks) * self.settings.block_tokens
            tokens = request.input_tokens or max_tokens
            if tokens > max_tokens or tokens <= (len(blocks) - 1) * self.settings.block_tokens:
                raise InvalidArgument(
                    f"input_tokens={tokens} does not fit {len(blocks)} blocks of {self.settings.block_tokens} tokens"
                )
            return blocks, tokens
        if which == "tokens":
            ids = list(request.tokens.ids)
            if not ids:
                raise InvalidArgument("empty prompt: no tokens")
            if len(ids) > MAX_PROMPT_BLOCKS * self.settings.block_tokens:
                raise InvalidArgument("prompt too long")
            try:
                blocks = self.prompt_hasher.token_block_ids(ids)
            except ValueError as exc:
                raise InvalidArgument(f"bad token ids: {exc}") from None
            return blocks, len(ids)
        raise InvalidArgument("prompt missing: give blocks or tokens")

    async def generate(self, request: enginesim_pb2.GenerateRequest) -> enginesim_pb2.GenerateResponse:
        blocks, input_tokens = self._prompt(request)
        output_tokens = request.output_tokens or 1
        if output_tokens > MAX_OUTPUT_TOKENS:
            raise InvalidArgument(f"output_tokens over {MAX_OUTPUT_TOKENS}")
        request_id = request.request_id or uuid.uuid4().hex
        local, pooled = await self._find_cached(blocks)
        sim = SimRequest(request_id, blocks, input_tokens, output_tokens, 0.0)
        try:
            future = self.runner.submit(sim, local, pooled)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            async with asyncio.timeout(self.settings.request_timeout_seconds):
                done = await future
        except TimeoutError:
            self.runner.forget(request_id)
            raise DeadlineExceeded(f"request {request_id} did not finish in time") from None
        except BaseException:
            self.runner.forget(request_id)
            raise
        self.completed += 1
        return enginesim_pb2.GenerateResponse(
            request_id=request_id,
            member_id=self.member_id,
            prompt_blocks=len(blocks),
            local_hit_blocks=done.local_hit_blocks,
            pool_hit_blocks=done.pool_hit_blocks,
            computed_blocks=done.computed_blocks,
            queue_ms=done.queue_ms,
            ttft_ms=done.ttft_ms,
            e2e_ms=done.e2e_ms,
        )

    async def _find_cached(self, blocks: list[int]) -> tuple[int, int]:
        """(local hits, pool hits): the prompt's prefix in GPU memory, then what the pool adds."""
        local = self.engine.lookup(blocks)
        if self.pool is None or local >= len(blocks):
            return local, 0
        try:
            fetched = await self.pool.fetch_prefix(blocks[local:])
        except Exception:
            log.warning("cache pool fetch failed; computing instead", exc_info=True)
            fetched = 0
        # The local cache may have changed while the pool answered.
        now_local = self.engine.lookup(blocks)
        covered = local + fetched
        if now_local >= covered or now_local < local:
            return now_local, 0
        return now_local, covered - now_local

    def _on_event(self, event: EngineEvent) -> None:
        if event.kind is EventKind.FIRST_TOKEN and event.request is not None:
            waiter = self.first_tokens.pop(event.request.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if event.kind is EventKind.STORED:
            self.reporter.stored(event.blocks)
        elif event.kind is EventKind.REMOVED:
            self.reporter.removed(event.blocks)
        elif event.kind is EventKind.FIRST_TOKEN and self.pool is not None and event.request is not None:
            r = event.request
            blocks = offloaded_blocks(r)
            if blocks:
                task = asyncio.create_task(self._offload(blocks), name=f"offload-{r.request_id}")
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _offload(self, blocks: list[int]) -> None:
        assert self.pool is not None
        try:
            await self.pool.offload(blocks)
        except Exception:
            log.warning("cache pool offload failed", exc_info=True)
