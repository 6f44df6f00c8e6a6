"""Node selection policies: pure choices over a snapshot of candidate nodes (no I/O, no clock).

Every policy has the same interface: `choose(candidates, key) -> candidate | None`, where the
candidates are the nodes that serve the requested model, are healthy, not draining, not open in
their breaker and not yet tried for this request, and `key` is the model name. Each candidate
exposes `name`, `running`, `waiting`, `capacity` and `weight` (see `NodeLoad`).

least-score (the default)
    score = (running + waiting_weight * waiting) / (capacity * weight)
    running, waiting: the engine's vllm:num_requests_running / vllm:num_requests_waiting at the
        last scrape, summed over the node's label sets, plus the change of the router's own
        in-flight count on that node since that scrape (so a burst between two scrapes spreads).
    capacity: the node's max_concurrent_requests (or default_max_concurrent_requests).
    weight: the node's weight (default 1); a weight of 2 makes a node look half as loaded.
    Choice: if some candidates score below idle_threshold (0.5), pick one of them at random,
    with probability proportional to weight; otherwise pick a lowest-scoring one, ties at random.
    Parameters: idle_threshold = 0.5, waiting_weight = 0.5.

cache-aware
    Least-score, except that a prompt whose prefix an awake node already holds (by the router's
    own index of recent prompts) goes to that node while the fleet stays balanced: the pure
    choice is mvllm.router.prefix_index (formula and parameters there); the proxy asks for it
    through mvllm.router.routing. `choose` here is the least-score fallback (cold tiers, no text).

round-robin (reference)
    Cycles through the candidates per model, ignoring load and weight. Useful as a baseline in
    benchmarks and for identical nodes with identical traffic.

Tiers: when no node has the model awake (`choose_tiered`, DESIGN.md §3)
    Each candidate has a `tier` for the requested model: 0 awake (every static server; an
    agent's engine that is ready), 1 loading (an agent already starting or waking it, or with
    requests of ours waiting for it: joining shares that one load), 2 sleeping on an agent (a
    wake takes seconds), 3 in an agent's catalog with room on its GPUs (cold load), 4 in an
    agent's catalog, loadable after evicting idle models, 5 an agent whose last /state said "no
    room": tried last, never skipped, since that /state is up to a scrape interval old (the
    models in the way may have gone idle since) and the agent decides with live data (it waits
    for busy models to finish, or answers 503 no-room and the request moves on). Agents whose
    engine for it failed are not candidates. The policy above chooses among the candidates of
    the lowest tier present, so awake nodes are always scored against each other first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar

from mvllm.common.state import FAILED, PLACEMENT_EVICT, PLACEMENT_NO_ROOM, READY, SLEEPING, STARTING
from mvllm.router.config import PolicyConfig
from mvllm.router.prefix_index import RSS_PER_BYTE, CacheAwareParams


class NodeLoad(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def running(self) -> float: ...
    @property
    def waiting(self) -> float: ...
    @property
    def capacity(self) -> int: ...
    @property
    def weight(self) -> float: ...


N = TypeVar("N", bound=NodeLoad)


def load_score(running: float, waiting: float, capacity: float, weight: float = 1.0, waiting_weight: float = 0.5) -> float:
    """The least-score formula; capacity or weight <= 0 makes a node infinitely loaded."""
    denom = capacity * weight
    if denom <= 0:
        return float("inf")
    return (running + waiting_weight * waiting) / denom


class Policy(Protocol):
    type: str

    def score(self, node: NodeLoad) -> float: ...

    def choose(self, candidates: Sequence[N], key: str) -> N | None: ...


class LeastScore:
    type = "least-score"

    def __init__(self, idle_threshold: float = 0.5, waiting_weight: float = 0.5, rng: random.Random | None = None) -> None:
        self.idle_threshold = idle_threshold
        self.waiting_weight = waiting_weight
        self.rng = rng or random.Random()

    def score(self, node: NodeLoad) -> float:
        return load_score(node.running, node.waiting, node.capacity, node.weight, self.waiting_weight)

    def choose(self, candidates: Sequence[N], key: str) -> N | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        idle: list[N] = []
        best: list[N] = []
        best_score = float("inf")
        for node in candidates:
            s = self.score(node)
            if s < self.idle_threshold:
                idle.append(node)
            if s < best_score:
                best_score = s
                best = [node]
            elif s == best_score:
                best.append(node)
        if idle:
            if len(idle) == 1:
                return idle[0]
            weights = [n.weight for n in idle]
            if min(weights) == max(weights):
                return self.rng.choice(idle)
            return self.rng.choices(idle, weights=weights)[0]
        if not best:  # every score is inf (capacity 0): any will do
            return self.rng.choice(list(candidates))
        return best[0] if len(best) == 1 else self.rng.choice(best)


class CacheAware(LeastScore):
    """Least-score plus the prefix-cache affinity parameters (the choice itself: routing.py)."""

    type = "cache-aware"

    def __init__(self, params: CacheAwareParams, idle_threshold: float = 0.5, waiting_weight: float = 0.5,
                 rng: random.Random | None = None) -> None:
        super().__init__(idle_threshold, waiting_weight, rng)
        self.params = params


def least_score_reason(policy: LeastScore, chosen: NodeLoad, candidates: Sequence[NodeLoad]) -> str:
    """Why `LeastScore.choose` picked `chosen`: only_candidate, idle (a random pick below
    idle_threshold) or least_score."""
    if len(candidates) == 1:
        return "only_candidate"
    return "idle" if policy.score(chosen) < policy.idle_threshold else "least_score"


class RoundRobin:
    type = "round-robin"

    def __init__(self, waiting_weight: float = 0.5) -> None:
        self.waiting_weight = waiting_weight
        self._next: dict[str, int] = {}

    def score(self, node: NodeLoad) -> float:
        # Not used to choose; reported in /load-stats so both policies show comparable numbers.
        return load_score(node.running, node.waiting, node.capacity, node.weight, self.waiting_weight)

    def choose(self, candidates: Sequence[N], key: str) -> N | None:
        if not candidates:
            return None
        i = self._next.get(key, 0)
        self._next[key] = i + 1
        return candidates[i % len(candidates)]


TIER_AWAKE = 0
TIER_LOADING = 1
TIER_SLEEPING = 2
TIER_FITS = 3
TIER_EVICT = 4
TIER_NO_ROOM = 5
TIER_NAMES = {
    TIER_AWAKE: "awake",
    TIER_LOADING: "loading",
    TIER_SLEEPING: "sleeping",
    TIER_FITS: "fits",
    TIER_EVICT: "evict",
    TIER_NO_ROOM: "no_room",
}


def engine_tier(state: str, placement: str, pending: bool) -> int | None:
    """The tier of one agent's engine for its model (see the module docstring); None: not a
    candidate. `state` is the engine's state in the agent's last /state, `placement` what that
    /state said of room for it, `pending` whether requests of ours sent there since that /state
    was asked for (or still waiting) make the agent load or wake it."""
    if state == READY:
        return TIER_AWAKE
    if state == FAILED:
        return None  # the agent answers 503 until someone loads it again by hand
    if state == STARTING or pending:
        return TIER_LOADING  # join the load under way: one load shared
    if state == SLEEPING:
        return TIER_SLEEPING
    if placement == PLACEMENT_NO_ROOM:
        # Not final: the /state is up to a scrape interval old, and the models in the way may
        # have gone idle since. Tried last; the agent decides with live data.
        return TIER_NO_ROOM
    return TIER_EVICT if placement == PLACEMENT_EVICT else TIER_FITS


class Tiered(NodeLoad, Protocol):
    @property
    def tier(self) -> int | None: ...


T = TypeVar("T", bound=Tiered)


def choose_tiered(policy: Policy, candidates: Sequence[T], key: str) -> T | None:
    """`policy.choose` among the candidates of the lowest tier (see the module docstring)."""
    best: int | None = None
    mixed = False
    for c in candidates:
        t = c.tier
        if t is None:
            mixed = True
        elif best is None:
            best = t
        elif t != best:
            mixed = True
            best = min(best, t)
    if best is None:
        return None
    if not mixed:  # the common case: every candidate awake (static servers, ready engines)
        return policy.choose(candidates, key)
    return policy.choose([c for c in candidates if c.tier == best], key)


def cache_params(cfg: PolicyConfig) -> CacheAwareParams:
    """The index's parameters from [policy]: max_tree_bytes there bounds the router's RSS growth,
    so the index's own (object-byte) bound is that over RSS_PER_BYTE."""
    return CacheAwareParams(
        cache_threshold=cfg.cache_threshold,
        balance_abs_threshold=cfg.balance_abs_threshold,
        balance_rel_threshold=cfg.balance_rel_threshold,
        kv_full=cfg.kv_full_threshold,
        max_tree_bytes=int(cfg.max_tree_bytes / RSS_PER_BYTE),
        max_prefix_chars=cfg.max_prefix_chars,
        entry_ttl=cfg.entry_ttl,
    )


def make_policy(cfg: PolicyConfig, rng: random.Random | None = None) -> Policy:
    if cfg.type == "round-robin":
        return RoundRobin(cfg.waiting_weight)
    if cfg.type == "cache-aware":
        return CacheAware(cache_params(cfg), cfg.idle_threshold, cfg.waiting_weight, rng)
    return LeastScore(cfg.idle_threshold, cfg.waiting_weight, rng)
