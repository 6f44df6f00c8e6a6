"""The router's side of node agents (`mvllm agent`): each agent's `GET /state` read on the scrape
cycle and turned into registry entries, and the client of the agents' lifecycle API.

An agent is one node of the registry (`AgentNode`, kind "agent": health, drain, token, what its
/state said). The model index lists, for each name in its catalog, the agent's `AgentRoute` for
the catalog entry serving that name: the unit the proxy sends a request to and the policy scores.
A route is awake (scored exactly like a static node, with the engine's running/waiting from
/state and capacity = its max_num_seqs) or cold, and then ranked loading > sleeping > fits >
evict > no_room (policy.choose_tiered; "no room" in a /state is not final, see there). Requests
to an agent carry its token in place of the client's Authorization, and may wait up to
`load_timeout` for their first byte (a load).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from mvllm.common.errors import error_response
from mvllm.common.state import (
    FAILED,
    PLACEMENT_EVICT,
    PLACEMENT_NO_ROOM,
    READY,
    SLEEPING,
    STARTING,
    STOPPED,
    AgentState,
    CatalogEntry,
    InstanceState,
    StateVersionError,
)
from mvllm.router.breaker import Breaker
from mvllm.router.config import NodeConfig
from mvllm.router.fleet.registry import Health, Node
from mvllm.router.policy import (
    TIER_AWAKE,
    TIER_EVICT,
    TIER_FITS,
    TIER_LOADING,
    TIER_NAMES,
    TIER_NO_ROOM,
    TIER_SLEEPING,
    Policy,
)
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.agents")

# Answers of an agent that mean the router's token is wrong: a config error, not a passing fault.
AUTH_STATUSES = frozenset({401, 403})
# The error code of an agent's 503 when it has no GPU memory for the model, even after evicting
# idle models and waiting (up to its load_timeout) for busy ones (mvllm.agent.errors.NoRoom).
NO_ROOM_CODE = "no_room"


class AgentRoute:
    """One catalog entry of one agent as a proxy target (the engine behind the agent serving it).

    It offers what the proxy and the policy use of a Node (name, url, kind, weight, in_flight,
    breaker, health, draining, retired, routable, running/waiting/capacity) plus its `tier`. Its
    breaker is its own, so one failing engine ejects only itself; the agent's health, drain and
    removal apply to every route of the agent.
    """

    __slots__ = (
        "_in_flight",
        "agent",
        "breaker",
        "dispatched_at",
        "entry",
        "in_flight_at_scrape",
        "instance",
        "scraped_running",
        "scraped_waiting",
    )
    kind = "agent"

    def __init__(self, agent: AgentNode, entry: CatalogEntry, breaker: Breaker) -> None:
        self.agent = agent
        self.entry = entry
        self.instance: InstanceState | None = None
        self.breaker = breaker
        self._in_flight = 0
        self.in_flight_at_scrape = 0
        self.scraped_running = 0.0
        self.scraped_waiting = 0.0
        self.dispatched_at = 0.0  # monotonic time of the last request sent here

    def __repr__(self) -> str:
        return f"AgentRoute({self.agent.name!r}, {self.instance_name!r}, {self.state})"

    # -- what the proxy reads of a node ---------------------------------------------------------

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
    def running(self) -> float:
        r = self.scraped_running + (self._in_flight - self.in_flight_at_scrape)
        if r < 0:
            return 0.0
        cap = self.capacity
        return float(cap) if r > cap else r

    @property
    def waiting(self) -> float:
        r = self.scraped_running + (self._in_flight - self.in_flight_at_scrape)
        over = r - self.capacity
        return self.scraped_waiting + over if over > 0 else self.scraped_waiting

    @property
    def tier(self) -> int | None:
        """Where this model stands on this agent (policy.choose_tiered); None: not a candidate."""
        state = self.state
        if state == READY:
            return TIER_AWAKE
        if state == FAILED:
            return None  # the agent answers 503 until someone loads it again by hand
        # Requests of ours sent since the agent's last /state was asked for (or still waiting)
        # make it load or wake: send more of them there, to share that one load.
        if state == STARTING or self._in_flight > 0 or self.dispatched_at > self.agent.state_sent_at:
            return TIER_LOADING
        if state == SLEEPING:
            return TIER_SLEEPING
        placement = self.entry.placement
        if placement == PLACEMENT_NO_ROOM:
            # Not final: the /state is up to a scrape interval old, and the models in the way may
            # have gone idle since. Tried last; the agent decides with live data.
            return TIER_NO_ROOM
        return TIER_EVICT if placement == PLACEMENT_EVICT else TIER_FITS

    def routable(self, now: float) -> bool:
        return self.agent.routable(now) and self.breaker.available(now) and self.tier is not None

    def update(self, entry: CatalogEntry, instance: InstanceState | None) -> None:
        self.entry = entry
        self.instance = instance
        self.scraped_running = float(instance.running) if instance is not None else 0.0
        self.scraped_waiting = float(instance.waiting) if instance is not None else 0.0
        self.in_flight_at_scrape = self._in_flight


class AgentNode(Node):
    """A node agent in the registry: its health, breaker, drain and token as any node, plus the
    last `/state` it sent and one AgentRoute per catalog entry."""

    __slots__ = (
        "_timeout",
        "_timeout_key",
        "by_model",
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
        self._timeout: aiohttp.ClientTimeout | None = None
        self._timeout_key: tuple[Any, float] | None = None

    def __repr__(self) -> str:
        return f"AgentNode({self.name!r}, {self.url!r})"

    @property
    def agent(self) -> AgentNode:  # type: ignore[override]
        return self

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
        for entry in st.catalog:
            route = self.routes.get(entry.name)
            if route is None:
                route = AgentRoute(
                    self, entry, Breaker(template.failure_threshold, template.cooldown, template.success_threshold)
                )
            else:
                route.breaker.configure(template.failure_threshold, template.cooldown, template.success_threshold)
            route.update(entry, instances.get(entry.name))
            routes[entry.name] = route
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


# -- polling ------------------------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def poll_agent(state: RouterState, node: AgentNode) -> tuple[bool | None, str | None]:
    """Read one agent's `/state` and apply it. Returns (answered, error) for its health: answered
    is True when the agent answered at all (even 401), False when it could not be reached (error
    says why), None when the read timed out (no verdict: the health check decides)."""
    session = state.session
    assert session is not None
    timeout = aiohttp.ClientTimeout(total=state.config.scrape.timeout)
    sent = time.monotonic()
    try:
        async with session.get(node.url + "/state", headers=node.auth_headers, timeout=timeout) as resp:
            if resp.status in AUTH_STATUSES:
                _set_fatal(
                    node,
                    f"the agent rejected the router's token (HTTP {resp.status} on /state): "
                    f"check token / token_env of agent {node.name} in servers.toml",
                )
                return True, None
            if resp.status != 200:
                node.scrape_error = f"/state answered HTTP {resp.status}"
                return True, None
            doc = await resp.json(content_type=None)
    except asyncio.TimeoutError:
        node.scrape_error = "/state: timed out"
        return None, node.scrape_error
    except (aiohttp.ClientConnectionError, OSError) as exc:
        node.scrape_error = f"/state: {describe(exc)}"
        _unreachable(node)
        return False, node.scrape_error
    except (aiohttp.ClientError, ValueError) as exc:
        node.scrape_error = f"/state: {describe(exc)}"
        return True, None
    try:
        st = AgentState.from_dict(doc)
    except StateVersionError as exc:
        _set_fatal(node, f"agent {node.name} sent a /state this router cannot read ({exc}): upgrade one of them")
        return True, None
    except (ValueError, TypeError, KeyError) as exc:
        node.scrape_error = f"/state is malformed: {describe(exc)}"
        return True, None
    if node.fatal_error is not None:
        log.info("agent %s accepts the router again", node.name)
        node.fatal_error = None
    if node.unreachable or node.health is Health.DOWN:
        _readmit_routes(state, node)
    first = node.state is None
    try:
        moved = node.apply_state(st, sent, time.monotonic())
        changed = state.registry.set_models(node, node.model_cards())
    except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong type: keep the last view
        node.scrape_error = f"/state is malformed: {describe(exc)}"
        return True, None
    if moved and not changed and not node.retired:
        state.registry.reindex()
    if first or changed:
        awake = [r.instance_name for r in node.routes.values() if r.state == READY]
        log.info(
            "agent %s (%s, engine %s): catalog %s; awake: %s",
            node.name,
            st.host,
            st.engine,
            ", ".join(sorted(node.models)) or "empty",
            ", ".join(awake) or "none",
        )
    return True, None


def _set_fatal(node: AgentNode, message: str) -> None:
    node.scrape_error = message
    if node.fatal_error != message:
        log.error("agent %s: %s", node.name, message)  # once per change, not once per scrape
        node.fatal_error = message


def _unreachable(node: AgentNode) -> None:
    if not node.unreachable:
        node.unreachable = True
        log.debug("agent %s unreachable: %s", node.name, node.scrape_error)


def _readmit_routes(state: RouterState, node: AgentNode) -> None:
    """The agent is back: its engines get a fresh start instead of waiting out their breakers."""
    node.unreachable = False
    for route in node.routes.values():
        transition = route.breaker.reset()
        if transition is not None:
            state.metrics.breaker_transitions.labels(node.name, transition.new.value).inc()


class FailedAnswer(Protocol):
    """What the proxy keeps of a node's failed answer (proxy.UpstreamAnswer)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    node: Node


