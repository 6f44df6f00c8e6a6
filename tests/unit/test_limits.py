"""Limit policies and LimitSet, driven by a fake clock (no sleeps)."""

import math
from dataclasses import dataclass

import pytest

from mvllm.router.access.limits import (
    QUEUE_POLL_SECONDS,
    ConcurrencyLimit,
    LimitSet,
    LimitSpec,
    QueueSpec,
    Quota,
    QuotaSpec,
    TokenBucket,
    TokensPerMinute,
    Verdict,
    estimate_tokens,
)

DAY = 86400
# 2024-05-01 00:00:00 UTC, a day boundary in epoch seconds.
MIDNIGHT = 1714521600


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass(frozen=True)
class Key:
    name: str
    limits: LimitSpec | None = None
    quota: QuotaSpec | None = None


def make_set(limits=None, queue=None, *, wall_start=MIDNIGHT + 3600):
    clock, wall = Clock(), Clock(wall_start)
    return LimitSet(limits, queue, now=clock, wall=wall), clock, wall


def admit(ls: LimitSet, key, tokens: int = 0):
    t = ls.ticket(key, tokens)
    return t, ls.admit(t)


# --- TokenBucket ----------------------------------------------------------------------------------


def test_bucket_burst_then_refill_math():
    b = TokenBucket(rate=2.0, burst=3)
    t = 100.0
    assert [b.try_acquire(t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.try_acquire(t) == pytest.approx(0.5)  # 1 token at 2/s
    assert b.try_acquire(t + 0.25) == pytest.approx(0.25)  # half refilled, nothing taken
    assert b.try_acquire(t + 0.5) == 0.0
    assert b.available(t + 0.5) == pytest.approx(0.0)
    # A long idle refills only up to the burst.
    assert b.available(t + 1000) == pytest.approx(3.0)


def test_bucket_defaults_and_slow_rates():
    assert TokenBucket(5).burst == 5
    assert TokenBucket(2.5).burst == 3
    slow = TokenBucket(0.5)
    assert slow.burst == 1
    assert slow.try_acquire(0.0) == 0.0
    assert slow.try_acquire(0.0) == pytest.approx(2.0)
    assert slow.try_acquire(1.999) > 0
    assert slow.try_acquire(2.0) == 0.0
    assert TokenBucket(1, burst=2).wait_time(0.0, n=3) == math.inf
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_bucket_clock_stepping_back_adds_nothing():
    b = TokenBucket(1, burst=1)
    assert b.try_acquire(10.0) == 0.0
    assert b.try_acquire(5.0) > 0
    assert b.try_acquire(10.5) == pytest.approx(0.5)
    assert b.try_acquire(11.0) == 0.0


# --- ConcurrencyLimit -----------------------------------------------------------------------------


def test_concurrency_acquire_release_never_negative():
    c = ConcurrencyLimit(2)
    assert c.try_acquire() and c.try_acquire()
    assert not c.try_acquire()
    assert c.in_use == 2
    c.release()
    assert c.try_acquire()
    for _ in range(2):
        c.release()
    assert (c.in_use, c.underflows) == (0, 0)
    c.release()
    c.release()
    assert (c.in_use, c.underflows) == (0, 2)
    unlimited = ConcurrencyLimit(None)
    assert all(unlimited.try_acquire() for _ in range(1000))
    assert unlimited.in_use == 1000


# --- TokensPerMinute ------------------------------------------------------------------------------


def test_tpm_settle_refunds_a_larger_reservation():
    tpm = TokensPerMinute(1000)
    r = tpm.reserve(0.0, 800)
    assert tpm.used(0.0) == 800
    assert tpm.wait_time(1.0, 400) > 0
    tpm.settle(2.0, r, 150)  # the engine reported 150 tokens: 650 come back
    assert tpm.used(2.0) == 150
    assert tpm.wait_time(2.0, 850) == 0.0
    tpm.settle(3.0, r, 0)  # a second settle is ignored
    assert tpm.used(3.0) == 150


def test_tpm_usage_above_estimate_is_charged_now():
    tpm = TokensPerMinute(1000)
    r = tpm.reserve(0.0, 100)
    tpm.settle(30.0, r, 700)
    assert tpm.used(30.0) == 700
    # The 100 reserved at t=0 leave at 61 s, the 600 charged at t=30 at 91 s.
    assert tpm.used(61.0) == 600
    assert tpm.used(91.0) == 0


def test_tpm_wait_time_is_when_enough_tokens_leave():
    tpm = TokensPerMinute(1000)
    tpm.reserve(0.0, 800)
    tpm.reserve(10.5, 200)
    assert tpm.used(20.0) == 1000
    # 300 more need the 800 of slot [0, 1) gone: it leaves at 0 + 1 + 60.
    assert tpm.wait_time(20.0, 300) == pytest.approx(41.0)
    # 900 more need both slots gone: [10, 11) leaves at 71.
    assert tpm.wait_time(20.0, 900) == pytest.approx(51.0)
    assert tpm.wait_time(61.0, 300) == 0.0
    assert tpm.wait_time(0.0, 1001) == math.inf


def test_tpm_clamps_estimate_and_refund_after_expiry_is_void():
    tpm = TokensPerMinute(1000)
    r = tpm.reserve(0.0, 50_000)  # max_tokens larger than the whole budget still runs alone
    assert r.amount == 1000
    assert tpm.used(100.0) == 0
    tpm.settle(100.0, r, 10)  # the slot expired: nothing to refund, never negative
    assert tpm.used(100.0) == 0


def test_tpm_memory_is_bounded():
    tpm = TokensPerMinute(10**9)
    t = 0.0
    for _ in range(10_000):
        tpm.reserve(t, 1)
        t += 0.05
    assert len(tpm._slots) <= 62


# --- Quota ----------------------------------------------------------------------------------------


def test_quota_per_day_rolls_over_at_utc_midnight():
    q = Quota(requests_per_day=2)
    wall = MIDNIGHT + DAY - 10  # 23:59:50 UTC
    assert q.check(wall) is None
    q.consume(wall)
    q.consume(wall)
    assert q.check(wall) == ("requests_per_day", 10)
    assert q.check(wall + 9.5) == ("requests_per_day", 1)
    assert q.check(wall + 10) is None  # 00:00:00 next day
    assert q.requests_today(wall + 10) == 0
    assert q.used_total == 2


def test_quota_total_never_resets():
    q = Quota(requests_total=3, requests_per_day=10)
    for i in range(3):
        q.consume(MIDNIGHT + i * DAY)
    assert q.check(MIDNIGHT + 5 * DAY) == ("requests_total", None)


# --- LimitSet -------------------------------------------------------------------------------------


def test_limitset_names_key_limit_and_retry_after():
    ls, clock, _ = make_set()
    a = Key("team-a", LimitSpec(requests_per_second=5))
    b = Key("team-b", LimitSpec(requests_per_second=5))
    for _ in range(5):
        assert admit(ls, a)[1].allowed
    t, d = admit(ls, a)
    assert d.verdict is Verdict.DENY
    assert (d.status, d.limit, d.scope, d.retry_after, d.code) == (429, "requests_per_second", "team-a", 1, "rate_limit_exceeded")
    assert "rate limit 'requests_per_second' of key 'team-a' exceeded (5/s)" in d.message
    assert d.headers == {"Retry-After": "1"}
    ls.release(t)
    # Another key is not affected.
    assert admit(ls, b)[1].allowed
    clock.advance(0.2)
    assert admit(ls, a)[1].allowed
    assert ls.counters()["team-a"]["denied_requests_per_second"] == 1


def test_limitset_global_limit_applies_to_all_and_open_auth():
    ls, _, _ = make_set(LimitSpec(requests_per_second=1, burst=2))
    assert admit(ls, None)[1].allowed
    assert admit(ls, Key("x"))[1].allowed
    _, d = admit(ls, Key("y"))
    assert (d.limit, d.scope) == ("requests_per_second", "global")
    assert "of the router (global)" in d.message


def test_limitset_reports_the_longest_wait():
    ls, clock, _ = make_set()
    key = Key("k", LimitSpec(requests_per_second=1, tokens_per_minute=1000))
    t, d = admit(ls, key, tokens=900)
    assert d.allowed
    ls.release(t)  # never settled: the 900 stay charged
    clock.advance(0.5)
    _, d = admit(ls, key, tokens=500)
    # rps would allow in 0.5 s, tpm only when the 900 leave (61 s after t=0): tpm is reported.
    assert (d.limit, d.retry_after) == ("tokens_per_minute", 61)
    assert "tokens_per_minute" in d.message and "1000 tokens/min" in d.message
    assert d.headers["Retry-After"] == "61"


def test_limitset_charges_nothing_on_denial():
    ls, _, _ = make_set(LimitSpec(requests_per_second=10, burst=10))
    key = Key("k", LimitSpec(max_concurrent=1))
    _t1, d = admit(ls, key)
    assert d.allowed
    before = ls.counters()["global"]["bucket_tokens"]
    _t2, d = admit(ls, key)
    assert (d.verdict, d.limit) == (Verdict.DENY, "max_concurrent")
    assert d.retry_after == 1
    assert ls.counters()["global"]["bucket_tokens"] == before
    assert ls.counters()["global"]["in_flight"] == 1


def test_limitset_concurrency_release_frees_a_slot():
    ls, _, _ = make_set()
    key = Key("k", LimitSpec(max_concurrent=2))
    t1, d1 = admit(ls, key)
    _t2, d2 = admit(ls, key)
    assert d1.allowed and d2.allowed
    t3, d3 = admit(ls, key)
    assert d3.limit == "max_concurrent"
    assert "(2 requests in flight)" in d3.message
    ls.release(t3)  # a denied ticket releases nothing
    assert ls.counters()["k"]["in_flight"] == 2
    ls.release(t1)
    ls.release(t1)  # idempotent
    assert ls.counters()["k"]["in_flight"] == 1
    assert admit(ls, key)[1].allowed
    with pytest.raises(ValueError):
        ls.admit(t1)


def test_limitset_tpm_settle_frees_tokens_for_others():
    ls, clock, _ = make_set()
    key = Key("k", LimitSpec(tokens_per_minute=1000))
    t1, d = admit(ls, key, tokens=estimate_tokens({"prompt": "x" * 400, "max_tokens": 600}))
    assert d.allowed and t1.estimate == 700
    _, d = admit(ls, key, tokens=400)
    assert d.limit == "tokens_per_minute"
    clock.advance(1.0)
    ls.settle(t1, 120)  # streamed usage: prompt 100 + completion 20
    ls.release(t1)
    assert ls.counters()["k"]["tokens_in_window"] == 120
    assert ls.counters()["k"]["tokens_reported"] == 120
    assert admit(ls, key, tokens=400)[1].allowed


def test_limitset_quota_day_rollover_and_total():
    ls, _, wall = make_set(wall_start=MIDNIGHT + DAY - 30)
    key = Key("k", quota=QuotaSpec(requests_per_day=1, requests_total=2))
    assert admit(ls, key)[1].allowed
    _, d = admit(ls, key)
    assert (d.limit, d.retry_after, d.code) == ("requests_per_day", 30, "insufficient_quota")
    assert "resets at 00:00 UTC" in d.message
    wall.advance(30)
    assert admit(ls, key)[1].allowed
    _, d = admit(ls, key)
    assert (d.limit, d.retry_after) == ("requests_total", None)
    assert d.headers == {}
    assert ls.counters()["k"]["requests_total"] == 2


def test_queue_waits_then_admits():
    ls, clock, _ = make_set(queue=QueueSpec(timeout=2.0, max_queued=1))
    key = Key("k", LimitSpec(requests_per_second=1, burst=1))
    assert admit(ls, key)[1].allowed
    t2, d2 = admit(ls, key)
    assert d2.verdict is Verdict.WAIT
    assert d2.wait == pytest.approx(1.0)
    assert d2.limit == "requests_per_second"
    assert ls.counters()["global"]["queued"] == 1
    # The queue holds one: the next is refused at once.
    _t3, d3 = admit(ls, key)
    assert d3.verdict is Verdict.DENY
    clock.advance(d2.wait)
    assert ls.admit(t2).allowed
    assert ls.counters()["global"]["queued"] == 0
    assert ls.counters()["k"]["queued"] == 0


def test_queue_refuses_a_wait_that_cannot_fit():
    ls, _, _ = make_set(queue=QueueSpec(timeout=2.0, max_queued=10))
    key = Key("k", LimitSpec(requests_per_second=0.2))  # next token in 5 s
    assert admit(ls, key)[1].allowed
    _, d = admit(ls, key)
    assert d.verdict is Verdict.DENY and d.retry_after == 5


def test_queue_for_concurrency_polls_until_timeout():
    ls, clock, _ = make_set(queue=QueueSpec(timeout=0.2, max_queued=10))
    key = Key("k", LimitSpec(max_concurrent=1))
    t1, _ = admit(ls, key)
    t2, d = admit(ls, key)
    steps = 0
    while d.verdict is Verdict.WAIT and steps < 100:
        assert 0 < d.wait <= QUEUE_POLL_SECONDS
        clock.advance(d.wait)
        d = ls.admit(t2)
        steps += 1
    assert d.verdict is Verdict.DENY and d.limit == "max_concurrent"
    assert 3 <= steps <= 5
    assert ls.counters()["global"]["queued"] == 0
    # Released in time, a queued request gets the slot.
    t3, d = admit(ls, key)
    assert d.verdict is Verdict.WAIT
    ls.release(t1)
    clock.advance(d.wait)
    assert ls.admit(t3).allowed


def test_queue_abandoned_by_caller_frees_its_place():
    ls, _, _ = make_set(queue=QueueSpec(timeout=5.0, max_queued=1))
    key = Key("k", LimitSpec(max_concurrent=1))
    admit(ls, key)
    t2, d = admit(ls, key)
    assert d.verdict is Verdict.WAIT
    ls.release(t2)  # the client went away while waiting
    assert ls.queued == 0
    assert admit(ls, key)[1].verdict is Verdict.WAIT


def test_quota_never_queues():
    ls, _, _ = make_set(queue=QueueSpec(timeout=60.0, max_queued=10))
    key = Key("k", quota=QuotaSpec(requests_total=1))
    assert admit(ls, key)[1].allowed
    assert admit(ls, key)[1].verdict is Verdict.DENY


def test_reconfigure_keeps_in_flight_and_prune():
    ls, _, _ = make_set()
    t1, _ = admit(ls, Key("k", LimitSpec(max_concurrent=1)))
    # Hot reload raises the key's limit: the request in flight still counts.
    t2, d = admit(ls, Key("k", LimitSpec(max_concurrent=2)))
    assert d.allowed
    _, d = admit(ls, Key("k", LimitSpec(max_concurrent=2)))
    assert d.limit == "max_concurrent"
    ls.prune(["other"])
    assert "k" not in ls.counters()
    ls.release(t1)
    ls.release(t2)
    ls.update(LimitSpec(max_concurrent=1))
    _t, d = admit(ls, None)
    assert d.allowed and not admit(ls, None)[1].allowed


def test_counters_are_plain_numbers():
    ls, _, _ = make_set(LimitSpec(requests_per_second=100, tokens_per_minute=10_000))
    admit(ls, Key("k", quota=QuotaSpec(requests_per_day=10)), tokens=50)
    c = ls.counters()
    assert set(c) == {"global", "k"}
    for scope in c.values():
        assert all(type(v) in (int, float) for v in scope.values())
    assert c["global"]["admitted"] == 1 and c["global"]["tokens_in_window"] == 50
    assert c["k"]["requests_today"] == 1
    assert c["global"]["denied_max_concurrent"] == 0


# --- estimate_tokens ------------------------------------------------------------------------------


def test_estimate_tokens_shapes():
    chat = {"messages": [{"role": "user", "content": "a" * 40}, {"role": "user", "content": [{"type": "text", "text": "b" * 8}]}], "max_tokens": 10}
    assert estimate_tokens(chat) == 12 + 10
    assert estimate_tokens({"prompt": [1, 2, 3], "max_completion_tokens": 5, "n": 2}) == 3 + 10
    assert estimate_tokens({"input": ["abcd", "efgh"]}, default_completion=0) == 2
    assert estimate_tokens({"prompt": "x"}) == 1 + 256
    for hostile in ({"messages": 5}, {"messages": [None, 3, {"content": {"x": 1}}]}, {"max_tokens": "9"}, {"n": 10**9}, [], "x"):
        assert estimate_tokens(hostile) >= 0
