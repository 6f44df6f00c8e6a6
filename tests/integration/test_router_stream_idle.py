"""A node that hangs mid-stream: the router gives it up after `stream_idle_timeout`, not after the
first-byte wait (first_byte_timeout for a static node, the much longer load_timeout for an agent),
and the client's stream ends with an SSE error event. In-process upstreams on 127.0.0.1, the router
in this process, the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from mvllm.common.state import AgentState, CatalogEntry, InstanceState
from mvllm.router.app import running_router
from mvllm.router.config import load_config
from tests.integration.router_support import client, router_for
from tests.support import node, wait_until_async, write_servers

MODEL = "hang-model"
IDLE = 0.5  # stream_idle_timeout of these tests
FIRST_CHUNK_DELAY = 1.2  # longer than IDLE: the first-byte wait must not be the idle timeout


def _chunk(text: str) -> bytes:
    doc = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
           "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


class HangingUpstream:
    """Streams: headers at once, the first chunk after FIRST_CHUNK_DELAY, one more, then nothing
    (the connection stays open) until released. As an agent it also serves /state."""

    def __init__(self, agent: bool = False) -> None:
        self.agent = agent
        self.release = asyncio.Event()
        self.requests = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/state", self._state)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=f'vllm:num_requests_running{{model_name="{MODEL}"}} 0.0\n')

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _state(self, request: web.Request) -> web.Response:
        st = AgentState(
            host="fake", engine="sim", time=time.time(), started_at=time.time(),
            instances=[InstanceState(MODEL, "ready", served_model_names=[MODEL], capacity=8)],
            catalog=[CatalogEntry(MODEL, f"org/{MODEL}", served_model_names=[MODEL], placement="awake", max_num_seqs=8)],
        )  # fmt: skip
        return web.json_response(st.to_dict())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIRST_CHUNK_DELAY)
        await resp.write(_chunk("one"))
        await asyncio.sleep(0.05)
        await resp.write(_chunk("two"))
        # Hung engine: nothing more, connection open (bounded: the test releases it at its end).
        try:
            await asyncio.wait_for(self.release.wait(), 20)
        except asyncio.TimeoutError:
            pass
        return resp


async def _stream_until_error(c: openai.AsyncOpenAI) -> tuple[list[str], float, str]:
    """The contents received, seconds from the last content to the error, and the error's text."""
    got: list[str] = []
    last = time.monotonic()
    stream = await c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    with pytest.raises(openai.APIError) as info:
        async for ev in stream:
            if ev.choices and ev.choices[0].delta.content:
                got.append(ev.choices[0].delta.content)
                last = time.monotonic()
    return got, time.monotonic() - last, str(info.value)


def _failures(metrics: str, node_name: str) -> list[str]:
    return [ln for ln in metrics.splitlines() if ln.startswith("mvllm_node_failures_total") and f'node="{node_name}"' in ln]


async def test_static_node_hung_mid_stream_is_given_up_after_stream_idle_timeout(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    up = HangingUpstream()
    server = await aiohttp_server(up.app())
    url = str(server.make_url("")).rstrip("/")
    try:
        # first_byte_timeout (10 s in FAST_ROUTER) bounds the wait for the first chunk only.
        async with router_for(tmp_path, [node(url, "hangs")], stream_idle_timeout=IDLE) as r:
            got, after_last, error = await _stream_until_error(client(r))
            assert got == ["one", "two"]  # the first chunk came 1.2 s late (> IDLE) and was waited for
            assert IDLE * 0.8 <= after_last < 5.0, after_last  # IDLE, not first_byte_timeout
            assert "hangs" in error and "mid-stream" in error
            metrics = r.state.metrics.render().decode()
            assert any('kind="broken"' in ln for ln in _failures(metrics, "hangs")), metrics
    finally:
        up.release.set()


async def test_agent_hung_mid_stream_is_given_up_after_stream_idle_not_load_timeout(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    up = HangingUpstream(agent=True)
    server = await aiohttp_server(up.app())
    url = str(server.make_url("")).rstrip("/")
    path = write_servers(tmp_path / "servers.toml", agents=[{"url": url, "name": "agent-a", "load_timeout": 60}],
                         stream_idle_timeout=IDLE)  # fmt: skip
    try:
        async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
            await wait_until_async(lambda: MODEL in r.state.registry.models(), 10, what="the agent's model is listed")
            got, after_last, error = await _stream_until_error(client(r))
            assert got == ["one", "two"]
            # Before: the agent's load_timeout (60 s here, 600 by default) between chunks too.
            assert IDLE * 0.8 <= after_last < 5.0, after_last
            assert "agent-a" in error and "mid-stream" in error
            assert up.requests == 1  # bytes reached the client: never retried
    finally:
        up.release.set()