def no_room_answer(model: str, answers: Sequence[FailedAnswer]) -> web.Response | None:
    """The client's 503 when every node tried was an agent answering "no room" for `model`: one
    message with each agent's reason (rather than a "no healthy node" that sends operators looking
    for a fault), Retry-After the soonest any agent gave. None when any answer was something else."""
    reasons = []
    waits = []
    for a in answers:
        if a.status != 503 or a.node.agent is None:
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


def unread_catalogs(nodes: tuple[Node, ...]) -> str:
    """For a 404: the agents whose catalog is unknown (never read), since the model may be theirs."""
    unread = [f"{n.name}: {n.error or 'not read yet'}" for n in nodes if isinstance(n, AgentNode) and n.state is None]
    return f" (catalog unknown for agent {'; '.join(unread)})" if unread else ""


# -- the lifecycle API of an agent ------------------------------------------------------------------


async def call_agent(
    state: RouterState, node: AgentNode, method: str, path: str, *, timeout: float, json: Any = None
) -> tuple[int, bytes, str]:
    """One lifecycle call (`POST /models/NAME/load` ...) with the agent's token and an optional JSON
    body: (status, body, content type). Raises aiohttp.ClientError / asyncio.TimeoutError / OSError
    when there is no answer."""
    session = state.session
    assert session is not None
    async with session.request(
        method,
        node.url + path,
        json=json,
        headers=node.auth_headers,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=state.config.timeouts.connect),
    ) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


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
