"""Replicas of a model: every copy of it the router knows (an agent's engine for it, or a static
server listing it), grouped by model, with the state the autoscaler, /admin/models and the
mvllm_model_replicas gauge report.

Replica states (mvllm.router.autoscale.REPLICA_STATES): awake (ready, routed to), loading
(starting or waking), sleeping, draining (awake but released by the autoscaler: no new request
while another copy is awake). Stopped, stopping and failed engines are no replica.
"""

from __future__ import annotations

from dataclasses import dataclass

from mvllm.common.state import READY, SLEEPING, STARTING
from mvllm.router.fleet.agents import AgentNode, AgentRoute
from mvllm.router.fleet.registry import Registry
from mvllm.router.fleet.targets import Node, Target


@dataclass(frozen=True)
class ReplicaView:
    model: str
    target: Target
    state: str | None  # None: no replica (stopped, stopping, failed)

    @property
    def agent(self) -> str:
        return self.target.name

    @property
    def route(self) -> AgentRoute | None:
        return self.target if isinstance(self.target, AgentRoute) else None


def model_key(route: AgentRoute) -> str:
    """The name a catalog entry's replicas are grouped under: its first served name (LoRA
    adapters and aliases share their base engine, hence its replicas)."""
    e = route.entry
    return e.served_model_names[0] if e.served_model_names else e.name


def route_state(route: AgentRoute, loading: bool = False) -> str | None:
    """The replica state of one agent engine; `loading`: a load or wake of ours is under way."""
    state = route.state
    if state == READY:
        return "draining" if route.released else "awake"
    if state == STARTING or loading:
        return "loading"
    if state == SLEEPING:
        return "sleeping"
    return None


def by_model(registry: Registry) -> dict[str, list[ReplicaView]]:
    """Every model's copies, agents' engines and static servers, in config order; a model whose
    every copy is stopped is listed with its (stateless) candidates, so it shows with 0 replicas."""
    out: dict[str, list[ReplicaView]] = {}
    for node in registry.nodes():
        if isinstance(node, AgentNode):
            for route in node.routes.values():
                out.setdefault(model_key(route), []).append(ReplicaView(model_key(route), route, route_state(route)))
        else:
            for m in sorted(node.models):
                out.setdefault(m, []).append(ReplicaView(m, node, _static_state(node)))
    return out


def _static_state(node: Node) -> str:
    # A static server is always awake; drained, it takes no new request (as a released replica).
    return "draining" if node.draining else "awake"
