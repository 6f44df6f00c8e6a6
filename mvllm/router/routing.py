"""Explained routing: the policy's choice of a node for one attempt of a request, and why (the
`x-mvllm-route` header, mvllm_route_decisions_total); for cache-aware, the prefix-affinity choice
among the awake candidates (mvllm.router.prefix_index) and the index update that follows it.
`next_route` is the one entry for every choice of a node (a request's attempts, a stream's
resume, an operator's load without ?node): routable and untried nodes, the stall filter
(`answering`), then `choose_route`.

Header: `policy=P; reason=R; score=S; runner_up=NODE:SCORE; action=A`, where
    reason: least-score only_candidate | idle | least_score; round-robin rotation; cache-aware
        prefix_hit | prefix_miss | imbalanced | kv_full | no_prompt;
    score: the chosen node's least-score score; runner_up: the lowest-scoring other candidate of
        the same tier ("-" when there is none);
    action: what the chosen node must do first, from its tier (policy.choose_tiered): none
        (awake), load (a load under way, or a cold load with room), wake (sleeping), evict (load
        after evicting idle models, or no room said by its last /state).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from mvllm.router.fleet.targets import Target
from mvllm.router.policy import (
    TIER_AWAKE,
    TIER_EVICT,
    TIER_FITS,
    TIER_LOADING,
    TIER_NO_ROOM,
    TIER_SLEEPING,
    CacheAware,
    LeastScore,
    Policy,
    least_score_reason,
    tier_pool,
)
from mvllm.router.prefix_index import CacheCandidate, PrefixIndex, choose_cache_aware

ROUTE_HEADER = "x-mvllm-route"
# The explanation of the attempt that answered, set on the request by the proxy (typed on aiohttp >= 3.14).
ROUTE_KEY: Any = web.RequestKey("mvllm_route", str) if hasattr(web, "RequestKey") else "mvllm_route"
TIER_ACTIONS = {
    TIER_AWAKE: "none",
    TIER_LOADING: "load",
    TIER_SLEEPING: "wake",
    TIER_FITS: "load",
    TIER_EVICT: "evict",
    TIER_NO_ROOM: "evict",
}

# When every candidate is stalled, those silent for at most twice the least silent one (plus this
# slack) stay in: busy nodes alike are left to the policy, a node silent far longer is not.
_SILENCE_SLACK = 0.0

N = TypeVar("N", bound=Target)


@dataclass(frozen=True, slots=True)
class Route:
    policy: str
    reason: str
    score: float
    runner_up: str | None
    runner_up_score: float
    action: str

    def header(self) -> str:
        runner = "-" if self.runner_up is None else f"{self.runner_up}:{self.runner_up_score:.3f}"
        return (
            f"policy={self.policy}; reason={self.reason}; score={self.score:.3f}; "
            f"runner_up={runner}; action={self.action}"
        )


def lowest_tier(candidates: Sequence[N]) -> list[N]:
    """The candidates of the lowest tier present, released replicas only as the last awake copy
    (policy.tier_pool: choose_tiered's pool)."""
    return tier_pool(candidates)


def answering(candidates: list[N], now: float) -> list[N]:
    """The candidates that are not `stalled` (breaker.py: an awake node holding requests it has
    not answered is likely hanging; a loading one is silent by design). When all are, the ones
    that answered about as recently as the latest: a node that answers slowly beats one that has
    not answered at all for far longer."""
    fresh = [n for n in candidates if not (n.tier == 0 and n.breaker.stalled())]
    awake = [n for n in candidates if n.tier == 0]
    if not awake or any(n.tier == 0 for n in fresh):
        return fresh
    # Every awake copy is stalled: they stay the choice (a busy replica queueing requests looks
    # stalled too, and must not set off a cold load elsewhere; one that truly hangs opens its
    # breaker and leaves the candidates by itself).
    quiet = [now - n.breaker.last_answer_at for n in awake]
    bound = 2 * min(quiet) + _SILENCE_SLACK
    return [n for n, q in zip(awake, quiet, strict=True) if q <= bound]


def next_route(
    policy: Policy,
    index: PrefixIndex,
    nodes: Iterable[N],
    tried: Sequence[Target],
    model: str,
    text: str | None,
    now: float,
) -> tuple[N, Route] | None:
    """The node for the next attempt among `nodes` (routable now, not in `tried`, not stalled)
    and the explanation; None when no node is left (see choose_route)."""
    candidates = [n for n in nodes if n.routable(now) and n not in tried]
    return choose_route(policy, index, answering(candidates, now), model, text, now)


def choose_route(
    policy: Policy,
    index: PrefixIndex,
    candidates: Sequence[N],
    model: str,
    text: str | None,
    now: float,
) -> tuple[N, Route] | None:
    """The node for the next attempt and the explanation; None when no candidate is left.
    Under cache-aware the prompt is recorded for the chosen node (`now`: monotonic seconds)."""
    pool = lowest_tier(candidates)
    if not pool:
        return None
    tier = pool[0].tier
    reason: str
    if isinstance(policy, CacheAware) and tier == TIER_AWAKE:
        chosen, reason = _cache_aware(policy, index, pool, model, text, now)
    else:
        picked = policy.choose(pool, model)
        if picked is None:
            return None
        chosen = picked
        if isinstance(policy, LeastScore):
            reason = least_score_reason(policy, chosen, pool)
        else:
            reason = "rotation"
    runner: N | None = None
    runner_score = float("inf")
    for c in pool:
        if c is not chosen:
            s = policy.score(c)
            if runner is None or s < runner_score:
                runner, runner_score = c, s
    route = Route(
        policy.type,
        reason,
        policy.score(chosen),
        None if runner is None else runner.name,
        runner_score,
        TIER_ACTIONS.get(tier if tier is not None else TIER_NO_ROOM, "none"),
    )
    return chosen, route


def _cache_aware(
    policy: CacheAware, index: PrefixIndex, pool: list[N], model: str, text: str | None, now: float
) -> tuple[N, str]:
    cands = [CacheCandidate(c.name, policy.score(c), c.kv_cache_usage or 0.0) for c in pool]
    decision = choose_cache_aware(cands, index, model, text, policy.params, now, record=False)
    if decision.reason == "prefix_hit" and decision.chosen is not None:
        chosen = pool[next(i for i, c in enumerate(cands) if c is decision.chosen)]
    else:
        # Least-score's own choice (a random idle node, else the least loaded), not the first
        # lowest score: new prefixes spread over an idle fleet instead of all starting on one node.
        chosen = policy.choose(pool, model) or pool[0]
    if text:
        index.insert(model, chosen.name, text, now)
    return chosen, decision.reason
