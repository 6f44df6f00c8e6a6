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
from tests.integration.security_support import ADMIN_KEY, MSG, USER_KEY, in_process_sims, key_entry, quick_sim
from tests.redis_support import RedisServer
from tests.support import node, wait_until_async

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

            await wait_until_async(two_again, timeout=10, interval=0.3, what="both slots free again")


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
            await wait_until_async(lambda: _status(s, r2.url, USER_KEY), timeout=2.0, interval=0.05, what="key disabled on r2")
            disabled_after = time.monotonic() - t0
            assert await _admin(s, r2.url + "/admin/keys/user/enable") == 200
            await wait_until_async(lambda: _status(s, r1.url, USER_KEY, want=200), timeout=2.0, interval=0.05, what="key enabled on r1")

            assert await _admin(s, r1.url + "/admin/nodes/a/drain") == 200
            await wait_until_async(lambda: _draining(s, r2.url, "a"), timeout=2.0, interval=0.05, what="node a drained on r2")
            # Drained on r2: its requests all go to b.
            nodes = set()
            for _ in range(6):
                async with s.post(r2.url + CHAT, json=body(), headers={"Authorization": f"Bearer {USER_KEY}"}) as resp:
                    assert resp.status == 200
                    nodes.add(resp.headers["x-mvllm-node"])
            assert nodes == {"b"}
            assert await _admin(s, r2.url + "/admin/nodes/a/undrain") == 200
            await wait_until_async(lambda: _draining(s, r1.url, "a", want=False), timeout=2.0, interval=0.05, what="undrained on r1")
            assert disabled_after < 2.0


async def _status(s: aiohttp.ClientSession, url: str, key: str, want: int = 401) -> bool:
    status, _ = await post(s, url + CHAT, key, body())
    return status == want


async def _draining(s: aiohttp.ClientSession, url: str, name: str, want: bool = True) -> bool:
    doc = await load_stats(s, url)
    return any(n["name"] == name and n["draining"] is want for n in doc["nodes"])


async def _load(s: aiohttp.ClientSession, url: str, key: str, stop: asyncio.Event, statuses: list[int]) -> None:
    """Requests one after another until `stop`, every status recorded (an exception counts as 0)."""
    while not stop.is_set():
        try:
            statuses.append((await post(s, url + CHAT, key, body()))[0])
        except (aiohttp.ClientError, asyncio.TimeoutError):
            statuses.append(0)


async def test_sigkill_of_one_router_fails_none_of_the_others_clients_and_frees_its_slots_within_10_s(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = [
        key_entry("admin", ADMIN_KEY, role="admin"),
        key_entry("two", USER_KEY, limits={"max_concurrent": 2}),
        key_entry("free", "sk-test-free-0123456789abcdef"),
    ]
    async with in_process_sims(quick_sim(itl_ms=20.0)) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            held: list[aiohttp.ClientResponse] = []
            assert [await _open_stream(s, r1.url, USER_KEY, held) for _ in range(2)] == [200, 200]
            assert await _open_stream(s, r2.url, USER_KEY, held) == 429  # both slots are r1's
            stop = asyncio.Event()
            statuses: list[int] = []
            loaders = [asyncio.create_task(_load(s, r2.url, "sk-test-free-0123456789abcdef", stop, statuses)) for _ in range(4)]
            await asyncio.sleep(0.5)
            r1.proc.kill()  # SIGKILL: no release of its leases
            killed_at = time.monotonic()
            for resp in held:
                resp.close()

            async def slot_free() -> bool:
                more: list[aiohttp.ClientResponse] = []
                got = await _open_stream(s, r2.url, USER_KEY, more)
                for resp in more:
                    resp.close()
                return got == 200

            await wait_until_async(slot_free, timeout=10, interval=0.25, what="the dead router's slots free")
            freed_after = time.monotonic() - killed_at
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*loaders)
            assert statuses and all(st == 200 for st in statuses), sorted(set(statuses))
            assert r2.alive()
            assert freed_after < 10.0


async def test_redis_killed_under_load_routers_keep_serving_and_limits_are_exact_again_once_it_is_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = [
        key_entry("admin", ADMIN_KEY, role="admin"),
        key_entry("slow", USER_KEY, limits={"requests_per_second": 5}),
        key_entry("free", "sk-test-free-0123456789abcdef"),
    ]
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            stop = asyncio.Event()
            statuses: list[int] = []
            loaders = [asyncio.create_task(_load(s, r.url, "sk-test-free-0123456789abcdef", stop, statuses)) for r in (r1, r2, r1, r2)]
            await asyncio.sleep(0.5)
            redis_server.kill()
            await asyncio.sleep(2.0)
            # Down: per-router limits (on_redis_down = "local"), the 5 rps key still served by each.
            down = await asyncio.gather(*(post(s, (r1, r2)[i % 2].url + CHAT, USER_KEY, body()) for i in range(20)))
            ok_down = sum(1 for st, _ in down if st == 200)
            assert 5 <= ok_down <= 12, [st for st, _ in down]
            stats = await load_stats(s, r1.url)
            assert stats["cluster"]["healthy"] is False and stats["cluster"]["shared_limits"] is False
            redis_server.start()
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*loaders)
            assert len(statuses) > 20 and all(st == 200 for st in statuses), sorted(set(statuses))
            assert r1.alive() and r2.alive()

            # Back: shared and exact again (a fresh Redis: the key's rate starts full).
            async def exact() -> bool:
                await asyncio.sleep(1.1)  # let the bucket refill between tries
                res = await asyncio.gather(*(post(s, (r1, r2)[i % 2].url + CHAT, USER_KEY, body()) for i in range(20)))
                return 5 <= sum(1 for st, _ in res if st == 200) <= 6

            await wait_until_async(exact, timeout=10, interval=0.1, what="limits exact across routers again")
            stats = await load_stats(s, r2.url)
            assert stats["cluster"]["healthy"] is True and len(stats["cluster"]["routers"]) == 2


