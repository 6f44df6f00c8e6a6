"""The registry: every node the router knows, with its models, load, health and breaker, plus the
model → nodes index that keeps routing O(nodes serving the model).

Nodes are keyed by name. Applying a new config adds nodes, updates changed ones in place and
retires removed ones: a retired node takes no new request, while requests already on it finish
(they hold the Node object), and it is forgotten when its in-flight count reaches zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.router.breaker import Breaker, BreakerState
from mvllm.router.config import BreakerConfig, NodeConfig, RouterConfig
from mvllm.router.fleet.agents import AgentNode
from mvllm.router.fleet.targets import Health, Node, Target

log = logging.getLogger("mvllm.router.registry")


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

    def agents(self) -> list[AgentNode]:
        """The active nodes that are agents, in config order."""
        return [n for n in self._all if isinstance(n, AgentNode)]

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

    def release(self, node: Target) -> None:
        """Called after a request left `node`: forget a retired node once it is idle."""
        node = node.owner  # a request on an agent's model route holds the agent
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
        """Nodes seen healthy (their last check answered) and not ejected: a node not checked yet
        is unknown, never counted as up."""
        return sum(1 for n in self._all if n.health is Health.UP and n.breaker.state is not BreakerState.OPEN)

    def unknown_count(self) -> int:
        """Nodes whose first check has not completed yet."""
        return sum(1 for n in self._all if n.health is Health.UNKNOWN)

    def iter_all(self) -> Iterable[Node]:
        """Active then retiring nodes, for observability."""
        yield from self._all
        yield from self._retiring


def _node_class(cfg: NodeConfig) -> type[Node]:
    return AgentNode if cfg.kind == "agent" else Node


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
