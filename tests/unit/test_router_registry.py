"""The registry: config diffs, the model index, load estimates between scrapes, merged /v1/models."""

from __future__ import annotations

from mvllm.router.breaker import BreakerState
from mvllm.router.config import BreakerConfig, NodeConfig, RouterConfig
from mvllm.router.fleet.registry import Registry
from mvllm.router.fleet.scraper import parse_load
from mvllm.router.fleet.targets import Health


def cfg(*nodes: NodeConfig, **kw: object) -> RouterConfig:
    return RouterConfig(nodes=nodes, **kw)  # type: ignore[arg-type]


A = NodeConfig("a", "http://127.0.0.1:1", capacity=4)
B = NodeConfig("b", "http://127.0.0.1:2", capacity=8)


def card(model: str, parent: str | None = None) -> dict:
    return {"id": model, "object": "model", "root": model, "parent": parent, "owned_by": "vllm"}


def test_apply_adds_changes_and_removes() -> None:
    reg = Registry(cfg(A, B))
    assert [n.name for n in reg.nodes()] == ["a", "b"]
    a = reg.get("a")
    assert a is not None
    diff = reg.apply(cfg(NodeConfig("a", A.url, capacity=16, weight=2.0), NodeConfig("c", "http://127.0.0.1:3")))
    assert [n.name for n in diff.added] == ["c"]
    assert [n.name for n in diff.removed] == ["b"]
    assert [n.name for n in diff.changed] == ["a"]
    assert reg.get("a") is a and a.capacity == 16 and a.weight == 2.0  # changed in place
    assert reg.get("b") is None
    assert not reg.apply(cfg(NodeConfig("a", A.url, capacity=16, weight=2.0), NodeConfig("c", "http://127.0.0.1:3")))


def test_url_change_replaces_the_node() -> None:
    reg = Registry(cfg(A))
    old = reg.get("a")
    diff = reg.apply(cfg(NodeConfig("a", "http://127.0.0.1:9")))
    assert diff.removed == [old] and len(diff.added) == 1
    assert reg.get("a") is not old and old is not None and old.retired


def test_removed_node_with_requests_in_flight_drains() -> None:
    reg = Registry(cfg(A, B))
    b = reg.get("b")
    assert b is not None
    b.in_flight = 2
    reg.apply(cfg(A))
    assert b.retired and b.draining and not b.routable(0)
    assert reg.retiring() == (b,)
    assert [n.name for n in reg.iter_all()] == ["a", "b"]  # still visible while it drains
    b.in_flight = 1
    reg.release(b)
    assert reg.retiring() == (b,)
    b.in_flight = 0
    reg.release(b)
    assert reg.retiring() == ()


def test_model_index_from_discovery_and_overrides() -> None:
    reg = Registry(cfg(A, B, NodeConfig("o", "http://127.0.0.1:5", models=("pinned",))))
    a, b = reg.get("a"), reg.get("b")
    assert a is not None and b is not None
    assert reg.nodes_for("pinned") == (reg.get("o"),)
    assert reg.set_models(a, [card("llama"), card("sql-lora", parent="llama")])
    assert reg.set_models(b, [card("llama")])
    assert not reg.set_models(b, [card("llama")])  # unchanged
    assert reg.nodes_for("llama") == (a, b)
    assert reg.nodes_for("sql-lora") == (a,)  # LoRA adapters route like models
    assert reg.nodes_for("nope") == ()
    doc = reg.models_document()
    ids = [c["id"] for c in doc["data"]]
    assert sorted(ids) == ["llama", "pinned", "sql-lora"] and len(ids) == 3  # merged, no duplicates
    lora = next(c for c in doc["data"] if c["id"] == "sql-lora")
    assert lora["parent"] == "llama"
    pinned = next(c for c in doc["data"] if c["id"] == "pinned")
    assert pinned["object"] == "model" and pinned["owned_by"] == "mvllm"


def test_override_set_then_dropped_falls_back_to_discovery() -> None:
    reg = Registry(cfg(A))
    a = reg.get("a")
    assert a is not None
    reg.set_models(a, [card("llama")])
    reg.apply(cfg(NodeConfig("a", A.url, capacity=4, models=("x",))))
    assert reg.nodes_for("x") == (a,) and reg.nodes_for("llama") == ()
    reg.apply(cfg(A))
    assert reg.nodes_for("llama") == (a,) and reg.nodes_for("x") == ()


def test_in_flight_corrects_the_scrape_between_scrapes() -> None:
    reg = Registry(cfg(A))
    a = reg.get("a")
    assert a is not None
    assert (a.running, a.waiting) == (0, 0)
    a.in_flight = 3  # a burst before any scrape
    assert (a.running, a.waiting) == (3, 0)
    a.record_scrape(running=3, waiting=1, per_model={}, now=1.0)  # the engine saw them
    assert (a.running, a.waiting) == (3, 1)
    a.in_flight = 6  # three more since that scrape: over capacity 4, the excess waits
    assert (a.running, a.waiting) == (4, 3)
    a.in_flight = 0  # all finished since the scrape
    assert (a.running, a.waiting) == (0, 1)


def test_routable_follows_health_breaker_and_drain() -> None:
    reg = Registry(cfg(A, breaker=BreakerConfig(failure_threshold=1, cooldown=5)))
    a = reg.get("a")
    assert a is not None
    assert a.health is Health.UNKNOWN and a.routable(0)
    a.health = Health.DOWN
    assert not a.routable(0)
    a.health = Health.UP
    a.breaker.on_failure(0)
    assert a.breaker.state is BreakerState.OPEN and not a.routable(1) and a.routable(5)
    reg.apply(cfg(NodeConfig("a", A.url, capacity=4, drain=True)))
    assert not a.routable(100)
    assert reg.healthy_count(100) == 0


def test_parse_load_sums_label_sets_per_model() -> None:
    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="llama"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="llama"} 2.0',
            'vllm:num_requests_running{engine="0",model_name="qwen"} 1.0',
            'vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0',
            'vllm:num_requests_waiting{engine="0",model_name="qwen"} oops',
            "vllm:num_requests_waiting{broken",
            'vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5',
        ]
    )
    running, waiting, per_model = parse_load(text)  # type: ignore[misc]
    assert (running, waiting) == (6.0, 4.0)
    assert per_model == {"llama": (5.0, 4.0), "qwen": (1.0, 0.0)}
    assert parse_load("# nothing here\nfoo 1\n") is None