async def test_with_on_redis_down_reject_limited_keys_get_503_and_others_are_served(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = [
        key_entry("admin", ADMIN_KEY, role="admin"),
        key_entry("slow", USER_KEY, limits={"requests_per_second": 50}),
        key_entry("free", "sk-test-free-0123456789abcdef"),
    ]
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys, cluster={"on_redis_down": "reject"})
        async with routers(tmp_path, path, n=1) as (r1,), aiohttp.ClientSession() as s:
            assert (await post(s, r1.url + CHAT, USER_KEY, body()))[0] == 200
            redis_server.kill()
            status, data = await post(s, r1.url + CHAT, USER_KEY, body())
            assert status == 503 and data["error"]["code"] == "limits_unavailable"
            assert "on_redis_down" in data["error"]["message"]
            assert (await post(s, r1.url + CHAT, "sk-test-free-0123456789abcdef", body()))[0] == 200
            redis_server.start()
            await wait_until_async(lambda: _status(s, r1.url, USER_KEY, want=200), timeout=5, interval=0.2, what="served again")


async def test_a_quota_and_tokens_per_minute_hold_across_routers_and_events_are_shared(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    third = "sk-test-third-0123456789abcdef"
    keys = [
        key_entry("admin", ADMIN_KEY, role="admin"),
        key_entry("capped", USER_KEY, quota={"requests_total": 3}),
        key_entry("tpm", third, limits={"tokens_per_minute": 100}),
    ]
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path, log_level="info") as (r1, r2), aiohttp.ClientSession() as s:
            got = [await post(s, (r1, r2)[i % 2].url + CHAT, USER_KEY, body()) for i in range(8)]
            assert [st for st, _ in got] == [200, 200, 200] + [429] * 5
            assert all(d["error"]["code"] == "insufficient_quota" for _, d in got[3:])
            async with s.get(r1.url + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                capped = next(k for k in (await resp.json())["keys"] if k["name"] == "capped")
            assert capped["usage"]["requests_total"] == 3 and capped["quota_left"] == {"requests_total": 0}
            assert capped["usage"]["quota_counted"] == "cluster"
            # Reset on one router: the shared quota starts again for both.
            assert await _admin(s, r2.url + "/admin/keys/capped/reset-usage") == 200
            assert (await post(s, r1.url + CHAT, USER_KEY, body()))[0] == 200

            # 100 tokens a minute, each request reserving 40 up front (max_tokens) plus its prompt:
            # two fit across both routers, the third does not.
            tpm = [await post(s, (r1, r2)[i % 2].url + CHAT, third, body(max_tokens=40)) for i in range(3)]
            assert [st for st, _ in tpm][:2] == [200, 200] and tpm[2][0] == 429
            assert "'tokens_per_minute'" in tpm[2][1]["error"]["message"]

            # The event log is shared: r2 sees what r1 logged (its admin drain).
            assert await _admin(s, r1.url + "/admin/nodes/a/drain") == 200

            async def seen_on_r2() -> bool:
                async with s.get(r2.url + "/admin/events?scope=cluster&limit=200", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                    doc = await resp.json()
                return any("node a drained by admin" in e["message"] and e["router"] != doc["router"] for e in doc["events"])

            await wait_until_async(seen_on_r2, timeout=5, interval=0.2, what="r1's event in the shared log")


async def test_routers_started_while_redis_is_down_serve_and_share_once_it_is_up(tmp_path: Path, redis_server: RedisServer) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("slow", USER_KEY, limits={"requests_per_second": 5})]
    redis_server.kill()
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        async with routers(tmp_path, path) as (r1, r2), aiohttp.ClientSession() as s:
            assert (await post(s, r1.url + CHAT, USER_KEY, body()))[0] == 200  # per-router limits meanwhile
            assert (await load_stats(s, r2.url))["cluster"]["healthy"] is False
            redis_server.start()

            async def exact() -> bool:
                await asyncio.sleep(1.1)
                res = await asyncio.gather(*(post(s, (r1, r2)[i % 2].url + CHAT, USER_KEY, body()) for i in range(20)))
                return 5 <= sum(1 for st, _ in res if st == 200) <= 6

            await wait_until_async(exact, timeout=10, interval=0.1, what="shared once Redis is up")
            doc = await load_stats(s, r1.url)
            await wait_until_async(
                lambda: _routers_seen(s, r1.url, 2), timeout=5, what="both routers in the cluster view"
            )
            assert doc["router"]["cluster"]["redis"] == "ok"


async def _routers_seen(s: aiohttp.ClientSession, url: str, n: int) -> bool:
    return len((await load_stats(s, url))["cluster"]["routers"]) == n
