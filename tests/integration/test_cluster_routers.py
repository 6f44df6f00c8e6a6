"""Two real routers (subprocesses) sharing one real redis-server act as one: a key's rate and
concurrency limits hold across both, a key disabled or a node drained on one applies on the other
within 2 s, a router SIGKILLed frees its slots, Redis down keeps them serving (per-router limits,
or 503 with on_redis_down = "reject") and Redis back makes the limits exact again."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.cluster_support import cluster_config, load_stats, post, routers
from tests.integration.router_support import node, wait_until
from tests.integration.security_support import ADMIN_KEY, MSG, USER_KEY, in_process_sims, key_entry, quick_sim
from tests.redis_support import RedisServer

CHAT = "/v1/chat/completions"


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": MSG, "max_tokens": 2, **extra}


async def test_a_5_rps_key_gets_5_or_6_of_20_requests_spread_over_two_routers(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("slow", USER_KEY, limits={"requests_per_second": 5})]
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            start = time.monotonic()
            results = await asyncio.gather(*(post(s, (r1, r2)[i % 2].url + CHAT, USER_KEY, body()) for i in range(20)))
            took = time.monotonic() - start
            ok = [st for st, _ in results if st == 200]
            limited = [data for st, data in results if st == 429]
            assert took < 1.0, took
            assert 5 <= len(ok) <= 6, [st for st, _ in results]
            assert len(ok) + len(limited) == 20
            assert all(d["error"]["code"] == "rate_limit_exceeded" for d in limited)
            assert all("'requests_per_second' of key 'slow'" in d["error"]["message"] for d in limited)


async def _open_stream(s: aiohttp.ClientSession, url: str, key: str, opened: list[aiohttp.ClientResponse]) -> int:
    """Start a stream and keep it open (in `opened`) when admitted; the status either way."""
    resp = await s.post(url + CHAT, json=body(max_tokens=2000, stream=True), headers={"Authorization": f"Bearer {key}"})
    if resp.status == 200:
        await resp.content.readline()  # the first chunk: the request is admitted and running
        opened.append(resp)
    else:
        await resp.read()
        resp.release()
    return resp.status


async def test_a_concurrency_2_key_admits_exactly_2_streams_across_both_routers(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("two", USER_KEY, limits={"max_concurrent": 2})]
    async with in_process_sims(quick_sim(itl_ms=20.0)) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            opened: list[aiohttp.ClientResponse] = []
            statuses = await asyncio.gather(*(_open_stream(s, (r1, r2)[i % 2].url, USER_KEY, opened) for i in range(6)))
            try:
                assert sorted(statuses) == [200, 200, 429, 429, 429, 429]
            finally:
                for resp in opened:
                    resp.close()
            # Closed streams give their slots back, on both routers.
            async def two_again() -> bool:
                more: list[aiohttp.ClientResponse] = []
                got = [await _open_stream(s, r.url, USER_KEY, more) for r in (r1, r2)]
                for resp in more:
                    resp.close()
                return got == [200, 200]

            await wait_until(two_again, timeout=10, interval=0.3, what="both slots free again")


async def _admin(s: aiohttp.ClientSession, url: str) -> int:
    async with s.post(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
        await resp.read()
        return resp.status


async def test_a_key_disabled_or_a_node_drained_on_one_router_applies_on_the_other_within_2_s(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("user", USER_KEY)]
    async with in_process_sims(quick_sim(), quick_sim()) as (sa, sb):
        path = cluster_config(tmp_path, [node(sa.url, "a"), node(sb.url, "b")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            assert (await post(s, r2.url + CHAT, USER_KEY, body()))[0] == 200
            assert await _admin(s, r1.url + "/admin/keys/user/disable") == 200
            t0 = time.monotonic()
            await wait_until(lambda: _status(s, r2.url, USER_KEY), timeout=2.0, interval=0.05, what="key disabled on r2")
            disabled_after = time.monotonic() - t0
            assert await _admin(s, r2.url + "/admin/keys/user/enable") == 200
            await wait_until(lambda: _status(s, r1.url, USER_KEY, want=200), timeout=2.0, interval=0.05, what="key enabled on r1")

            assert await _admin(s, r1.url + "/admin/nodes/a/drain") == 200
            await wait_until(lambda: _draining(s, r2.url, "a"), timeout=2.0, interval=0.05, what="node a drained on r2")
            # Drained on r2: its requests all go to b.
            nodes = set()
            for _ in range(6):
                async with s.post(r2.url + CHAT, json=body(), headers={"Authorization": f"Bearer {USER_KEY}"}) as resp:
                    assert resp.status == 200
                    nodes.add(resp.headers["x-mvllm-node"])
            assert nodes == {"b"}
            assert await _admin(s, r2.url + "/admin/nodes/a/undrain") == 200
            await wait_until(lambda: _draining(s, r1.url, "a", want=False), timeout=2.0, interval=0.05, what="undrained on r1")
            assert disabled_after < 2.0


async def _status(s: aiohttp.ClientSession, url: str, key: str, want: int = 401) -> bool:
    status, _ = await post(s, url + CHAT, key, body())
    return status == want


async def _draining(s: aiohttp.ClientSession, url: str, name: str, want: bool = True) -> bool:
    doc = await load_stats(s, url)
    return any(n["name"] == name and n["draining"] is want for n in doc["nodes"])
