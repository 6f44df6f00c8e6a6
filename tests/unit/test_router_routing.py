"""routing.choose_route: the explained choice for every policy (reason, score, runner-up, action
from the tier), cache-aware's affinity over the router's prefix index, and the state around it:
a reload that changes max_tree_bytes applies it, a node removed or drained loses its entries, the
scraper's KV-cache numbers and its restart detection."""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, replace

from mvllm.router.breaker import Breaker
from mvllm.router.config import NodeConfig, PolicyConfig, RouterConfig
from mvllm.router.fleet.scraper import parse_cache
from mvllm.router.fleet.targets import Node
from mvllm.router.policy import (
    TIER_AWAKE,
    TIER_EVICT,
    TIER_FITS,
    TIER_LOADING,
    TIER_NO_ROOM,
    TIER_SLEEPING,
    make_policy,
)
from mvllm.router.prefix_index import RSS_PER_BYTE, PrefixIndex
from mvllm.router.routing import Route, choose_route
from mvllm.router.state import RouterState

HEADER = re.compile(
    r"^policy=(least-score|round-robin|cache-aware); reason=[a-z_]+; score=(\d+\.\d{3}|inf); "
    r"runner_up=(-|[\w.-]+:(\d+\.\d{3}|inf)); action=(none|wake|load|evict)$"
)
PROMPT = "system\n" + "You are a careful assistant. " * 40 + "\nuser\nhello\n"


@dataclass
class FakeTarget:
    name: str
    running: float = 0.0
    waiting: float = 0.0
    capacity: int = 8
    weight: float = 1.0
    tier: int | None = TIER_AWAKE
    kv_cache_usage: float | None = None


def policy(kind: str, **kw: object):
    return make_policy(PolicyConfig(type=kind, **kw), random.Random(1))  # type: ignore[arg-type]


def route(pol, cands, text: str | None = None, index: PrefixIndex | None = None, now: float = 100.0):
    picked = choose_route(pol, index if index is not None else PrefixIndex(), cands, "m", text, now)
    assert picked is not None
    node, r = picked
    assert HEADER.match(r.header()), r.header()
    return node, r


def test_least_score_reasons_and_runner_up() -> None:
    pol = policy("least-score")
    a, b = FakeTarget("a", running=1), FakeTarget("b", running=3)
    node, r = route(pol, [a, b])
    assert node is a and r.reason == "idle" and r.runner_up == "b"  # 0.125 < idle_threshold 0.5
    assert r.header() == "policy=least-score; reason=idle; score=0.125; runner_up=b:0.375; action=none"
    busy_a, busy_b = FakeTarget("a", running=6), FakeTarget("b", running=8, waiting=2)
    node, r = route(pol, [busy_a, busy_b])
    assert node is busy_a and r.reason == "least_score" and (r.score, r.runner_up_score) == (0.75, 1.125)
    node, r = route(pol, [b])
    assert node is b and r.reason == "only_candidate" and r.runner_up is None
    assert r.header().endswith("runner_up=-; action=none")


def test_round_robin_is_rotation() -> None:
    pol = policy("round-robin")
    cands = [FakeTarget("a"), FakeTarget("b")]
    names = [route(pol, cands)[0].name for _ in range(4)]
    assert names == ["a", "b", "a", "b"]
    assert route(pol, cands)[1].reason == "rotation"


def test_tiers_give_the_action_and_awake_nodes_come_first() -> None:
    pol = policy("least-score")
    for tier, action in [
        (TIER_LOADING, "load"), (TIER_SLEEPING, "wake"), (TIER_FITS, "load"), (TIER_EVICT, "evict"), (TIER_NO_ROOM, "evict"),
    ]:
        node, r = route(pol, [FakeTarget("cold", tier=tier), FakeTarget("other", tier=TIER_NO_ROOM if tier != TIER_NO_ROOM else None)])
        assert node.name == "cold" and r.action == action, (tier, r)
    awake = FakeTarget("awake", running=8, waiting=8)  # busy, but awake beats a wake
    node, r = route(pol, [FakeTarget("asleep", tier=TIER_SLEEPING), awake])
    assert node is awake and r.action == "none" and r.runner_up is None  # runner-up: same tier only
    assert choose_route(pol, PrefixIndex(), [FakeTarget("x", tier=None)], "m", None, 0.0) is None
    assert choose_route(pol, PrefixIndex(), [], "m", None, 0.0) is None


def test_cache_aware_sticks_to_the_node_that_has_the_prefix() -> None:
    pol = policy("cache-aware")
    index = PrefixIndex(pol.params)
    cands = [FakeTarget(n) for n in "abcd"]
    first, r = route(pol, cands, PROMPT, index)
    assert r.reason == "prefix_miss" and r.policy == "cache-aware"
    for turn in range(5):
        node, r = route(pol, cands, PROMPT + f"assistant\nanswer {turn}\n", index)
        assert node is first and r.reason == "prefix_hit", (turn, r)
    assert index.size_bytes > 0
    _, r = route(pol, cands, None, index)
    assert r.reason == "no_prompt"


