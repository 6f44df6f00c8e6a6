"""One cold load per model fleet-wide: two routers sharing a real redis-server, two real agents
(engine = "sim") with the same stopped model. Loads asked through both routers at once (each
naming its own agent) start one engine; the other router answers 409 load_in_progress naming the
holder, and once the load is over a load through that router works."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from tests.integration.agent_support import TOKEN, model
from tests.integration.test_router_agents import agents
from tests.redis_support import RedisServer
from tests.support import FAST_ROUTER

SLOW_LOAD = "sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 2.0 }"


@contextlib.asynccontextmanager
async def two_routers(tmp_path: Path, doc: dict[str, Any]) -> AsyncIterator[tuple[RunningRouter, RunningRouter]]:
    path = tmp_path / "servers.toml"
    path.write_text(tomli_w.dumps(doc))
    async with (
        running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r1,
        running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r2,
    ):
        yield r1, r2


async def _load(s: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with s.post(url, timeout=aiohttp.ClientTimeout(total=60)) as resp:
        return resp.status, await resp.json()


async def test_loads_through_two_routers_at_once_start_one_engine(tmp_path: Path, redis_server: RedisServer) -> None:
    catalog = model("m", sim=SLOW_LOAD)
    with agents(tmp_path, catalog, catalog) as (a, b):
        doc = {
            "agents": [
                {"url": a.url, "name": "a", "token": TOKEN, "load_timeout": 30},
                {"url": b.url, "name": "b", "token": TOKEN, "load_timeout": 30},
            ],
            "config": {**FAST_ROUTER, "scrape_timeout": 2.0},
            "cluster": {"redis_url": redis_server.url},
        }
        async with two_routers(tmp_path, doc) as (r1, r2), aiohttp.ClientSession() as s:
            first = asyncio.create_task(_load(s, r1.url + "/admin/models/m/load?node=a"))
            await asyncio.sleep(0.3)  # r1 holds the lock, its agent is starting the engine
            status, body = await _load(s, r2.url + "/admin/models/m/load?node=b")
            assert status == 409 and body["error"]["code"] == "load_in_progress", body
            assert "another router" in body["error"]["message"]
            status, _ = await first
            assert status == 200
            assert a.inst("m")["loads"] == 1 and b.inst("m")["loads"] == 0
            # The lock is released with the load's answer: a later load through r2 goes ahead.
            status, _ = await _load(s, r2.url + "/admin/models/m/load?node=b")
            assert status == 200 and b.inst("m")["loads"] == 1
