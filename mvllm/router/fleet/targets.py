"""What a request can be routed to: the `Target` protocol the proxy and the policy work with, its
`Health`, the one in-flight correction of scraped load (`LoadCounter`), and the static server.

Two kinds of target implement it: a static server (`Node`, here) and one engine of an agent
(`agents.AgentRoute`). The proxy asks the target itself for what differs between them (its
upstream headers and timeout, whether it sits behind an agent), never its class.

Load of a target: running = scraped_running + (in_flight - in_flight_at_scrape), clamped to
[0, capacity]; what exceeds capacity would queue and is added to waiting. The score that policy.py
computes from it is (running + 0.5 * waiting) / (capacity * weight).
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

import aiohttp
from multidict import CIMultiDict

from mvllm.router.breaker import Breaker
from mvllm.router.config import NodeConfig


class Health(enum.Enum):
    UNKNOWN = "unknown"  # not checked yet: routable, so a fresh router serves at once, but never counted as up
    UP = "up"
    DOWN = "down"


class Target(Protocol):
    """One thing the proxy can send a request to, as the proxy and the policy see it."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def cfg(self) -> NodeConfig: ...
    @property
    def weight(self) -> float: ...
    @property
    def health(self) -> Health: ...
    @property
    def draining(self) -> bool: ...
    @property
    def retired(self) -> bool: ...
    @property
    def running(self) -> float: ...
    @property
    def waiting(self) -> float: ...
    @property
    def capacity(self) -> int: ...
    @property
    def tier(self) -> int | None: ...
    @property
    def released(self) -> bool:
        """Released by the autoscaler: routed to only when no other awake copy is a candidate."""
        ...
    @property
    def owner(self) -> Node:
        """The registry node that holds this target (the agent of an engine route)."""
        ...
    @property
    def via_agent(self) -> bool:
        """Behind an agent: routed by the body's model only, its 503 is load (no room, loading),
        and its 401/403 is about the router's token, never the client's."""
        ...

    in_flight: int
    breaker: Breaker
    kv_cache_usage: float | None  # vllm:kv_cache_usage_perc (0..1) at the last scrape, if known

    def routable(self, now: float) -> bool: ...
    def upstream_headers(self, client: CIMultiDict[str]) -> CIMultiDict[str]: ...
    def upstream_timeout(self, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout: ...


def with_bearer(headers: CIMultiDict[str], token: str) -> CIMultiDict[str]:
    """A copy of `headers` carrying `token` as the only credential."""
    out = headers.copy()
    out.popall("x-api-key", None)
    out["Authorization"] = "Bearer " + token
    return out


class LoadCounter:
    """Scraped running/waiting of a target plus the change of the router's own in-flight count
    since that scrape (so a burst between two scrapes spreads): the one place that correction
    is written. A subclass provides `in_flight` and `capacity`."""

    __slots__ = ("in_flight_at_scrape", "kv_cache_usage", "scraped_running", "scraped_waiting")

    in_flight: int
    capacity: int

    def _init_load(self) -> None:
        self.scraped_running = 0.0
        self.scraped_waiting = 0.0
        self.in_flight_at_scrape = 0
        self.kv_cache_usage: float | None = None

    def record_load(self, running: float, waiting: float) -> None:
        self.scraped_running = running
        self.scraped_waiting = waiting
        self.in_flight_at_scrape = self.in_flight

    @property
    def running(self) -> float:
        """Running requests now, capped at capacity (what exceeds it would queue, see `waiting`)."""
        r = self.scraped_running + (self.in_flight - self.in_flight_at_scrape)
        if r < 0:
            return 0.0
        cap = self.capacity
        return float(cap) if r > cap else r

    @property
    def waiting(self) -> float:
        r = self.scraped_running + (self.in_flight - self.in_flight_at_scrape)
        over = r - self.capacity
        return self.scraped_waiting + over if over > 0 else self.scraped_waiting


class Node(LoadCounter):
    """One node of the registry and everything the router knows of it. As a target it is a static
    vLLM server; an agent is the subclass agents.AgentNode, whose engines are its targets."""

    __slots__ = (
        "admin_drain",
        "breaker",
        "cards",
        "cfg",
        "default_capacity",
        "discovered_at",
        "health",
        "health_error",
        "health_failures",
        "in_flight",
        "last_scrape",
        "models",
        "per_model",
        "prefix_hits",
        "prefix_queries",
        "retired",
        "scrape_error",
    )

    def __init__(self, cfg: NodeConfig, breaker: Breaker, default_capacity: int) -> None:
        self.cfg = cfg
        self.breaker = breaker
        self.default_capacity = default_capacity
        self.models: frozenset[str] = frozenset(cfg.models or ())
        self.cards: tuple[dict[str, Any], ...] = ()
        self.discovered_at: float | None = None
        self._init_load()
        self.per_model: dict[str, tuple[float, float]] = {}
        self.in_flight = 0
        self.last_scrape: float | None = None
        self.scrape_error: str | None = None
        self.health = Health.UNKNOWN
        self.health_failures = 0
        self.health_error: str | None = None
        self.retired = False
        # vllm:prefix_cache_hits_total / queries_total (tokens) at the last scrape, if exposed.
        self.prefix_hits: float | None = None
        self.prefix_queries: float | None = None
        # Drained at run time through the admin API (mvllm.router.admin.nodes); kept while the Node object
        # lives, i.e. across reloads that keep this node (same name, url and kind).
        self.admin_drain = False

    # A static server always has its models awake (tier 0 of policy.choose_tiered) and is its own
    # proxy target; an agent's per-model routes override both (mvllm.router.fleet.agents).
    tier = 0
    released = False
    via_agent = False
    # The agent in front of the target: none for a static server (an engine route names its agent).
    # Kept for readers of a target; the proxy asks `via_agent` and the target's own methods.
    agent: Any = None

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.url!r})"

    @property
    def owner(self) -> Node:
        return self

    def route_for(self, model: str) -> Target:
        """What the model index lists for `model` on this node: the node itself (an agent lists
        the route of the catalog entry serving it)."""
        return self

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def url(self) -> str:
        return self.cfg.url

    @property
    def kind(self) -> str:
        return self.cfg.kind

    @property
    def weight(self) -> float:
        return self.cfg.weight

    @property
    def draining(self) -> bool:
        return self.cfg.drain or self.admin_drain or self.retired

    @property
    def capacity(self) -> int:
        return self.cfg.capacity or self.default_capacity

    def routable(self, now: float) -> bool:
        return not self.cfg.drain and not self.admin_drain and not self.retired and self.health is not Health.DOWN and self.breaker.available(now)

    def upstream_headers(self, client: CIMultiDict[str]) -> CIMultiDict[str]:
        """The headers to send: a static server started with --api-key gets its key."""
        return with_bearer(client, self.cfg.token) if self.cfg.token else client

    def upstream_timeout(self, base: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        return base

    def record_scrape(self, running: float, waiting: float, per_model: dict[str, tuple[float, float]], now: float) -> None:
        self.record_load(running, waiting)
        self.per_model = per_model
        self.last_scrape = now
        self.scrape_error = None

    def record_cache(self, kv_usage: float | None, hits: float | None, queries: float | None) -> bool:
        """Take the engine's KV-cache numbers; True when its prefix-cache query counter went down
        since the last scrape: the engine restarted, and its cache is gone."""
        restarted = queries is not None and self.prefix_queries is not None and queries < self.prefix_queries
        self.kv_cache_usage = kv_usage
        self.prefix_hits = hits
        self.prefix_queries = queries
        return restarted

    @property
    def prefix_hit_ratio(self) -> float | None:
        """Hits over queries since the engine started (None before its first query)."""
        if not self.prefix_queries or self.prefix_hits is None:
            return None
        return self.prefix_hits / self.prefix_queries