def test_cache_aware_kv_full_and_imbalance_fall_back_to_least_score() -> None:
    pol = policy("cache-aware")
    index = PrefixIndex(pol.params)
    a, b = FakeTarget("a"), FakeTarget("b")
    index.insert("m", "a", PROMPT, 99.0)
    # Balanced (0.625 vs 0.5), so only its full KV cache keeps the prompt from a.
    full, other = replace(a, running=5, kv_cache_usage=0.95), replace(b, running=4)
    node, r = route(pol, [full, other], PROMPT, index)
    assert node is other and r.reason == "kv_full"
    assert index.match("m", PROMPT).keys() == {"a", "b"}  # the prompt is recorded for the chosen node
    index = PrefixIndex(pol.params)
    index.insert("m", "a", PROMPT, 99.0)
    node, r = route(pol, [replace(full, kv_cache_usage=0.5), other], PROMPT, index)
    assert node.name == "a" and r.reason == "prefix_hit"
    index = PrefixIndex(pol.params)
    index.insert("m", "a", PROMPT, 99.0)
    hot = replace(a, running=6)  # 0.75 vs 0: more than 0.25 apart and above 1.5x
    node, r = route(pol, [hot, b], PROMPT, index)
    assert node is b and r.reason == "imbalanced" and r.runner_up == "a"
    assert index.match("m", PROMPT).keys() == {"a", "b"}  # b holds it now too
    index = PrefixIndex(pol.params)
    index.insert("m", "a", PROMPT, 99.0)
    node, r = route(pol, [replace(a, running=1), b], PROMPT, index)  # 0.125 apart: balanced
    assert node.name == "a" and r.reason == "prefix_hit"


def test_route_header_formats_infinity() -> None:
    r = Route("least-score", "least_score", float("inf"), "b", float("inf"), "none")
    assert HEADER.match(r.header()) and "score=inf" in r.header() and "runner_up=b:inf" in r.header()


def config(policy_cfg: PolicyConfig, *names: str, drain: str = "") -> RouterConfig:
    nodes = tuple(NodeConfig(n, f"http://127.0.0.1:{i + 1}", drain=(n == drain)) for i, n in enumerate(names))
    return RouterConfig(nodes=nodes, policy=policy_cfg)


def fill(index: PrefixIndex, node: str, count: int) -> None:
    now = time.monotonic()  # the clock a reload sweeps the index with
    for i in range(count):
        index.insert("m", node, f"prompt {i} " + "x" * 2000, now)


def test_reload_applies_max_tree_bytes_and_forgets_removed_and_drained_nodes() -> None:
    big = PolicyConfig(type="cache-aware", max_tree_bytes=8 * 1024 * 1024)
    state = RouterState.create(config(big, "a", "b", "c"))
    index = state.prefix_index
    assert index.params.max_tree_bytes == int(8 * 1024 * 1024 / RSS_PER_BYTE)
    fill(index, "a", 400)
    fill(index, "b", 20)
    fill(index, "c", 20)
    assert index.size_bytes > 1024 * 1024
    small = replace(big, max_tree_bytes=1024 * 1024)
    state.apply_config(config(small, "a", "b", "c"))
    assert index.params.max_tree_bytes == int(1024 * 1024 / RSS_PER_BYTE)
    assert index.size_bytes <= index.params.max_tree_bytes
    assert index.match("m", "prompt 399 " + "x" * 2000).keys() == {"a"}  # recent entries survive
    fill(index, "b", 5)
    fill(index, "c", 5)
    state.apply_config(config(small, "a", "b", "c", drain="c"))  # c drained, b removed below
    held = index.match("m", "prompt 0 " + "x" * 2000).keys()
    assert "b" in held and "c" not in held
    state.apply_config(config(small, "a", "c", drain="c"))
    assert not index.match("m", "prompt 0 " + "x" * 2000).keys() & {"b", "c"}
    state.apply_config(config(PolicyConfig(), "a"))  # away from cache-aware: the index empties
    assert len(index) == 0 and index.size_bytes == 0


METRICS = """# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 100.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 800.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 200.0
vllm:num_requests_running{model_name="m"} 1.0
"""


def test_parse_cache_and_restart_detection() -> None:
    assert parse_cache(METRICS) == (0.5, 400.0, 1000.0)
    assert parse_cache("vllm:num_requests_running 1\n") == (None, None, None)
    node = Node(NodeConfig("a", "http://127.0.0.1:1"), Breaker(3, 10.0, 1), 8)
    assert node.prefix_hit_ratio is None
    assert not node.record_cache(*parse_cache(METRICS))
    assert node.kv_cache_usage == 0.5 and node.prefix_hit_ratio == 0.4
    assert not node.record_cache(0.1, 500.0, 1200.0)  # counters grew: same engine
    assert node.record_cache(0.0, 0.0, 10.0)  # the query counter went down: restarted
    assert not node.record_cache(None, None, None)  # an engine without the counters says nothing
