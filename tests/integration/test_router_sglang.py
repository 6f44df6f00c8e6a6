"""SGLang servers as static nodes (`engine = "sglang"`), routed through the real router.

The SGLang server is a stand-in: a small aiohttp app on 127.0.0.1 that speaks what the router
reads of SGLang (its /health, its /v1/models, the gauges `sglang:num_running_reqs` and
`sglang:num_queue_reqs` labelled as SGLang labels them) and answers chat completions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.integration.router_support import client, node_state, router_for
from tests.support import node, wait_until_async

MODEL = "qwen-sgl"
MSG = [{"role": "user", "content": "hello"}]


class FakeSGLang:
    """What the router sees of an SGLang server (`python -m sglang.launch_server --enable-metrics`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.running = 0
        self.queued = 0
        self.healthy = True
        self.hits = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        labels = f'engine_type="unified",model_name="{MODEL}",pp_rank="0",tp_rank="0"'
        text = (
            "# HELP sglang:num_running_reqs The number of running requests.\n"
            "# TYPE sglang:num_running_reqs gauge\n"
            f"sglang:num_running_reqs{{{labels}}} {float(self.running)}\n"
            "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n"
            "# TYPE sglang:num_queue_reqs gauge\n"
            f"sglang:num_queue_reqs{{{labels}}} {float(self.queued)}\n"
            "# HELP sglang:token_usage The token usage.\n"
            "# TYPE sglang:token_usage gauge\n"
            f"sglang:token_usage{{{labels}}} 0.1\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": MODEL, "object": "model", "created": int(time.time()), "owned_by": "sglang", "root": MODEL}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.json()
        return web.json_response(
            {
                "id": f"chatcmpl-{self.hits}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"from {self.name}"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }
        )


async def _nodes_of(c: Any, n: int) -> list[str]:
    out = []
    for _ in range(n):
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=4)
        assert raw.parse().choices[0].message.content.startswith("from ")
        out.append(raw.headers["x-mvllm-node"])
    return out


async def test_sglang_load_steers_routing_and_health_ejects(tmp_path: Path, aiohttp_server: Any) -> None:
    a, b, plain = FakeSGLang("sgl-a"), FakeSGLang("sgl-b"), FakeSGLang("as-vllm")
    urls = {}
    for fake in (a, b, plain):
        server = await aiohttp_server(fake.app())
        urls[fake.name] = str(server.make_url("")).rstrip("/")
    a.running, a.queued = 30, 10  # nearly full
    nodes = [
        node(urls["sgl-a"], "sgl-a", engine="sglang", max_concurrent_requests=32),
        node(urls["sgl-b"], "sgl-b", engine="sglang", max_concurrent_requests=32),
        # The same server declared as vLLM: its load cannot be read (and it takes no traffic).
        node(urls["as-vllm"], "as-vllm", drain=True),
    ]
    async with router_for(tmp_path, nodes) as r:
        await wait_until_async(lambda: node_state(r, "sgl-a")["running"] == 30, what="SGLang load scraped")
        st = node_state(r, "sgl-a")
        assert (st["running"], st["waiting"], st["scrape_error"]) == (30, 10, None)
        assert node_state(r, "sgl-b")["scrape_error"] is None
        assert "no vllm:num_requests_running" in (node_state(r, "as-vllm")["scrape_error"] or "")
        assert MODEL in r.state.registry.models()  # discovered from its /v1/models

        c = client(r)
        assert set(await _nodes_of(c, 8)) == {"sgl-b"}  # the loaded one is avoided

        a.running, a.queued = 0, 0
        b.running, b.queued = 31, 20
        await wait_until_async(lambda: node_state(r, "sgl-b")["waiting"] == 20, what="new load scraped")
        assert set(await _nodes_of(c, 8)) == {"sgl-a"}

        # /health decides health as for vLLM: a 503 takes the node out whatever its load.
        b.running, b.queued = 0, 0
        a.healthy = False
        await wait_until_async(lambda: node_state(r, "sgl-a")["health"] == "down", what="sgl-a down")
        assert set(await _nodes_of(c, 6)) == {"sgl-b"}
        await c.close()
