"""The autoscale loop's wiring without a network: agents' /state into observations, a scale-down
releasing the right route, a reload disabling autoscale, replica views and their gauge."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aiohttp

from mvllm.common.state import AgentState, CatalogEntry, InstanceState
from mvllm.router.autoscale import AutoscaleConfig
from mvllm.router.config import NodeConfig, RouterConfig
from mvllm.router.fleet import replicas
from mvllm.router.fleet.agents import AgentNode
from mvllm.router.fleet.autoscaler import Autoscaler
from mvllm.router.policy import choose_tiered
from mvllm.router.state import RouterState

ON = AutoscaleConfig(enabled=True, scale_up_after=0.0, scale_down_after=0.0)


def state_of(*instances: InstanceState) -> AgentState:
    catalog = [CatalogEntry(name=i.name, model=f"org/{i.name}", served_model_names=[i.name], max_num_seqs=4) for i in instances]
    return AgentState(host="h", engine="sim", time=1.0, started_at=1.0, instances=list(instances), catalog=catalog)


def router(*states: tuple[str, str, int]) -> tuple[RouterState, dict[str, AgentNode]]:
    """Agents named by `states` (name, state of model m, running), autoscale ON; port 9 (discard)
    of loopback as their address: nothing listens there, a call fails at once."""
    nodes = tuple(NodeConfig(n, f"http://127.0.0.{1 + i}:9", kind="agent") for i, (n, _, _) in enumerate(states))
    rs = RouterState.create(RouterConfig(nodes=nodes, autoscale=ON))
    agents = {}
    for name, st, running in states:
        node = rs.registry.get(name)
        assert isinstance(node, AgentNode)
        node.apply_state(state_of(InstanceState("m", st, served_model_names=["m"], running=running, capacity=4)), 1.0, 1.0)
        rs.registry.set_models(node, node.model_cards())
        agents[name] = node
    return rs, agents


def test_an_idle_second_replica_is_released_then_routing_skips_it_and_a_disable_returns_it() -> None:
    rs, agents = router(("gpu-b", "ready", 0), ("gpu-a", "ready", 0), ("gpu-c", "sleeping", 0))
    probed: list[object] = []
    scaler = Autoscaler(rs, probed.append)
    scaler.step(10.0)
    a, b = agents["gpu-a"].routes["m"], agents["gpu-b"].routes["m"]
    assert a.released and not b.released  # ties of score broken by agent name
    views = {v.agent: v.state for v in replicas.by_model(rs.registry)["m"]}
    assert views == {"gpu-a": "draining", "gpu-b": "awake", "gpu-c": "sleeping"}
    assert choose_tiered(rs.policy, list(rs.registry.nodes_for("m")), "m") is b
    scaler.step(11.0)  # one awake replica left: the floor holds
    assert not b.released
    text = rs.metrics.render().decode()
    assert 'mvllm_model_replicas{model="m",state="draining"} 1.0' in text
    assert 'mvllm_model_replicas{model="m",state="awake"} 1.0' in text
    assert 'mvllm_model_replicas{model="m",state="sleeping"} 1.0' in text
    assert 'mvllm_model_replicas{model="m",state="loading"} 0.0' in text

    rs.apply_config(replace(rs.config, autoscale=replace(ON, enabled=False)))  # what a reload does
    scaler.step(12.0)
    assert not a.released and scaler.policy.config.enabled is False
    assert not probed  # a scale-down calls no agent


def test_a_released_replica_that_sleeps_is_an_ordinary_copy_again() -> None:
    rs, agents = router(("gpu-a", "ready", 0), ("gpu-b", "ready", 0))
    Autoscaler(rs, lambda nodes: None).step(1.0)
    route = agents["gpu-a"].routes["m"]
    assert route.released
    agents["gpu-a"].apply_state(state_of(InstanceState("m", "sleeping", served_model_names=["m"])), 2.0, 2.0)
    assert not route.released


def test_busy_replicas_are_not_released_and_a_loaded_model_is_observed_with_its_scores() -> None:
    rs, agents = router(("gpu-a", "ready", 4), ("gpu-b", "ready", 3))
    scaler = Autoscaler(rs, lambda nodes: None)
    (obs,) = scaler.observe(1.0)
    assert obs.model == "m" and {r.agent: (r.state, r.score) for r in obs.replicas} == {
        "gpu-a": ("awake", 1.0),
        "gpu-b": ("awake", 0.75),
    }
    assert obs.used is False
    scaler.step(1.0)
    assert not any(r.released for a in agents.values() for r in a.routes.values())


async def test_scale_up_wakes_a_sleeping_copy_before_a_cold_load_and_a_failed_call_is_an_event(caplog) -> None:
    caplog.set_level(logging.INFO, logger="mvllm.router.autoscale")
    rs, agents = router(("gpu-a", "ready", 4), ("gpu-b", "stopped", 0), ("gpu-c", "sleeping", 0))
    agents["gpu-a"].routes["m"].record_load(4.0, 4.0)  # score (4 + 0.5 * 4) / 4 = 1.5
    async with aiohttp.ClientSession() as session:
        rs.session = session
        scaler = Autoscaler(rs, lambda nodes: None)
        scaler.step(1.0)
        assert set(scaler.pending) == {("m", "gpu-c")}  # the sleeping copy, not the cold load on gpu-b
        (obs,) = scaler.observe(1.0)
        assert {r.agent: r.state for r in obs.replicas}["gpu-c"] == "loading"  # no second step meanwhile
        for _ in range(100):
            if not scaler.pending:
                break
            await asyncio.sleep(0.02)
        await scaler.close()
    assert not scaler.pending  # the wake failed: the next scale-up may try again
    messages = [r.getMessage() for r in caplog.records if r.name == "mvllm.router.autoscale"]
    assert any(m.startswith("autoscale: scale up m: wake on gpu-c (sleeping; mean score 1.50") for m in messages), messages
    assert any(m.startswith("autoscale: wake of m on gpu-c failed") for m in messages), messages
