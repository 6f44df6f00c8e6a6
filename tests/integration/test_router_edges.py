"""Router edge cases against tiny in-process upstream apps on 127.0.0.1 (a node answering 400 or 500,
a malformed /metrics, header echo), driven by the openai client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.integration.router_support import client, node_state, router_for
from tests.support import node, wait_until_async

Handler = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]

GOOD_METRICS = (
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{{engine="0",model_name="{m}"}} 0.0\n'
    'vllm:num_requests_waiting{{engine="0",model_name="{m}"}} 0.0\n'
)


class FakeNode:
    """An upstream that speaks just enough of vLLM's API for one edge case, and records what it got."""

    def __init__(self, name: str, models: list[dict] | None = None, chat: Handler | None = None,
                 metrics: str | None = None, health_status: int = 200) -> None:
        self.name = name
        self.models = models if models is not None else [{"id": "fake-model", "object": "model", "parent": None}]
        self.chat = chat
        self.metrics = metrics if metrics is not None else GOOD_METRICS.format(m=self.models[0]["id"])
        self.health_status = health_status
        self.hits = 0
        self.seen_headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/version", self._version)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.models})

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.25.0", "node": self.name})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.seen_headers.append(dict(request.headers))
        body = await request.json()
        if self.chat is not None:
            return await self.chat(request, body)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hi from {self.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
            },
            headers={"X-Custom": "kept", "Connection": "keep-alive"},
        )


async def start(aiohttp_server: Any, fake: FakeNode) -> str:
    server = await aiohttp_server(fake.app())
    return str(server.make_url("")).rstrip("/")


MSG = [{"role": "user", "content": "hello"}]


async def test_400_from_node_is_returned_and_node_stays_healthy(tmp_path: Path, aiohttp_server: Any) -> None:
    async def bad(request: web.Request, body: dict) -> web.Response:
        return web.json_response(
            {"error": {"message": "max_tokens must be at least 1", "type": "BadRequestError", "code": 400}}, status=400
        )

    fake = FakeNode("strict", chat=bad)
    url = await start(aiohttp_server, fake)
    async with router_for(tmp_path, [node(url, "strict")], failure_threshold=1) as r:
        c = client(r)
        for _ in range(4):
            with pytest.raises(openai.BadRequestError) as info:
                await c.chat.completions.create(model="fake-model", messages=MSG, max_tokens=0)
            assert "max_tokens must be at least 1" in str(info.value)
            assert info.value.response.headers["x-mvllm-node"] == "strict"
        assert fake.hits == 4  # passed through once each, never retried
        st = node_state(r, "strict")
        assert st["breaker"] == "closed" and st["healthy"] is True
        metrics = r.state.metrics.render().decode()
        assert 'mvllm_node_failures_total{kind' not in metrics  # nothing was held against the node
        assert 'mvllm_requests_total{model="fake-model",node="strict",status="400"} 4.0' in metrics


async def test_headers_request_id_and_hop_by_hop(tmp_path: Path, aiohttp_server: Any) -> None:
    fake = FakeNode("echo")
    url = await start(aiohttp_server, fake)
    async with router_for(tmp_path, [node(url, "echo")]) as r, aiohttp.ClientSession() as s:
        payload = {"model": "fake-model", "messages": MSG}
        headers = {"X-Request-Id": "client-chosen-id", "Authorization": "Bearer sk-1",
                   "Connection": "keep-alive, X-Hop", "X-Hop": "secret"}
        async with s.post(r.url + "/v1/chat/completions", json=payload, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["x-request-id"] == "client-chosen-id"
            assert resp.headers["x-mvllm-node"] == "echo"
            assert resp.headers["X-Custom"] == "kept"
            assert (await resp.json())["choices"][0]["message"]["content"] == "hi from echo"
        got = {k.lower(): v for k, v in fake.seen_headers[-1].items()}
        assert got["x-request-id"] == "client-chosen-id"
        assert got["authorization"] == "Bearer sk-1"
        assert "x-hop" not in got
        async with s.post(r.url + "/v1/chat/completions", json=payload) as resp:
            rid = resp.headers["x-request-id"]
            assert len(rid) == 32 and int(rid, 16) >= 0
        assert {k.lower(): v for k, v in fake.seen_headers[-1].items()}["x-request-id"] == rid


async def test_router_rejections_are_openai_form(tmp_path: Path, aiohttp_server: Any) -> None:
    fake = FakeNode("n")
    url = await start(aiohttp_server, fake)
    async with router_for(tmp_path, [node(url, "n")], router={"max_body_bytes": 2048}) as r, aiohttp.ClientSession() as s:
        base = r.url

        async def check(resp: aiohttp.ClientResponse, status: int, words: str) -> None:
            assert resp.status == status
            err = (await resp.json())["error"]
            assert set(err) == {"message", "type", "code"} and words in err["message"]
            assert resp.headers["x-request-id"] and resp.headers["x-mvllm-node"] == "-"

        async with s.post(base + "/v1/chat/completions", json={"messages": MSG}) as resp:
            await check(resp, 400, "no 'model'")
        async with s.post(base + "/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"}) as resp:
            await check(resp, 400, "not valid JSON")
        async with s.post(base + "/v1/chat/completions", json={"model": "ghost", "messages": MSG}) as resp:
            await check(resp, 404, "`ghost` does not exist")
        async with s.post(base + "/sleep?level=1") as resp:  # engine control is never proxied
            await check(resp, 404, "POST /sleep is not served")
        async with s.post(base + "/v1/load_lora_adapter", json={"lora_name": "x"}) as resp:
            await check(resp, 404, "not served")
        async with s.post(base + "/health") as resp:
            await check(resp, 405, "Not Allowed")
        big = json.dumps({"model": "fake-model", "messages": MSG, "pad": "x" * 4000}).encode()
        async with s.post(base + "/v1/chat/completions", data=big, headers={"Content-Type": "application/json"}) as resp:
            await check(resp, 413, "2048 bytes")

        async def chunks() -> Any:  # no Content-Length: the limit is checked while reading
            for _ in range(10):
                yield b" " * 500

        async with s.post(base + "/v1/chat/completions", data=chunks(), headers={"Content-Type": "application/json"}) as resp:
            await check(resp, 413, "2048 bytes")
        with pytest.raises(openai.NotFoundError):
            await client(r).chat.completions.create(model="ghost", messages=MSG)
        assert fake.hits == 0  # nothing above reached the node


