"""fleet/targets: what the proxy asks of a target (static server or agent engine route), and the
one in-flight correction of scraped load both use."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

from mvllm.common.state import READY, AgentState, CatalogEntry, InstanceState
from mvllm.router.breaker import Breaker
from mvllm.router.config import NodeConfig, RouterConfig
from mvllm.router.fleet.agents import AgentNode
from mvllm.router.fleet.registry import Registry
from mvllm.router.fleet.targets import Node

BASE = aiohttp.ClientTimeout(total=60, sock_connect=2, sock_read=30)


def client_headers() -> CIMultiDict[str]:
    return CIMultiDict({"Authorization": "Bearer client-key", "X-Api-Key": "client-key", "Accept": "*/*"})


def test_static_server_headers_timeout_and_owner() -> None:
    plain = Node(NodeConfig("s", "http://127.0.0.1:8000"), Breaker(), 8)
    headers = client_headers()
    assert plain.upstream_headers(headers) is headers  # nothing to add: no copy on the hot path
    assert plain.upstream_timeout(BASE) is BASE and plain.owner is plain and not plain.via_agent
    keyed = Node(NodeConfig("k", "http://127.0.0.1:8001", token="node-key"), Breaker(), 8)
    out = keyed.upstream_headers(headers)
    assert out["Authorization"] == "Bearer node-key" and "X-Api-Key" not in out and out["Accept"] == "*/*"
    assert headers["Authorization"] == "Bearer client-key"  # the client's headers are not changed


def test_engine_route_speaks_for_its_agent() -> None:
    cfg = NodeConfig("gpu-a", "http://127.0.0.1:7070", kind="agent", token="agent-token", load_timeout=120)
    reg = Registry(RouterConfig(nodes=(cfg,), default_capacity=8))
    agent = reg.get("gpu-a")
    assert isinstance(agent, AgentNode) and agent.via_agent
    st = AgentState(
        host="h", engine="sim", time=1.0, started_at=1.0,
        instances=[InstanceState(name="m", state=READY, running=3, waiting=1, capacity=4)],
        catalog=[CatalogEntry(name="m", model="org/m", served_model_names=["m"])],
    )  # fmt: skip
    agent.apply_state(st, 1.0, 1.0)
    reg.set_models(agent, agent.model_cards())
    (route,) = reg.nodes_for("m")
    assert route.via_agent and route.owner is agent and route.name == "gpu-a"
    out = route.upstream_headers(client_headers())
    assert out["Authorization"] == "Bearer agent-token"
    timeout = route.upstream_timeout(BASE)
    assert timeout.total == 180 and timeout.sock_read == 120  # room for a load
    # The in-flight correction: two more of ours since the /state; capacity 4 caps running.
    route.in_flight += 2
    assert (route.running, route.waiting) == (4.0, 2.0) and agent.in_flight == 2
    route.in_flight -= 2
    assert (route.running, route.waiting) == (3.0, 1.0)
