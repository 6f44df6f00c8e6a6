"""ClusterStore against a real redis-server: two instances play two routers sharing one Redis
(limits exact across both, leases of a dead router lapsing, changes seen through pub/sub, the
load lock), then Redis killed and restarted under them."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator

import pytest

from mvllm.router.cluster_scripts import QuotaCheck, RateCheck, SlotCheck, TokenCheck
from mvllm.router.cluster_store import Change, ClusterStore, ClusterUnavailable
from tests.procs import free_port
from tests.redis_support import RedisServer


@pytest.fixture
async def two(redis_server: RedisServer) -> AsyncIterator[tuple[ClusterStore, ClusterStore]]:
    a = ClusterStore(redis_server.url, router_id="router-a")
    b = ClusterStore(redis_server.url, router_id="router-b")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def eventually(probe, timeout: float, interval: float = 0.05):
    """The first truthy result of `probe()` within `timeout` s, and the seconds it took."""
    start = time.monotonic()
    while True:
        result = await probe()
        if result:
            return result, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(interval)


async def test_rate_limit_is_exact_across_two_routers(two):
    a, b = two
    # A fixed clock first: exactly the burst, whatever the interleaving of the two routers.
    waits = await asyncio.gather(*((a, b)[i % 2].try_acquire_rate("fixed", 5, now=1000.0) for i in range(20)))
    assert sum(1 for w in waits if w == 0) == 5
    assert all(0 < w <= 1.0 for w in waits if w != 0)

    # Then Redis's clock: 20 requests spread over both within a second, 5 (+1 refilled) pass.
    start = time.monotonic()
    waits = await asyncio.gather(*((a, b)[i % 2].try_acquire_rate("real", 5) for i in range(20)))
    elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert 5 <= sum(1 for w in waits if w == 0) <= 5 + math.ceil(elapsed * 5)
    # Half each way: both routers were admitted, neither got the whole budget.
    assert {w == 0 for w in waits[0::2]} and {w == 0 for w in waits[1::2]}


async def test_rate_refills_at_the_rate(two):
    a, b = two
    for i in range(2):
        assert await (a, b)[i].try_acquire_rate("r", 2, now=50.0) == 0
    assert await a.try_acquire_rate("r", 2, now=50.0) == pytest.approx(0.5, abs=1e-3)
    assert await b.try_acquire_rate("r", 2, now=50.5) == 0
    assert await a.try_acquire_rate("r", 2, now=50.5) == pytest.approx(0.5, abs=1e-3)


async def test_concurrency_two_across_both_and_release(two):
    a, b = two
    leases = await asyncio.gather(*((a, b)[i % 2].acquire_slot("c", 2) for i in range(6)))
    held = [lease for lease in leases if lease is not None]
    assert len(held) == 2
    assert await a.slots_in_use("c") == 2 and await b.slots_in_use("c") == 2
    owner = a if held[0].lease_id.startswith("router-a") else b
    await owner.release_slot(held[0])
    await owner.release_slot(held[0])  # idempotent
    assert await b.slots_in_use("c") == 1
    assert await b.acquire_slot("c", 2) is not None
    assert await a.acquire_slot("c", 2) is None


async def test_killed_routers_lease_lapses_within_ttl_and_refreshed_ones_stay(two):
    a, b = two
    dead = await a.acquire_slot("k", 2, ttl_s=2.0)
    live = await b.acquire_slot("k", 2, ttl_s=2.0)
    assert dead is not None and live is not None
    assert await b.acquire_slot("k", 2, ttl_s=2.0) is None

    # Router a is "killed": it never refreshes again. Router b keeps its heartbeat.
    task = asyncio.create_task(b.heartbeat(0.5))
    try:
        start = time.monotonic()
        lease, took = await eventually(lambda: b.acquire_slot("k", 2, ttl_s=2.0), timeout=10.0, interval=0.1)
        assert 1.5 <= time.monotonic() - start <= 10.0
        assert took < 10.0
        # b's own, refreshed lease outlived the ttl: the set holds it and the new one, nothing more.
        assert await a.slots_in_use("k") == 2
        assert await b.refresh_leases() == 2
    finally:
        task.cancel()
    await b.release_all([live, lease])
    assert await a.slots_in_use("k") == 0


async def test_a_lapsed_lease_is_not_brought_back_by_a_late_refresh(two):
    a, b = two
    lease = await a.acquire_slot("late", 1, ttl_s=2.0, now=100.0)
    assert lease is not None and a.held_leases == 1
    assert await a.refresh_leases(now=101.0) == 1  # in time: now good until 103
    assert await b.acquire_slot("late", 1, ttl_s=2.0, now=102.9) is None
    assert await a.refresh_leases(now=103.5) == 0  # too late: it lapsed at 103
    assert a.held_leases == 0  # and is forgotten: the next heartbeat does not carry it
    assert await b.slots_in_use("late", now=103.5) == 0
    assert await b.acquire_slot("late", 1, ttl_s=2.0, now=103.5) is not None


async def test_tokens_per_window_shared_reserve_and_settle(two):
    a, b = two
    r = await a.reserve_tokens("t", 100, 80, now=10.0)
    assert not isinstance(r, float) and r.amount == 80
    wait = await b.reserve_tokens("t", 100, 30, now=10.5)
    assert wait == pytest.approx(61.0 - 0.5, abs=1e-3)  # slot 10 leaves at 10 + 60 + 1
    await a.settle_tokens(r, 10, now=11.0)  # the engine used less: 70 refunded
    assert await b.tokens_in_window("t", now=11.0) == 10
    r2 = await b.reserve_tokens("t", 100, 30, now=11.0)
    assert not isinstance(r2, float)
    await b.settle_tokens(r2, 50, now=12.0)  # more than reserved: the extra 20 charged now
    await a.add_tokens("t", 5, now=12.0)
    assert await a.tokens_in_window("t", now=12.0) == 65
    # A request larger than the limit is clamped, so it runs once the window is empty.
    big = await a.reserve_tokens("t", 100, 1000, now=200.0)
    assert not isinstance(big, float) and big.amount == 100
    assert await a.tokens_in_window("t", now=200.0) == 100


async def test_finish_settles_and_releases_in_one_call(two):
    a, b = two
    checks = [SlotCheck("f", 1), TokenCheck("f", 100, 60), TokenCheck("g", 100, 60)]
    admission = await a.admit(checks, now=20.0)
    assert admission.allowed and a.held_leases == 1
    assert not (await b.admit(checks, now=20.0)).allowed
    await a.finish(admission, 25, now=21.0)
    assert a.held_leases == 0
    assert await b.slots_in_use("f", now=21.0) == 0
    assert await b.tokens_in_window("f", now=21.0) == 25
    assert await b.tokens_in_window("g", now=21.0) == 25
    # Unsettled (None): the leases go, the reservations stay charged.
    again = await b.admit(checks, now=22.0)
    await b.finish(again, None, now=22.0)
    assert await a.slots_in_use("f", now=22.0) == 0
    assert await a.tokens_in_window("f", now=22.0) == 85


async def test_quota_and_atomic_admit_charges_nothing_on_denial(two):
    a, b = two
    checks = [RateCheck("g", 100, 100), QuotaCheck("q", requests_total=3)]
    results = [await (a, b)[i % 2].admit(checks, now=5.0) for i in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert results[-1].worst is not None and results[-1].worst.limit == "requests_total"
    assert results[-1].worst.wait == math.inf
    assert (await a.quota_usage("q")).requests_total == 3
    # The denied requests took nothing from the rate: 100 - 3 are still there.
    burst = await asyncio.gather(*(a.try_acquire_rate("g", 100, 100, now=5.0) for _ in range(98)))
    assert sum(1 for w in burst if w == 0) == 97

    # All or nothing across kinds: a full slot set blocks the quota charge too.
    assert (await b.admit([SlotCheck("s", 1)])).allowed
    denied = await a.admit([QuotaCheck("q2", requests_per_day=10), SlotCheck("s", 1), TokenCheck("t2", 10, 5)])
    assert not denied.allowed and [d.limit for d in denied.denials] == ["max_concurrent"]
    assert (await a.quota_usage("q2")).requests_total == 0
    assert await a.tokens_in_window("t2") == 0


async def test_quota_per_day_rolls_over(two):
    a, b = two
    day = 86400.0 * 20000
    assert (await a.admit([QuotaCheck("d", requests_per_day=1)], now=day + 10)).allowed
    denied = await b.admit([QuotaCheck("d", requests_per_day=1)], now=day + 100)
    assert not denied.allowed and denied.worst.limit == "requests_per_day"
    assert denied.worst.wait == pytest.approx(86400 - 100, abs=1e-3)
    assert (await b.admit([QuotaCheck("d", requests_per_day=1)], now=day + 86400 + 1)).allowed
    usage = await a.quota_usage("d")
    assert (usage.requests_total, usage.requests_today, usage.day) == (2, 1, 20001)


async def test_disable_and_drain_reach_the_other_router_within_two_seconds(two):
    a, b = two
    seen: list[Change] = []
    watcher = asyncio.create_task(b.watch(seen.append))
    try:
        await eventually(lambda: _async(any(c.kind == "resync" for c in seen)), timeout=2.0)
        start = time.monotonic()
        await a.set_key_enabled("team-a", False)
        await a.set_drained("node-1", True)
        await eventually(lambda: _async(any(c.kind == "drain" for c in seen)), timeout=2.0, interval=0.01)
        assert time.monotonic() - start < 2.0
        kinds = [(c.kind, c.data, c.origin) for c in seen if c.kind != "resync"]
        assert kinds == [
            ("keys", {"key": "team-a", "enabled": False}, "router-a"),
            ("drain", {"node": "node-1", "drained": True}, "router-a"),
        ]
        assert await b.disabled_keys() == {"team-a"}
        assert await b.drained_nodes() == {"node-1"}
        await b.set_key_enabled("team-a", True)
        await b.set_drained("node-1", False)
        assert await a.disabled_keys() == set() and await a.drained_nodes() == set()
    finally:
        watcher.cancel()


async def _async(value):
    return value


async def test_load_lock_is_exclusive_token_checked_and_lapses(two):
    a, b = two
    token = await a.acquire_load_lock("llama", ttl_s=1.0)
    assert token is not None
    assert await b.acquire_load_lock("llama") is None
    assert await b.release_load_lock("llama", "not-the-token") is False
    assert await a.load_lock_holder("llama") == token
    assert await a.extend_load_lock("llama", token, ttl_s=1.0)
    assert await a.release_load_lock("llama", token) is True
    token_b = await b.acquire_load_lock("llama", ttl_s=0.3)
    assert token_b is not None and token_b.startswith("router-b")
    # A holder that dies mid-load blocks the others only until the ttl.
    await asyncio.sleep(0.5)
    token_a = await a.acquire_load_lock("llama")
    assert token_a is not None
    assert await b.release_load_lock("llama", token_b) is False  # lapsed: not b's to release
    assert await a.load_lock_holder("llama") == token_a


async def test_event_log_is_shared_and_capped(redis_server):
    async with ClusterStore(redis_server.url, router_id="a", events_max=50) as a:
        async with ClusterStore(redis_server.url, router_id="b") as b:
            first = await a.append_event({"kind": "drain", "node": "n1"})
            await b.append_event({"kind": "undrain", "node": "n1"})
            events = await a.events()
            assert [(e["kind"], e["router"]) for _, e in events] == [("drain", "a"), ("undrain", "b")]
            assert [e["kind"] for _, e in await b.events(after=first)] == ["undrain"]
            for i in range(500):
                await a.append_event({"i": i})
            tail = await b.events(count=1000)
            assert 50 <= len(tail) < 200  # approximate trimming: near the cap, never unbounded
            assert tail[-1][1]["i"] == 499


async def test_redis_down_fails_fast_then_reconnects_by_itself(redis_server, two):
    a, b = two
    seen: list[Change] = []
    watcher = asyncio.create_task(b.watch(seen.append, reconnect_delay=0.2))
    await eventually(lambda: _async(seen), timeout=2.0)
    lease = await a.acquire_slot("x", 5)
    assert lease is not None and a.healthy

    redis_server.kill()
    start = time.monotonic()
    with pytest.raises(ClusterUnavailable):
        await a.try_acquire_rate("x", 5)
    assert time.monotonic() - start < 1.5
    assert not a.healthy
    start = time.monotonic()
    for _ in range(50):  # inside the retry interval: every call fails at once
        with pytest.raises(ClusterUnavailable):
            await a.admit([SlotCheck("x", 5)])
    assert time.monotonic() - start < 0.5
    with pytest.raises(ClusterUnavailable):
        await a.refresh_leases()
    beating = asyncio.create_task(a.heartbeat(0.05))  # rides out the outage
    assert await b.ping() is False
    await asyncio.sleep(0.5)
    assert not watcher.done()  # the watcher rides out the outage
    assert not beating.done()
    beating.cancel()

    redis_server.start()
    resyncs = sum(1 for c in seen if c.kind == "resync")
    _, took = await eventually(lambda: a.ping(), timeout=5.0)
    assert took < 5.0 and a.healthy
    assert await a.try_acquire_rate("x", 5) == 0
    # The watcher resubscribed by itself, says so, and delivers new changes again.
    await eventually(lambda: _async(sum(1 for c in seen if c.kind == "resync") > resyncs), timeout=5.0)
    await a.set_drained("n2", True)
    await eventually(lambda: _async(any(c.kind == "drain" for c in seen)), timeout=2.0)
    # The restarted Redis is empty (no persistence): the old lease is gone, the refresh says so.
    assert await a.refresh_leases() == 0
    assert a.held_leases == 0
    watcher.cancel()


async def test_unreachable_host_times_out_quickly():
    # A port nobody listens on: refused at once. The socket timeout bounds the worse case too.
    store = ClusterStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(ClusterUnavailable):
            await store.admit([RateCheck("k", 1)])
        assert time.monotonic() - start < 1.0
        assert store.last_error is not None
    finally:
        await store.close()


async def test_a_redis_that_never_answers_costs_about_two_socket_timeouts():
    # A listener that accepts and then says nothing: a hung Redis, or a network that drops replies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        store = ClusterStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3, retry_interval=0.5)
        try:
            start = time.monotonic()
            with pytest.raises(ClusterUnavailable):
                await store.try_acquire_rate("k", 5)
            took = time.monotonic() - start
            assert 0.25 <= took < 1.5, took  # the timeout, once retried: never a hang
            start = time.monotonic()
            with pytest.raises(ClusterUnavailable):
                await store.acquire_slot("k", 1)
            assert time.monotonic() - start < 0.05  # within retry_interval: no second wait
            assert await store.ping() is False
        finally:
            await store.close()
