"""The router in front of real `mvllm sim` engines, driven by the openai client: every API family
through one endpoint, true streaming, disconnects, and the original mvllm config format."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from mvllm.router.app import running_router
from mvllm.router.config import load_config
from tests.integration.router_support import MODEL, client, engines, node_state, router_for
from tests.support import node, wait_until_async

MSG = [{"role": "user", "content": "Tell me about routers."}]


async def test_openai_api_through_the_router(tmp_path: Path) -> None:
    async with engines([], ["--served-model-name", "other-model"]) as (a, b):
        async with router_for(tmp_path, [node(a.url, "a"), node(b.url, "b")]) as r:
            c = client(r)
            assert sorted(m.id for m in (await c.models.list()).data) == ["other-model", MODEL]

            raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=8)
            assert raw.headers["x-mvllm-node"] == "a"
            assert raw.headers["x-request-id"]
            chat = raw.parse()
            assert chat.choices[0].message.content and chat.usage.completion_tokens == 8

            out = await c.chat.completions.create(model="other-model", messages=MSG, max_tokens=4)
            assert out.model == "other-model"

            stream = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, stream=True)
            pieces = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            assert len([p for p in pieces if p]) >= 6 and "".join(pieces)

            comp = await c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
            assert comp.choices[0].text

            emb = await c.embeddings.create(model=MODEL, input=["one", "two"])
            assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0

            async with aiohttp.ClientSession() as s:
                async with s.post(r.url + "/tokenize", json={"model": MODEL, "prompt": "hello world"}) as resp:
                    assert resp.status == 200 and (await resp.json())["tokens"]
                async with s.post(r.url + "/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["a", "b"]}) as resp:
                    assert resp.status == 200 and len((await resp.json())["results"]) == 2
                async with s.get(r.url + "/version") as resp:
                    assert resp.status == 200 and resp.headers["x-mvllm-node"] in ("a", "b")
                async with s.get(r.url + "/metrics") as resp:
                    text = await resp.text()
                    assert 'mvllm_requests_total{model="sim-model",node="a",status="200"}' in text
                    assert "mvllm_time_to_first_byte_seconds_bucket" in text
                    assert 'mvllm_node_breaker_state{node="a"} 0.0' in text
                async with s.get(r.url + "/health") as resp:
                    assert (await resp.json())["healthy_nodes"] == 2


async def test_lora_adapter_routes_to_the_node_that_loaded_it(tmp_path: Path) -> None:
    lora_env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    async with engines(["--enable-lora"], ["--enable-lora"], env=lora_env) as (a, b):
        async with router_for(tmp_path, [node(a.url, "a"), node(b.url, "b")]) as r, aiohttp.ClientSession() as s:
            body = {"lora_name": "sql-lora", "lora_path": "/adapters/sql"}
            async with s.post(a.url + "/v1/load_lora_adapter", json=body) as resp:  # on a only, behind the router
                assert resp.status == 200
            await wait_until_async(lambda: r.state.registry.nodes_for("sql-lora"), timeout=10, what="adapter discovered")
            c = client(r)
            cards = {m.id: m for m in (await c.models.list()).data}
            assert cards["sql-lora"].parent == MODEL  # type: ignore[attr-defined]
            for _ in range(6):
                raw = await c.chat.completions.with_raw_response.create(model="sql-lora", messages=MSG, max_tokens=2)
                assert raw.headers["x-mvllm-node"] == "a"
                assert raw.parse().model == "sql-lora"


async def test_streaming_is_relayed_as_generated(tmp_path: Path) -> None:
    # 30 tokens at 60 ms: the engine needs ~1.8 s; the first chunk must not wait for the last.
    async with engines(["--sim-itl-ms", "60"]) as (a,):
        async with router_for(tmp_path, [node(a.url, "a")]) as r:
            t0 = time.monotonic()
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=30, stream=True)
            arrivals = [time.monotonic() - t0 async for ch in stream if ch.choices and ch.choices[0].delta.content]
            assert len(arrivals) >= 20
            first, last = arrivals[0], arrivals[-1]
            assert last > 1.2  # generated over time ...
            assert first < last / 3  # ... and relayed as it came, not buffered to the end
            # chunks keep arriving during generation, not in one final burst
            assert sum(1 for t in arrivals if t < first + (last - first) / 2) >= 5


async def test_client_disconnect_cancels_upstream(tmp_path: Path) -> None:
    async with engines(["--sim-itl-ms", "50"]) as (a,):
        async with router_for(tmp_path, [node(a.url, "a")]) as r, aiohttp.ClientSession() as s:
            async def engine_running() -> float:
                async with s.get(a.url + "/metrics") as resp:
                    text = await resp.text()
                return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith("vllm:num_requests_running{"))

            async def engine_idle() -> bool:
                return await engine_running() == 0

            # A stream the client closes after three chunks.
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=400, stream=True)
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:
                    break
            assert await engine_running() == 1  # 400 tokens at 50 ms: 20 s left to generate
            await stream.close()
            # The router closes its upstream connection and the engine aborts the request.
            await wait_until_async(engine_idle, timeout=5, what="engine aborted the stream")
            await wait_until_async(lambda: node_state(r, "a")["in_flight"] == 0, timeout=5, what="router in-flight back to 0")

            # A non-streamed request whose client gives up while the engine is still generating:
            # nothing was written to that client yet, so only cancelling the handler can notice.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(
                    client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=400), timeout=0.5
                )
            await wait_until_async(engine_idle, timeout=5, what="engine aborted the non-streamed request")


async def test_seed_format_config_routes(tmp_path: Path) -> None:
    async with engines([], []) as (a, b):
        path = tmp_path / "servers.toml"
        path.write_text(
            "[servers]\n"
            "servers = [\n"
            f'    {{ url = "{a.url}", max_concurrent_requests = 3 }},\n'
            f'    {{ url = "{b.url}", max_concurrent_requests = 5 }},\n'
            "]\n\n"
            "[config]\n"
            "health_check_interval = 10\n"
            "request_timeout = 120\n"
            "max_retries = 3\n"
        )
        config = load_config(path)
        async with running_router(config, host="127.0.0.1", port=0, config_path=path, watch=False) as r:
            seen = set()
            for _ in range(12):
                raw = await client(r).chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
                seen.add(raw.headers["x-mvllm-node"])
            assert seen <= {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"} and seen
            assert node_state(r, f"127.0.0.1:{b.port}")["capacity"] == 5
