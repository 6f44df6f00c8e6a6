"""The router's model of node agents (`mvllm agent`): each agent's last `GET /state` turned into
registry entries (the HTTP calls themselves are in agent_client.py).

An agent is one node of the registry (`AgentNode`, kind "agent": health, drain, token, what its
/state said). The model index lists, for each name in its catalog, the agent's `AgentRoute` for
the catalog entry serving that name: the unit the proxy sends a request to and the policy scores.
A route is awake (scored exactly like a static node, with the engine's running/waiting from
/state and capacity = its max_num_seqs) or cold, and then ranked loading > sleeping > fits >
evict > no_room (policy.engine_tier and choose_tiered; "no room" in a /state is not final, see there). Requests
to an agent carry its token in place of the client's Authorization, and may wait up to
`load_timeout` for their first byte (a load).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from mvllm.common.errors import error_response
from mvllm.common.state import (
    READY,
    STOPPED,
    AgentState,
    CatalogEntry,
    InstanceState,
)
from mvllm.router.breaker import Breaker
from mvllm.router.config import NodeConfig
from mvllm.router.fleet.targets import Health, LoadCounter, Node, Target
from mvllm.router.policy import TIER_NAMES, Policy, engine_tier

log = logging.getLogger("mvllm.router.agents")

# Answers of an agent that mean the router's token is wrong: a config error, not a passing fault.
AUTH_STATUSES = frozenset({401, 403})
# The error code of an agent's 503 when it has no GPU memory for the model, even after evicting
# idle models and waiting (up to its load_timeout) for busy ones (mvllm.agent.errors.NoRoom).
NO_ROOM_CODE = "no_room"


class AgentRoute(LoadCounter):
    """One catalog entry of one agent as a proxy target (the engine behind the agent serving it).

    It implements targets.Target (name, url, kind, weight, in_flight, breaker, health, draining,
    retired, routable, running/waiting/capacity, tier, upstream headers and timeout). Its breaker
    is its own, so one failing engine ejects only itself; the agent's health, drain and removal
    apply to every route of the agent.
    """

    __slots__ = (
        "_in_flight",
        "agent",
        "breaker",
        "dispatched_at",
        "entry",
        "instance",
        "released",
    )
    kind = "agent"
    via_agent = True

    def __init__(self, agent: AgentNode, entry: CatalogEntry, breaker: Breaker) -> None:
        self.agent = agent
        self.entry = entry
        self.instance: InstanceState | None = None
        self.breaker = breaker
        self._in_flight = 0
        self._init_load()
        self.dispatched_at = 0.0  # monotonic time of the last request sent here
        # Released by the autoscaler (router/fleet/autoscaler.py): awake, but given no new request
        # while another replica of its model is awake (policy.choose_tiered); the agent's idle
        # timers then sleep and unload it. Cleared once it is no longer awake.
        self.released = False

    def __repr__(self) -> str:
        return f"AgentRoute({self.agent.name!r}, {self.instance_name!r}, {self.state})"

    # -- what the proxy reads of a target -------------------------------------------------------

    @property
    def owner(self) -> AgentNode:
        return self.agent

    def upstream_headers(self, client: CIMultiDict[str]) -> CIMultiDict[str]:
        return self.agent.upstream_headers(client)

    def upstream_timeout(self, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        return self.agent.upstream_timeout(base)

    @property
    def name(self) -> str:
        return self.agent.name  # the x-mvllm-node header and metric labels name the agent

    @property
    def url(self) -> str:
        return self.agent.url

    @property
    def cfg(self) -> NodeConfig:
        return self.agent.cfg

    @property
    def weight(self) -> float:
        return self.agent.weight

    @property
    def draining(self) -> bool:
        return self.agent.draining

    @property
    def retired(self) -> bool:
        return self.agent.retired

    @property
    def health(self) -> Health:
        return self.agent.health

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        delta = value - self._in_flight
        self._in_flight = value
        self.agent.in_flight += delta  # the agent's total: drain, retire and /load-stats use it
        if delta > 0:
            self.dispatched_at = time.monotonic()

    # -- load and rank -----------------------------------------------------------------------------

    @property
    def instance_name(self) -> str:
        return self.entry.name

    @property
    def names(self) -> list[str]:
        return self.entry.routable_names()

    @property
    def state(self) -> str:
        return self.instance.state if self.instance is not None else STOPPED

    @property
    def capacity(self) -> int:
        cap = self.instance.capacity if self.instance is not None else None
        return cap or self.entry.max_num_seqs or self.agent.default_capacity

    @property
    def tier(self) -> int | None:
        """Where this model stands on this agent (policy.engine_tier); None: not a candidate."""
        if self.instance is not None and self.instance.draining:
            return None  # drained to make room for another model: the agent refuses new requests
        # Requests of ours sent since the agent's last /state was asked for (or still waiting)
        # make it load or wake: they count as a load under way.
        pending = self._in_flight > 0 or self.dispatched_at > self.agent.state_sent_at
        return engine_tier(self.state, self.entry.placement, pending)

    def routable(self, now: float) -> bool:
        return self.agent.routable(now) and self.breaker.available(now) and self.tier is not None

    def update(self, entry: CatalogEntry, instance: InstanceState | None) -> bool:
        """Take this entry's part of a /state; True when the engine's KV cache is not the one it
        had (it slept, woke, stopped, started or restarted since the last /state)."""
        old = self.instance
        lost = old is not None and (
            instance is None
            or instance.state != old.state
            or instance.pid != old.pid
            or instance.restarts != old.restarts
            or instance.sleep_level != old.sleep_level
        )
        self.entry = entry
        self.instance = instance
        if self.released and self.state != READY:
            self.released = False  # slept or unloaded: an ordinary copy again
        if instance is not None:
            self.record_load(float(instance.running), float(instance.waiting))
        else:
            self.record_load(0.0, 0.0)
        return lost


class AgentNode(Node):
    """A node agent in the registry: its health, breaker, drain and token as any node, plus the
    last `/state` it sent and one AgentRoute per catalog entry."""

    __slots__ = (
        "_timeout",
        "_timeout_key",
        "by_model",
        "cache_lost",
        "fatal_error",
        "routes",
        "state",
        "state_at",
        "state_sent_at",
        "unreachable",
    )

    def __init__(self, cfg: NodeConfig, breaker: Breaker, default_capacity: int) -> None:
        super().__init__(cfg, breaker, default_capacity)
        self.routes: dict[str, AgentRoute] = {}  # by catalog name
        self.by_model: dict[str, AgentRoute] = {}  # by every name a client may send
        self.state: AgentState | None = None
        self.state_at: float | None = None  # monotonic time the last /state arrived
        self.state_sent_at = 0.0  # monotonic time it was asked for
        self.fatal_error: str | None = None  # the agent refuses us (token, schema): not routable
        self.unreachable = False
        self.cache_lost = False  # the last /state showed an engine's KV cache gone (AgentRoute.update)
        self._timeout: aiohttp.ClientTimeout | None = None
        self._timeout_key: tuple[Any, float] | None = None

    via_agent = True

    def __repr__(self) -> str:
        return f"AgentNode({self.name!r}, {self.url!r})"

    def route_for(self, model: str) -> AgentRoute:
        return self.by_model[model]

    def routable(self, now: float) -> bool:
        return self.fatal_error is None and super().routable(now)

    # The agent as a whole, for /load-stats and the node gauges: its awake engines together.
    @property
    def running(self) -> float:
        return sum(r.running for r in self.routes.values())

    @property
    def waiting(self) -> float:
        return sum(r.waiting for r in self.routes.values())

    @property
    def capacity(self) -> int:
        awake = [r.capacity for r in self.routes.values() if r.state == READY]
        return sum(awake) if awake else self.default_capacity

    @property
    def error(self) -> str | None:
        """Why this agent cannot be used, or what went wrong reading it last, for operators."""
        if self.fatal_error:
            return self.fatal_error
        if self.health is Health.DOWN and self.health_error:
            return self.health_error
        return self.scrape_error

    # -- requests to the agent ------------------------------------------------------------------

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else {}

    def upstream_headers(self, client: CIMultiDict[str]) -> CIMultiDict[str]:
        """The client's headers with the agent's token in place of the client's own credentials."""
        out = client.copy()
        out.popall("Authorization", None)
        if self.cfg.token:
            out["Authorization"] = f"Bearer {self.cfg.token}"
        return out

    def upstream_timeout(self, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        """The router's timeouts, with room for a load: the answer may begin `load_timeout` late."""
        lt = self.cfg.load_timeout
        key = (base, lt)
        if self._timeout is None or self._timeout_key != key:
            self._timeout = aiohttp.ClientTimeout(
                total=base.total + lt if base.total else None,
                sock_connect=base.sock_connect,
                sock_read=max(base.sock_read or 0.0, lt),
            )
            self._timeout_key = key
        return self._timeout

    # -- /state ---------------------------------------------------------------------------------

    def apply_state(self, st: AgentState, sent_at: float, now: float) -> bool:
        """Take a new /state; True when the names it serves moved between routes (reindex)."""
        instances = {i.name: i for i in st.instances}
        template = self.breaker
        routes: dict[str, AgentRoute] = {}
        lost = False
        for entry in st.catalog:
            route = self.routes.get(entry.name)
            if route is None:
                route = AgentRoute(
                    self, entry, Breaker(template.failure_threshold, template.cooldown, template.success_threshold)
                )
            else:
                route.breaker.configure(template.failure_threshold, template.cooldown, template.success_threshold)
            lost = route.update(entry, instances.get(entry.name)) or lost
            routes[entry.name] = route
        self.cache_lost = lost or any(r.instance is not None for n, r in self.routes.items() if n not in routes)
        by_model: dict[str, AgentRoute] = {}
        for route in routes.values():
            for name in route.names:
                by_model.setdefault(name, route)
        moved = by_model.keys() != self.by_model.keys() or any(
            self.by_model[m] is not r for m, r in by_model.items()
        )
        self.routes = routes
        self.by_model = by_model
        self.state = st
        self.state_at = now
        self.state_sent_at = sent_at
        self.last_scrape = now
        self.scrape_error = None
        self.per_model = {
            r.entry.served_model_names[0] if r.entry.served_model_names else r.instance_name: (r.running, r.waiting)
            for r in routes.values()
            if r.state == READY
        }
        return moved

    def model_cards(self) -> list[dict[str, Any]]:
        """/v1/models cards for every name of the catalog, loadable ones included."""
        created = int(self.state.started_at) if self.state is not None else int(time.time())
        cards = []
        for route in self.routes.values():
            e = route.entry
            base = e.served_model_names[0] if e.served_model_names else e.name
            for name in e.served_model_names:
                cards.append(_card(name, e.model, None, e.max_model_len if isinstance(e.max_model_len, int) else None, created))
            for name in e.lora_adapters:
                cards.append(_card(name, name, base, None, created))
        return cards


def _card(name: str, root: str, parent: str | None, max_model_len: int | None, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "mvllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [],
    }


class FailedAnswer(Protocol):
    """What the proxy keeps of a node's failed answer (proxy.UpstreamAnswer)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    node: Target


def no_room_answer(model: str, answers: Sequence[FailedAnswer]) -> web.Response | None:
    """The client's 503 when every node tried was an agent answering "no room" for `model`: one
    message with each agent's reason (rather than a "no healthy node" that sends operators looking
    for a fault), Retry-After the soonest any agent gave. None when any answer was something else."""
    reasons = []
    waits = []
    for a in answers:
        if a.status != 503 or not a.node.via_agent:
            return None
        try:
            err = json.loads(a.body).get("error")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
        if not isinstance(err, dict) or err.get("code") != NO_ROOM_CODE:
            return None
        reasons.append(f"{a.node.name}: {err.get('message') or 'no room'}")
        try:
            waits.append(float(a.headers.get("Retry-After", "")))
        except ValueError:
            pass
    if not reasons:
        return None
    retry_after = max(1, math.ceil(min(waits))) if waits else 1
    return error_response(
        503,
        f"no room on any agent for model `{model}`: {'; '.join(reasons)}",
        code=NO_ROOM_CODE,
        headers={"Retry-After": str(retry_after)},
    )


def load_wait_s(target: Target, now: float) -> float | None:
    """Seconds until the load or wake of `target`'s model under way on its agent should be done, by
    the agent's prediction in its last /state less that document's age; None when none is under way
    (or the agent predicts nothing)."""
    if not isinstance(target, AgentRoute) or target.instance is None or target.instance.load is None:
        return None
    left = target.instance.load.remaining_s
    if left is None:
        return None
    seen = target.agent.state_at
    return max(0.0, left - (now - seen)) if seen is not None else left


def unread_catalogs(nodes: Iterable[Node]) -> str:
    """For a 404: the agents whose catalog is unknown (never read), since the model may be theirs."""
    agents = [cast(AgentNode, n) for n in nodes if n.via_agent]
    unread = [f"{n.name}: {n.error or 'not read yet'}" for n in agents if n.state is None]
    return f" (catalog unknown for agent {'; '.join(unread)})" if unread else ""


# -- views ---------------------------------------------------------------------------------------------


def agent_stats(node: AgentNode, policy: Policy, now: float) -> dict[str, Any]:
    """What /load-stats adds to an agent's entry: its error, and under `agent` the facts of its
    last /state (GPUs, instances with the router's view of each, catalog)."""
    st = node.state
    instances = []
    if st is not None:
        for inst in st.instances:
            d = inst.to_dict()
            route = node.routes.get(inst.name)
            if route is not None:
                tier = route.tier
                score = policy.score(route) if route.state == READY else None
                d["router"] = {
                    "in_flight": route.in_flight,
                    "score": round(score, 4) if score is not None and score != float("inf") else None,
                    "rank": TIER_NAMES.get(tier, "unavailable") if tier is not None else "unavailable",
                    "breaker": route.breaker.state.value,
                    "routable": route.routable(now),
                    "released": route.released,
                }
            instances.append(d)
    return {
        "error": node.error,
        "agent": {
            "host": st.host if st else None,
            "engine": st.engine if st else None,
            "version": st.agent if st else None,
            "state_version": st.version if st else None,
            "state_age_s": round(now - node.state_at, 3) if node.state_at is not None else None,
            "gpus": [g.to_dict() for g in st.gpus] if st else [],
            "instances": instances,
            "catalog": [c.to_dict() for c in st.catalog] if st else [],
            "stale_engines": [s.__dict__ for s in st.stale_engines] if st else [],
        },
    }
