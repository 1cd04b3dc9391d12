"""The engine simulator's OpenAI face, in process: real prefix-cache hits, streaming, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from kvmesh.blocks import BlockHasher, block_id
from kvmesh.openai_prompt import PromptSpec
from kvmesh.services.enginesim.service import EngineSimService
from kvmesh.services.enginesim.settings import EngineSimSettings

MODEL = "m"


@pytest.fixture
async def face() -> AsyncIterator[tuple[EngineSimService, str, aiohttp.ClientSession]]:
    settings = EngineSimSettings(metadata="127.0.0.1:1", http_listen="127.0.0.1:0", pool=False, block_tokens=16,
                                 speedup=1000, model=MODEL, capacity_blocks=8)
    service = EngineSimService(settings)
    await service.runner.start()
    assert service.http is not None
    address = await service.http.start("127.0.0.1:0")
    try:
        async with aiohttp.ClientSession() as http:
            yield service, f"http://{address}", http
    finally:
        await service.http.close()
        await service.runner.close()


async def test_repeated_prompt_hits_the_prefix_cache_and_eviction_is_lru(face) -> None:
    _, url, http = face
    prompt = "the same long prefix " * 12  # 252 bytes: 3 full text blocks and a tail
    usages = []
    for _ in range(2):
        async with http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
            assert r.status == 200
            doc = await r.json()
            usages.append(doc["usage"])
            assert int(r.headers["x-kvmesh-prompt-blocks"]) == 4
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] == usages[1]["prompt_tokens"]
    # Two other 4-block prompts fill the 8-block cache: the first prompt's blocks are evicted (LRU).
    for other in ("another prompt entirely ", "and a third one, longer "):
        async with http.post(f"{url}/v1/completions", json={"prompt": other * 11, "max_tokens": 1}) as r:
            assert r.status == 200
    async with http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_text_blocks_are_the_routers_blocks(face) -> None:
    """The engine's KV events name the blocks the router hashes for the same text."""
    service, _, _ = face
    text = "x" * 200
    assert service.http is not None
    ids, tokens = service.http.blocks_of(PromptSpec(MODEL, text=text))
    router_ids = [block_id(k) for k in BlockHasher(model=MODEL).text_keys(text)]
    assert ids[:3] == router_ids and len(ids) == 4
    assert tokens == -(-200 * 16 // 64)


async def test_chat_streaming_and_routes(face) -> None:
    _, url, http = face
    body = {"model": MODEL, "stream": True, "max_tokens": 3,
            "messages": [{"role": "user", "content": "hello there " * 10}]}
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in (await r.text()).splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " w0 w1 w2"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3
    async with http.get(f"{url}/v1/models") as r:
        assert (await r.json())["data"][0]["id"] == MODEL
    for path, status in (("/health", 200), ("/server_info", 200), ("/model_info", 404)):
        async with http.get(url + path) as r:
            assert r.status == status, path


@pytest.mark.parametrize(("path", "raw", "status"), [
    ("/v1/completions", b"{oops", 400),
    ("/v1/completions", b'{"model": "m"}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400),
    ("/v1/completions", b'{"model": "other", "prompt": "x"}', 404),
])
async def test_bad_requests_get_openai_errors(face, path: str, raw: bytes, status: int) -> None:
    _, url, http = face
    async with http.post(url + path, data=raw, headers={"content-type": "application/json"}) as r:
        assert r.status == status
        assert (await r.json())["error"]["message"]