async def test_500_on_every_node_is_returned_as_is_and_blames_no_node(tmp_path: Path, aiohttp_server: Any) -> None:
    def boom(name: str) -> Handler:
        async def h(request: web.Request, body: dict) -> web.Response:
            return web.json_response({"error": {"message": f"engine crashed on this input ({name})",
                                                "type": "InternalServerError", "code": 500}}, status=500)
        return h

    fakes = [FakeNode("p", chat=boom("p")), FakeNode("q", chat=boom("q"))]
    urls = [await start(aiohttp_server, f) for f in fakes]
    async with router_for(tmp_path, [node(urls[0], "p"), node(urls[1], "q")], failure_threshold=1) as r:
        for _ in range(3):
            with pytest.raises(openai.InternalServerError) as info:
                await client(r).chat.completions.create(model="fake-model", messages=MSG)
            assert "engine crashed on this input" in str(info.value)
            assert info.value.response.headers["x-mvllm-node"] in ("p", "q")
        assert [f.hits for f in fakes] == [3, 3]  # each request tried both nodes once
        # The same 500 everywhere is the request's fault: neither node is ejected.
        assert node_state(r, "p")["breaker"] == node_state(r, "q")["breaker"] == "closed"


async def test_malformed_metrics_does_not_blind_the_router(tmp_path: Path, aiohttp_server: Any) -> None:
    garbage = 'vllm:num_requests_running{model_name="fake-model" 3\n\x00\x01 not prometheus\n{}{}\n'
    fake = FakeNode("weird", metrics=garbage)
    url = await start(aiohttp_server, fake)
    async with router_for(tmp_path, [node(url, "weird")]) as r:
        await wait_until_async(lambda: node_state(r, "weird")["scrape_error"], what="a scrape of the bad /metrics")
        assert "no vllm:num_requests" in node_state(r, "weird")["scrape_error"]
        out = await client(r).chat.completions.create(model="fake-model", messages=MSG)
        assert out.choices[0].message.content == "hi from weird"
        assert node_state(r, "weird")["healthy"] is True


async def test_no_healthy_node_is_503_with_retry_after(tmp_path: Path, aiohttp_server: Any) -> None:
    fake = FakeNode("sick", health_status=503)
    url = await start(aiohttp_server, fake)
    async with router_for(tmp_path, [node(url, "sick")], health_check_consecutive_failures=1) as r:
        await wait_until_async(lambda: node_state(r, "sick")["health"] == "down", what="node marked down")
        async with aiohttp.ClientSession() as s:
            async with s.post(r.url + "/v1/chat/completions", json={"model": "fake-model", "messages": MSG}) as resp:
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) >= 1
                assert "no healthy node" in (await resp.json())["error"]["message"]
            async with s.get(r.url + "/health") as resp:
                assert (await resp.json())["healthy_nodes"] == 0
        assert fake.hits == 0


async def test_models_merged_and_requests_without_model(tmp_path: Path, aiohttp_server: Any) -> None:
    a = FakeNode("a", models=[{"id": "base", "object": "model", "parent": None},
                              {"id": "sql-lora", "object": "model", "parent": "base"}])
    b = FakeNode("b", models=[{"id": "base", "object": "model", "parent": None},
                              {"id": "other", "object": "model", "parent": None}])
    urls = [await start(aiohttp_server, a), await start(aiohttp_server, b)]
    async with router_for(tmp_path, [node(urls[0], "a"), node(urls[1], "b")]) as r:
        c = client(r)
        listed = sorted(m.id for m in (await c.models.list()).data)
        assert listed == ["base", "other", "sql-lora"]
        lora = await c.models.retrieve("sql-lora")
        assert lora.id == "sql-lora"
        out = await c.chat.completions.create(model="sql-lora", messages=MSG)
        assert out.choices[0].message.content == "hi from a"  # only a has the adapter
        out = await c.chat.completions.create(model="other", messages=MSG)
        assert out.choices[0].message.content == "hi from b"
        async with aiohttp.ClientSession() as s:
            async with s.get(r.url + "/version") as resp:
                assert resp.status == 200 and (await resp.json())["node"] in ("a", "b")
            async with s.get(r.url + "/models") as resp:
                assert len((await resp.json())["data"]) == 3
