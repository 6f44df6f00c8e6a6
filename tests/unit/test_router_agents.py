"""The router's agent side as pure logic: [[agents]] config, the tiered choice for a model awake
nowhere, /state turned into registry routes (index, tiers, load, capacity), headers and timeouts."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from mvllm.common.state import AgentState, CatalogEntry, InstanceState
from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import NodeConfig, RouterConfig, load_config
from mvllm.router.fleet.agents import AgentNode, AgentRoute, agent_stats, no_room_answer, unread_catalogs
from mvllm.router.fleet.registry import Registry
from mvllm.router.fleet.targets import Health, Node
from mvllm.router.policy import (
    TIER_AWAKE,
    TIER_EVICT,
    TIER_FITS,
    TIER_LOADING,
    TIER_NO_ROOM,
    TIER_SLEEPING,
    LeastScore,
    RoundRobin,
    choose_tiered,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "servers.toml"
    path.write_text(text)
    return path


# -- config -------------------------------------------------------------------------------------------


def test_agents_config_parsed_with_defaults_and_token_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_B_TOKEN", "secret-b")
    cfg = load_config(
        write(
            tmp_path,
            '[servers]\nservers = [{ url = "http://s:8000" }]\n'
            '[[agents]]\nurl = "http://gpu-a:7070/"\ntoken = "secret-a"\n'
            '[[agents]]\nurl = "http://gpu-b:7070"\nname = "b"\ntoken_env = "AGENT_B_TOKEN"\n'
            "weight = 2.0\ndrain = true\nload_timeout = 120\n",
        )
    )
    static, a, b = cfg.nodes
    assert static.kind == "static" and static.token is None
    assert (a.kind, a.name, a.url, a.token, a.weight, a.drain, a.load_timeout) == (
        "agent", "gpu-a:7070", "http://gpu-a:7070", "secret-a", 1.0, False, 600.0,
    )
    assert (b.name, b.token, b.weight, b.drain, b.load_timeout) == ("b", "secret-b", 2.0, True, 120.0)
    assert "secret" not in repr(cfg)  # tokens never reach logs through a repr


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[[agents]]\nurl = "http://x:1"\ntoken = "a"\ntoken_env = "B"', "agents[0].token", "not both"),
        ('[[agents]]\nurl = "http://x:1"\ntoken_env = "MVLLM_TEST_NOT_SET"', "agents[0].token_env", "not set"),
        ('[[agents]]\nurl = "http://x:1"\ntoken = ""', "agents[0].token", "empty"),
        ('[[agents]]\ntoken = "a"', "agents[0].url", "required"),
        ('[[agents]]\nurl = "http://x:1/v1"', "agents[0].url", "without /v1"),
        ('[[agents]]\nurl = "http://x:1"\nload_timeout = 0', "agents[0].load_timeout", ">= 1"),
        ('[[agents]]\nurl = "http://x:1"\nweight = 0', "agents[0].weight", "> 0"),
        ('[[agents]]\nurl = "http://x:1"\ncapacity = 4', "agents[0].capacity", "unknown key"),
        ('[servers]\nservers = [{ url = "http://x:1" }]\n[[agents]]\nurl = "http://x:1"\nname = "a"', "agents[0].url", "duplicate"),
        ('[servers]\nservers = [{ url = "http://x:1", name = "a" }]\n[[agents]]\nurl = "http://y:1"\nname = "a"',
         "agents[0].name", "duplicate"),
        ('agents = "http://x:1"', "agents", "[[agents]]"),
    ],
)
def test_agents_config_errors_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert f"key '{key}'" in str(info.value) and words in str(info.value)


# -- tiered choice --------------------------------------------------------------------------------------


@dataclass
class C:
    name: str
    tier: int | None = TIER_AWAKE
    running: float = 0
    waiting: float = 0
    capacity: int = 10
    weight: float = 1.0
    released: bool = False


def test_a_released_replica_gets_requests_only_as_the_last_awake_copy() -> None:
    policy = LeastScore(rng=random.Random(1))
    released = C("released", running=0, released=True)  # idle, yet never chosen while another is awake
    busy = C("busy", running=9)
    for _ in range(20):
        assert choose_tiered(policy, [released, busy, C("cold", TIER_FITS)], "m") is busy
    # The only awake copy left: it serves, ahead of any cold load.
    assert choose_tiered(policy, [released, C("cold", TIER_FITS)], "m") is released
    assert choose_tiered(policy, [released], "m") is released


def test_awake_candidates_win_by_score_whatever_the_cold_ones() -> None:
    policy = LeastScore(rng=random.Random(1))
    busy = C("busy", running=9)
    calm = C("calm", running=6)
    cold = [C("asleep", TIER_SLEEPING), C("fits", TIER_FITS), C("loading", TIER_LOADING)]
    for _ in range(20):
        assert choose_tiered(policy, [busy, *cold, calm], "m") is calm


def test_model_awake_nowhere_goes_loading_then_sleeping_then_fits_then_evict_then_no_room() -> None:
    policy = LeastScore(rng=random.Random(2))
    order = [
        C("loading", TIER_LOADING),
        C("asleep", TIER_SLEEPING),
        C("fits", TIER_FITS),
        C("evict", TIER_EVICT),
        C("no-room", TIER_NO_ROOM),  # a /state's "no room" may be stale: tried last, not skipped
    ]
    pool = [C("failed", None), *reversed(order)]
    for expected in order:
        for _ in range(10):
            assert choose_tiered(policy, pool, "m") is expected
        pool.remove(expected)
    assert choose_tiered(policy, pool, "m") is None  # only a failed engine: no candidate at all
    assert choose_tiered(policy, [], "m") is None
    # An awake node anywhere wins over any agent's cold route, "no room" ones included.
    assert choose_tiered(policy, [C("no-room", TIER_NO_ROOM), C("awake", running=9)], "m").name == "awake"


def test_a_tier_with_several_candidates_is_chosen_by_the_policy() -> None:
    fits = [C("a", TIER_FITS), C("b", TIER_FITS)]
    rr = RoundRobin()
    picks = [choose_tiered(rr, [*fits, C("e", TIER_EVICT)], "m").name for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]


# -- /state into the registry ---------------------------------------------------------------------------

AGENT = NodeConfig("gpu-a", "http://127.0.0.1:7070", kind="agent", token="tok", load_timeout=90)


def entry(name: str, placement: str = "fits", **kw: object) -> CatalogEntry:
    kw.setdefault("served_model_names", [name])
    return CatalogEntry(name=name, model=f"org/{name}", placement=placement, **kw)  # type: ignore[arg-type]


def agent_state(*instances: InstanceState, catalog: list[CatalogEntry]) -> AgentState:
    return AgentState(host="h", engine="sim", time=1.0, started_at=1.0, instances=list(instances), catalog=catalog)


def registry_with_agent() -> tuple[Registry, AgentNode]:
    reg = Registry(RouterConfig(nodes=(NodeConfig("s", "http://127.0.0.1:8000"), AGENT), default_capacity=64))
    node = reg.get("gpu-a")
    assert isinstance(node, AgentNode)
    return reg, node


def apply(reg: Registry, node: AgentNode, st: AgentState, sent_at: float = 100.0) -> None:
    moved = node.apply_state(st, sent_at, sent_at + 0.01)
    if not reg.set_models(node, node.model_cards()) and moved:
        reg.reindex()


STATE = agent_state(
    InstanceState("a", "ready", served_model_names=["a"], loras=["a-sql"], running=3, waiting=2, capacity=8),
    InstanceState("b", "sleeping", served_model_names=["b"], sleep_level=1),
    InstanceState("c", "stopped", served_model_names=["c"]),
    InstanceState("d", "stopped", served_model_names=["d"]),
    InstanceState("e", "failed", served_model_names=["e"], error="crashed"),
    InstanceState("f", "stopped", served_model_names=["f"]),
    catalog=[
        entry("a", "awake", lora_adapters=["a-sql"], max_num_seqs=8),
        entry("b", "sleeping"),
        entry("c", "fits", max_num_seqs=32),
        entry("d", "no_room"),
        entry("e", "fits"),
        entry("f", "evict", evict=["a"]),
    ],
)


def test_state_becomes_routes_in_the_model_index() -> None:
    reg, node = registry_with_agent()
    assert node.kind == "agent" and node.models == frozenset()
    apply(reg, node, STATE)
    routes = {name: reg.nodes_for(name)[0] for name in "abcdef"}
    assert all(isinstance(r, AgentRoute) and r.agent is node for r in routes.values())
    assert reg.nodes_for("a-sql") == (routes["a"],)  # a LoRA adapter routes to its base engine
    tiers = {name: r.tier for name, r in routes.items()}
    assert tiers == {"a": TIER_AWAKE, "b": TIER_SLEEPING, "c": TIER_FITS, "d": TIER_NO_ROOM, "e": None, "f": TIER_EVICT}
    a, c = routes["a"], routes["c"]
    assert (a.name, a.url, a.kind, a.capacity, a.running, a.waiting) == ("gpu-a", AGENT.url, "agent", 8, 3.0, 2.0)
    assert LeastScore().score(a) == pytest.approx((3 + 0.5 * 2) / 8)  # scored exactly as a static node
    assert c.capacity == 32 and routes["b"].capacity == 64  # catalog max_num_seqs, else the default
    # /v1/models lists every catalog name, loadable ones too, LoRA with its parent.
    cards = {c["id"]: c for c in reg.models_document()["data"]}
    assert set(cards) == {"a", "a-sql", "b", "c", "d", "e", "f"}
    assert cards["a-sql"]["parent"] == "a" and cards["c"]["root"] == "org/c"
    assert node.capacity == 8 and node.running == 3.0  # the agent as a whole: its awake engines


def test_a_draining_engine_is_no_candidate_until_the_agent_says_otherwise() -> None:
    reg, node = registry_with_agent()
    drained = agent_state(
        InstanceState("a", "ready", served_model_names=["a"], in_flight=3, draining=True),
        catalog=[entry("a", "awake")],
    )
    apply(reg, node, drained)
    a = reg.nodes_for("a")[0]
    assert a.tier is None and not a.routable(0.0)  # its in-flight requests finish; new ones go elsewhere
    apply(reg, node, agent_state(InstanceState("a", "sleeping", served_model_names=["a"], sleep_level=1),
                                 catalog=[entry("a", "sleeping")]), sent_at=200.0)
    assert a.tier == TIER_SLEEPING  # evicted and resumed: a request may wake it again


def test_routes_are_kept_across_states_and_names_follow_the_catalog() -> None:
    reg, node = registry_with_agent()
    apply(reg, node, STATE)
    a = reg.nodes_for("a")[0]
    a.breaker.on_failure(0.0)
    later = agent_state(
        InstanceState("a", "sleeping", served_model_names=["a"], sleep_level=2),
        InstanceState("g", "stopped", served_model_names=["g"]),
        catalog=[entry("a", "sleeping", lora_adapters=["a-sql"]), entry("g", "fits", served_model_names=["g", "a-sql2"])],
    )
    apply(reg, node, later, sent_at=200.0)
    assert reg.nodes_for("a")[0] is a and a.breaker.failures == 1  # same route object, same breaker
    assert a.tier == TIER_SLEEPING
    assert reg.nodes_for("c") == () and reg.nodes_for("g")[0].instance_name == "g"
    assert reg.nodes_for("a-sql2")[0] is reg.nodes_for("g")[0]


def test_in_flight_counts_on_the_agent_and_a_dispatch_marks_the_route_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import mvllm.router.fleet.agents as agents

    clock = [150.0]
    monkeypatch.setattr(agents.time, "monotonic", lambda: clock[0])
    reg, node = registry_with_agent()
    apply(reg, node, STATE, sent_at=100.0)
    c = reg.nodes_for("c")[0]
    assert c.tier == TIER_FITS
    c.in_flight += 1  # what the proxy does when it sends a request there
    assert node.in_flight == 1 and c.tier == TIER_LOADING and c.running == 1.0
    c.in_flight -= 1
    assert node.in_flight == 0
    assert c.tier == TIER_LOADING  # sent after the last /state was asked for: it is loading there
    apply(reg, node, STATE, sent_at=160.0)  # a /state asked for after that request says "stopped"
    assert c.tier == TIER_FITS


def test_routable_follows_the_agent_and_its_own_breaker() -> None:
    reg, node = registry_with_agent()
    apply(reg, node, STATE)
    a, c = reg.nodes_for("a")[0], reg.nodes_for("c")[0]
    assert a.routable(0.0) and c.routable(0.0) and reg.nodes_for("d")[0].routable(0.0)  # "no room": asked last
    assert not reg.nodes_for("e")[0].routable(0.0)  # its engine failed
    for _ in range(2):
        a.breaker.on_failure(1.0)
    assert not a.routable(1.0) and c.routable(1.0)  # one engine ejected, not the whole agent
    node.health = Health.DOWN
    assert not c.routable(1.0) and c.health is Health.DOWN
    node.health = Health.UP
    node.fatal_error = "the agent rejected the router's token (HTTP 401 on /state)"
    assert not node.routable(1.0) and not c.routable(1.0)
    assert node.error == node.fatal_error
    node.fatal_error = None
    node.admin_drain = True
    assert c.draining and not c.routable(1.0)


def test_a_removed_agent_is_forgotten_when_its_last_request_ends() -> None:
    reg, node = registry_with_agent()
    apply(reg, node, STATE)
    route = reg.nodes_for("a")[0]
    route.in_flight += 1
    diff = reg.apply(RouterConfig(nodes=(NodeConfig("s", "http://127.0.0.1:8000"),)))
    assert diff.removed == [node] and route.retired and node in reg.retiring()
    assert reg.nodes_for("a") == ()
    route.in_flight -= 1
    reg.release(route)
    assert node not in reg.retiring()


def test_requests_carry_the_agent_token_never_the_client_credentials() -> None:
    _reg, node = registry_with_agent()
    client = CIMultiDict({"Authorization": "Bearer client-key", "X-Request-Id": "r1", "Content-Type": "application/json"})
    out = node.upstream_headers(client)
    assert out.getall("Authorization") == ["Bearer tok"] and out["X-Request-Id"] == "r1"
    assert client["Authorization"] == "Bearer client-key"  # the shared per-request copy is left alone
    open_agent = AgentNode(NodeConfig("o", "http://127.0.0.1:7071", kind="agent"), node.breaker, 8)
    assert "Authorization" not in open_agent.upstream_headers(client)


def test_timeouts_leave_room_for_a_load() -> None:
    _reg, node = registry_with_agent()
    base = aiohttp.ClientTimeout(total=300, sock_connect=3, sock_read=10)
    t = node.upstream_timeout(base)
    assert (t.total, t.sock_connect, t.sock_read) == (390, 3, 90)
    assert node.upstream_timeout(base) is t  # built once per config


def test_load_stats_part_and_unknown_catalog_hint() -> None:
    reg, node = registry_with_agent()
    assert "gpu-a: not read yet" in unread_catalogs(reg.nodes())
    apply(reg, node, STATE)
    assert unread_catalogs(reg.nodes()) == ""
    part = agent_stats(node, LeastScore(), 100.5)
    assert part["error"] is None
    insts = {i["name"]: i for i in part["agent"]["instances"]}
    assert insts["b"]["state"] == "sleeping" and insts["b"]["sleep_level"] == 1
    assert insts["a"]["router"]["rank"] == "awake" and insts["a"]["router"]["score"] == pytest.approx(0.5)
    assert insts["d"]["router"]["rank"] == "no_room" and insts["e"]["router"]["rank"] == "unavailable"
    assert [c["name"] for c in part["agent"]["catalog"]] == list("abcdef")
    assert part["agent"]["host"] == "h" and part["agent"]["state_age_s"] == pytest.approx(0.49)


def test_static_nodes_are_their_own_route_and_always_awake() -> None:
    reg = Registry(RouterConfig(nodes=(NodeConfig("s", "http://127.0.0.1:8000", models=("m",)),)))
    s = reg.get("s")
    assert isinstance(s, Node) and not isinstance(s, AgentNode)
    assert reg.nodes_for("m") == (s,) and s.tier == TIER_AWAKE and s.agent is None


# -- "no room on any agent" ------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    node: object


def no_room(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "service_unavailable", "code": "no_room"}}).encode()


def test_every_agent_answering_no_room_makes_one_message_naming_each() -> None:
    reg, node = registry_with_agent()
    apply(reg, node, STATE)
    other = AgentNode(NodeConfig("gpu-b", "http://127.0.0.1:7071", kind="agent"), node.breaker, 8)
    other.apply_state(STATE, 100.0, 100.0)
    d_a, d_b = node.route_for("d"), other.route_for("d")
    resp = no_room_answer(
        "d",
        [
            Answer(503, {"Retry-After": "10"}, no_room("not enough GPU memory for d (GPU 0: 3.0 GiB short)"), d_a),
            Answer(503, {"Retry-After": "4"}, no_room("not enough GPU memory for d yet: x still answering"), d_b),
        ],
    )
    assert resp is not None and resp.status == 503 and resp.headers["Retry-After"] == "4"
    err = json.loads(resp.body)["error"]
    assert err["code"] == "no_room" and err["type"] == "service_unavailable"
    assert err["message"] == (
        "no room on any agent for model `d`: gpu-a: not enough GPU memory for d (GPU 0: 3.0 GiB short); "
        "gpu-b: not enough GPU memory for d yet: x still answering"
    )
    # Anything else among the answers (a load timeout, a static server's 503, a 500): not "no room".
    busy = json.dumps({"error": {"message": "still starting", "code": 503}}).encode()
    static = reg.get("s")
    assert no_room_answer("d", [Answer(503, {}, no_room("full"), d_a), Answer(503, {}, busy, d_b)]) is None
    assert no_room_answer("d", [Answer(503, {}, no_room("full"), static)]) is None
    assert no_room_answer("d", [Answer(500, {}, no_room("full"), d_a)]) is None
    assert no_room_answer("d", [Answer(503, {}, b"<html>busy</html>", d_a)]) is None
    assert no_room_answer("d", []) is None


def test_an_engine_that_sleeps_wakes_restarts_or_stops_marks_the_agents_cache_lost() -> None:
    reg, node = registry_with_agent()
    ready = InstanceState("a", "ready", served_model_names=["a"], pid=10, running=1)
    catalog = [entry("a", "awake")]
    apply(reg, node, agent_state(ready, catalog=catalog))
    assert not node.cache_lost  # the first /state: nothing was cached before it
    apply(reg, node, agent_state(replace(ready, running=3), catalog=catalog))
    assert not node.cache_lost  # only its load changed: the same engine, the same cache
    for changed in (
        replace(ready, state="sleeping", sleep_level=1),  # slept: level 1 and 2 drop the KV cache
        replace(ready, state="ready"),  # woke
        replace(ready, pid=11, restarts=1),  # crashed and restarted
        replace(ready, pid=11, restarts=1, state="stopped"),  # unloaded
    ):
        apply(reg, node, agent_state(changed, catalog=catalog))
        assert node.cache_lost, changed
        apply(reg, node, agent_state(changed, catalog=catalog))
        assert not node.cache_lost, changed  # the same /state again: no new loss
    apply(reg, node, agent_state(catalog=[]))  # the entry left the catalog
    assert node.cache_lost


def test_a_load_under_way_tells_how_long_until_it_should_be_done() -> None:
    from mvllm.common.state import LoadProgress, LoadTimings
    from mvllm.router.fleet.agents import load_wait_s

    reg, node = registry_with_agent()
    loading = InstanceState(
        "c", "starting", served_model_names=["c"],
        load=LoadProgress("cold", "weights", 1.0, 2.0, 30.0, 12.5, warm=True),
        timings=LoadTimings(cold_start_s=40.0, cold_start_phases={"spawned": 0.0, "weights": 25.0}),
    )  # fmt: skip
    # Through the /state document, as the router reads it.
    doc = json.loads(json.dumps(agent_state(loading, STATE.instances[0], catalog=STATE.catalog).to_dict()))
    st = AgentState.from_dict(doc)
    assert st.instance("c").load == loading.load and st.instance("c").timings == loading.timings
    assert st.instance("a").load is None and st.instance("a").timings == LoadTimings()
    apply(reg, node, st, sent_at=100.0)  # arrived at 100.01
    c, a = reg.nodes_for("c")[0], reg.nodes_for("a")[0]
    assert load_wait_s(c, 102.01) == pytest.approx(10.5)  # the agent's prediction less the document's age
    assert load_wait_s(c, 200.0) == 0.0
    assert load_wait_s(a, 102.0) is None  # awake: nothing under way
    assert load_wait_s(reg.get("s"), 102.0) is None  # a static node never loads
