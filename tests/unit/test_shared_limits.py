"""The pure parts of the shared limits: which Redis checks a scope's limits become, how a denial
from Redis turns into the LimitSet's decision (message, code, Retry-After, queueing), the local
counters charged on a shared admission, and the `[cluster]` / `[router] workers` config keys."""

from __future__ import annotations

import math

import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.access.limits import LimitSet, LimitSpec, QueueSpec, QuotaSpec, Verdict
from mvllm.router.access.shared import KEY_SCOPE_PREFIX, is_limiting, scope_checks
from mvllm.router.cluster_scripts import QuotaCheck, RateCheck, SlotCheck, TokenCheck
from mvllm.router.config import apply_env, parse_config
from mvllm.router.workers import NEEDS_REDIS


class Key:
    def __init__(self, name: str, limits: LimitSpec | None = None, quota: QuotaSpec | None = None) -> None:
        self.name, self.limits, self.quota = name, limits, quota


def test_a_scope_becomes_one_check_per_limit_plus_a_counting_lease():
    spec = LimitSpec(requests_per_second=5, burst=7, max_concurrent=2, tokens_per_minute=1000)
    checks = scope_checks("key:a", spec, QuotaSpec(requests_total=10), estimate=300, lease_ttl=4.0)
    assert checks == [
        RateCheck("key:a", 5, 7),
        SlotCheck("key:a", 2, 4.0),
        TokenCheck("key:a", 1000, 300),
        QuotaCheck("key:a", 10, None),
    ]
    bare = scope_checks("global", None, None, 0, 5.0)
    assert bare == [SlotCheck("global", None, 5.0)]
    assert not any(is_limiting(c) for c in bare)
    assert all(is_limiting(c) for c in checks)
    assert KEY_SCOPE_PREFIX + "global" != "global"  # no key can share the global scope's id


def test_a_shared_denial_reads_as_the_local_one_and_counts():
    limits = LimitSet(LimitSpec())
    key = Key("slow", LimitSpec(requests_per_second=5))
    ticket = limits.ticket(key)
    d = limits.admit_shared(ticket, [("slow", "requests_per_second", 0.15)])
    assert d.verdict is Verdict.DENY and d.retry_after == 1 and d.code == "rate_limit_exceeded"
    assert "'requests_per_second' of key 'slow'" in d.message and d.scope == "slow"
    assert limits.counters()["slow"]["denied_requests_per_second"] == 1

    quota = Key("capped", quota=QuotaSpec(requests_total=1))
    d = limits.admit_shared(limits.ticket(quota), [("capped", "requests_total", math.inf)])
    assert d.verdict is Verdict.DENY and d.retry_after is None and d.code == "insufficient_quota"

    slot = limits.admit_shared(limits.ticket(Key("two", LimitSpec(max_concurrent=2))), [("two", "max_concurrent", None)])
    assert slot.retry_after == 1 and slot.limit == "max_concurrent"


def test_a_shared_admission_charges_the_local_counters_even_past_their_limit():
    limits = LimitSet(LimitSpec(max_concurrent=1))
    tickets = [limits.ticket(None) for _ in range(3)]
    for t in tickets:  # Redis admitted them (other routers' slots were free): counted here too
        assert limits.admit_shared(t, ()).allowed
    assert limits.counters()["global"]["in_flight"] == 3
    for t in tickets:
        limits.release(t)
    assert limits.counters()["global"]["in_flight"] == 0
    assert limits.counters()["global"]["admitted"] == 3


def test_a_shared_denial_queues_when_the_wait_fits_and_quotas_never_do():
    now = [100.0]
    limits = LimitSet(LimitSpec(), QueueSpec(timeout=2.0, max_queued=4), now=lambda: now[0])
    key = Key("k", LimitSpec(requests_per_second=1), QuotaSpec(requests_per_day=5))
    t = limits.ticket(key)
    d = limits.admit_shared(t, [("k", "requests_per_second", 0.5)])
    assert d.verdict is Verdict.WAIT and d.wait == pytest.approx(0.5)
    assert limits.queued == 1
    assert limits.admit_shared(t, ()).allowed and limits.queued == 0
    d = limits.admit_shared(limits.ticket(key), [("k", "requests_per_day", 3600.0)])
    assert d.verdict is Verdict.DENY and d.code == "insufficient_quota"


def test_cluster_and_workers_keys():
    cfg = parse_config({"cluster": {"redis_url": "redis://r:6379/0", "on_redis_down": "reject"}, "router": {"workers": 4}})
    assert cfg.cluster.enabled and cfg.cluster.on_redis_down == "reject" and cfg.workers == 4
    plain = parse_config({})
    assert not plain.cluster.enabled and plain.cluster.on_redis_down == "local" and plain.workers == 1
    assert apply_env(plain, {"MVLLM_REDIS_URL": "redis://env:1/0"}).cluster.redis_url == "redis://env:1/0"
    assert "redis://" not in repr(cfg.cluster)  # the URL may carry a password
    assert "[cluster] redis_url" in NEEDS_REDIS


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"cluster": {"redis_url": "http://:secret@h"}}, "expected a redis://"),
        ({"cluster": {"on_redis_down": "panic"}}, "expected one of"),
        ({"cluster": {"lease_ttl": 0.1}}, ">= 1"),
        ({"router": {"workers": 0}}, ">= 1"),
        ({"cluster": {"redis": "x"}}, "unknown key"),
    ],
)
def test_invalid_cluster_keys_are_refused_naming_the_key(doc, problem):
    with pytest.raises(ConfigError, match=problem) as err:
        parse_config(doc)
    assert "secret" not in str(err.value)


def test_an_invalid_mvllm_redis_url_names_the_variable():
    with pytest.raises(ConfigError, match="MVLLM_REDIS_URL"):
        apply_env(parse_config({}), {"MVLLM_REDIS_URL": "localhost:6379"})
