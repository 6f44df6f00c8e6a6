"""The registry: every node the router knows, with its models, load, health and breaker, plus the
model → nodes index that keeps routing O(nodes serving the model).

Nodes are keyed by name. Applying a new config adds nodes, updates changed ones in place and
retires removed ones: a retired node takes no new request, while requests already on it finish
(they hold the Node object), and it is forgotten when its in-flight count reaches zero.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.router.breaker import Breaker, BreakerState
from mvllm.router.config import BreakerConfig, NodeConfig, RouterConfig

log = logging.getLogger("mvllm.router.registry")


class Health(enum.Enum):
    UNKNOWN = "unknown"  # not checked yet: routable, so a fresh router serves at once
    UP = "up"
    DOWN = "down"


class Node:
    """One node (a static vLLM server; an agent is the subclass mvllm.router.fleet.agents.AgentNode) and
    everything the router knows of it."""

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
        "in_flight_at_scrape",
        "last_scrape",
        "models",
        "per_model",
        "retired",
        "scrape_error",
        "scraped_running",
        "scraped_waiting",
    )

    def __init__(self, cfg: NodeConfig, breaker: Breaker, default_capacity: int) -> None:
        self.cfg = cfg
        self.breaker = breaker
        self.default_capacity = default_capacity
        self.models: frozenset[str] = frozenset(cfg.models or ())
        self.cards: tuple[dict[str, Any], ...] = ()
        self.discovered_at: float | None = None
        self.scraped_running = 0.0
        self.scraped_waiting = 0.0
        self.per_model: dict[str, tuple[float, float]] = {}
        self.in_flight = 0
        self.in_flight_at_scrape = 0
        self.last_scrape: float | None = None
        self.scrape_error: str | None = None
        self.health = Health.UNKNOWN
        self.health_failures = 0
        self.health_error: str | None = None
        self.retired = False
        # Drained at run time through the admin API (mvllm.router.admin); kept while the Node object
        # lives, i.e. across reloads that keep this node (same name, url and kind).
        self.admin_drain = False

    # A static server always has its models awake (tier 0 of policy.choose_tiered) and is its own
    # proxy target; an agent's per-model routes override both (mvllm.router.fleet.agents).
    tier = 0
    agent: Any = None

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.url!r})"

    def route_for(self, model: str) -> Any:
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

    @property
    def running(self) -> float:
        """Running requests now: the last scrape plus the change of our own in-flight count since,
        capped at capacity (what exceeds it would queue, and is counted in `waiting`)."""
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

    def routable(self, now: float) -> bool:
        return not self.cfg.drain and not self.admin_drain and not self.retired and self.health is not Health.DOWN and self.breaker.available(now)

    def record_scrape(self, running: float, waiting: float, per_model: dict[str, tuple[float, float]], now: float) -> None:
        self.scraped_running = running
        self.scraped_waiting = waiting
        self.per_model = per_model
        self.in_flight_at_scrape = self.in_flight
        self.last_scrape = now
        self.scrape_error = None


@dataclass
class Diff:
    added: list[Node] = field(default_factory=list)
    removed: list[Node] = field(default_factory=list)
    changed: list[Node] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _breaker(cfg: BreakerConfig) -> Breaker:
    return Breaker(cfg.failure_threshold, cfg.cooldown, cfg.success_threshold)


class Registry:
    def __init__(self, config: RouterConfig | None = None) -> None:
        self._nodes: dict[str, Node] = {}
        self._retiring: set[Node] = set()
        self._by_model: dict[str, tuple[Node, ...]] = {}
        self._all: tuple[Node, ...] = ()
        self._models_doc: dict[str, Any] | None = None
        self._breaker_cfg = BreakerConfig()
        self._default_capacity = RouterConfig.default_capacity
        if config is not None:
            self.apply(config)

    # -- reads (hot path) -------------------------------------------------------------------

    def nodes(self) -> tuple[Node, ...]:
        """Active nodes, in config order (retiring ones excluded)."""
        return self._all

    def nodes_for(self, model: str) -> tuple[Node, ...]:
        return self._by_model.get(model, ())

    def get(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def retiring(self) -> tuple[Node, ...]:
        return tuple(self._retiring)

    def models(self) -> list[str]:
        return list(self._by_model)

    # -- changes ------------------------------------------------------------------------------

    def apply(self, config: RouterConfig) -> Diff:
        """Make the node set match `config.nodes`; returns what changed."""
        self._breaker_cfg = config.breaker
        self._default_capacity = config.default_capacity
        diff = Diff()
        wanted = {c.name: c for c in config.nodes}
        for name, node in list(self._nodes.items()):
            new = wanted.get(name)
            if new is None or new.url != node.url or new.kind != node.kind:
                self._retire(node)
                diff.removed.append(node)
        for cfg in config.nodes:
            node = self._nodes.get(cfg.name)
            if node is None:
                node = _node_class(cfg)(cfg, _breaker(config.breaker), config.default_capacity)
                self._nodes[cfg.name] = node
                diff.added.append(node)
                continue
            node.default_capacity = config.default_capacity
            node.breaker.configure(config.breaker.failure_threshold, config.breaker.cooldown, config.breaker.success_threshold)
            if cfg != node.cfg:
                old = node.cfg
                node.cfg = cfg
                if cfg.models != old.models:
                    # An override replaces discovery; dropping one falls back to the last discovery.
                    node.models = frozenset(cfg.models) if cfg.models else frozenset(c["id"] for c in node.cards)
                diff.changed.append(node)
        # Keep config order so listings and round-robin are stable.
        self._nodes = {c.name: self._nodes[c.name] for c in config.nodes}
        self._reindex()
        return diff

    def set_models(self, node: Node, cards: Sequence[dict[str, Any]], now: float | None = None) -> bool:
        """Record a node's /v1/models answer; True when the set of model names changed."""
        node.cards = tuple(cards)
        node.discovered_at = time.monotonic() if now is None else now
        if node.cfg.models:
            return False
        ids = frozenset(str(c["id"]) for c in cards if isinstance(c, dict) and c.get("id"))
        if ids == node.models:
            return False
        node.models = ids
        if not node.retired:
            self._reindex()
        return True

    def release(self, node: Node) -> None:
        """Called after a request left `node`: forget a retired node once it is idle."""
        node = node.agent or node  # a request on an agent's model route holds the agent
        if node.retired and node.in_flight <= 0 and node in self._retiring:
            self._retiring.discard(node)
            log.info("node %s drained and removed", node.name)

    def _retire(self, node: Node) -> None:
        node.retired = True
        self._nodes.pop(node.name, None)
        if node.in_flight > 0:
            self._retiring.add(node)
            log.info("node %s removed from config; draining %d in-flight request(s)", node.name, node.in_flight)
        else:
            log.info("node %s removed from config", node.name)

    def reindex(self) -> None:
        """Rebuild the model index (an agent's catalog moved a name to another route)."""
        self._reindex()

    def _reindex(self) -> None:
        by_model: dict[str, list[Node]] = {}
        for node in self._nodes.values():
            for m in sorted(node.models):
                by_model.setdefault(m, []).append(node.route_for(m))
        self._by_model = {m: tuple(ns) for m, ns in by_model.items()}
        self._all = tuple(self._nodes.values())
        self._models_doc = None

    # -- views ---------------------------------------------------------------------------------

    def models_document(self) -> dict[str, Any]:
        """The merged /v1/models answer, rebuilt only when the index changes (no per-call fan-out)."""
        if self._models_doc is None:
            cards: dict[str, dict[str, Any]] = {}
            for node in self._nodes.values():
                by_id = {str(c.get("id")): c for c in node.cards if isinstance(c, dict)}
                for model in sorted(node.models):
                    if model in cards:
                        continue
                    card = by_id.get(model)
                    cards[model] = dict(card) if card else _synthetic_card(model)
            self._models_doc = {"object": "list", "data": list(cards.values())}
        return self._models_doc

    def healthy_count(self, now: float) -> int:
        return sum(1 for n in self._all if n.health is not Health.DOWN and n.breaker.state is not BreakerState.OPEN)

    def iter_all(self) -> Iterable[Node]:
        """Active then retiring nodes, for observability."""
        yield from self._all
        yield from self._retiring


def _node_class(cfg: NodeConfig) -> type[Node]:
    if cfg.kind == "agent":
        from mvllm.router.fleet.agents import AgentNode  # imported here: agents builds on this module

        return AgentNode
    return Node


def _synthetic_card(model: str) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "mvllm",
        "root": model,
        "parent": None,
        "permission": [],
    }
