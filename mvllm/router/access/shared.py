"""Limits shared by several routers: a request's global and per-key limits and quota checked and
charged in Redis (router/cluster_store.py, one atomic round trip), exact across routers; and what
to do while Redis is down (`[cluster] on_redis_down`: per-router limits, or 503 to limited keys).

The gate (gate.py) asks `SharedLimits.admit`; the local LimitSet still counts every request (and
decides alone while Redis is down), so the counters of /metrics and the fallback stay warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from mvllm.router.access.keys import ApiKey
from mvllm.router.access.limits import (
    GLOBAL_SCOPE,
    LimitDecision,
    LimitSet,
    LimitSpec,
    QuotaSpec,
    Ticket,
    Verdict,
)
from mvllm.router.cluster_scripts import Admission, Check, QuotaCheck, RateCheck, SlotCheck, TokenCheck
from mvllm.router.cluster_store import ClusterStore, ClusterUnavailable

log = logging.getLogger("mvllm.router.cluster")

# Redis key ids: "global" and "key:<name>", so no key name can collide with the global scope.
KEY_SCOPE_PREFIX = "key:"


@dataclass
class SharedTicket:
    """A request admitted by Redis: its admission (leases, token reservations) and the usage the
    engine reported, both settled in one round trip when the request ends."""

    admission: Admission
    used_tokens: int | None = None


@dataclass(frozen=True)
class SharedOutcome:
    """`decision` as the local LimitSet would give it; `shared` when Redis admitted (settle it),
    `down` when Redis could not be asked (the caller falls back)."""

    decision: LimitDecision | None
    shared: SharedTicket | None = None
    down: bool = False


def scope_checks(scope_id: str, spec: LimitSpec | None, quota: QuotaSpec | None, estimate: int, lease_ttl: float) -> list[Check]:
    """The Redis checks of one scope's limits (the same semantics as limits.py, in memory). Every
    scope holds a counting lease, so in-flight requests are known across routers even unlimited."""
    spec = spec or LimitSpec()
    checks: list[Check] = []
    if spec.requests_per_second is not None:
        checks.append(RateCheck(scope_id, spec.requests_per_second, spec.burst))
    checks.append(SlotCheck(scope_id, spec.max_concurrent, lease_ttl))
    if spec.tokens_per_minute is not None:
        checks.append(TokenCheck(scope_id, spec.tokens_per_minute, estimate))
    if quota is not None and (quota.requests_total is not None or quota.requests_per_day is not None):
        checks.append(QuotaCheck(scope_id, quota.requests_total, quota.requests_per_day))
    return checks


def is_limiting(check: Check) -> bool:
    """Whether a check can refuse a request (a counting-only lease cannot)."""
    return not (isinstance(check, SlotCheck) and check.limit is None)


class SharedLimits:
    """The gate's link to the cluster store, with the fallback policy and the settle tasks."""

    def __init__(self, store: ClusterStore, on_redis_down: str = "local", lease_ttl: float = 5.0) -> None:
        self.store = store
        self.on_redis_down = on_redis_down  # "local" | "reject"
        self.lease_ttl = lease_ttl
        self._tasks: set[asyncio.Task[None]] = set()
        self._falling_back = False

    @property
    def falling_back(self) -> bool:
        """True while Redis is down and the limits are per-router (or limited keys get 503)."""
        return self._falling_back

    def checks(self, global_spec: LimitSpec, key: ApiKey | None, estimate: int) -> tuple[list[Check], list[str]]:
        """The request's checks and, per check, the LimitSet scope name it stands for."""
        checks = scope_checks(GLOBAL_SCOPE, global_spec, None, estimate, self.lease_ttl)
        names = [GLOBAL_SCOPE] * len(checks)
        if key is not None:
            own = scope_checks(KEY_SCOPE_PREFIX + key.name, key.limits, key.quota, estimate, self.lease_ttl)
            checks += own
            names += [key.name] * len(own)
        return checks, names

    async def admit(self, limits: LimitSet, global_spec: LimitSpec, key: ApiKey | None, ticket: Ticket) -> SharedOutcome:
        checks, names = self.checks(global_spec, key, ticket.estimate)
        while True:
            try:
                admission = await self.store.admit(checks)
            except ClusterUnavailable as exc:
                self._down(str(exc))
                return SharedOutcome(None, down=True)
            self._up()
            if admission.allowed:
                decision = limits.admit_shared(ticket, ())
                return SharedOutcome(decision, SharedTicket(admission))
            decision = limits.admit_shared(ticket, [(names[d.index], d.limit, d.wait) for d in admission.denials])
            if decision.verdict is not Verdict.WAIT:
                return SharedOutcome(decision)
            await asyncio.sleep(decision.wait)

    def rejects(self, global_spec: LimitSpec, key: ApiKey | None) -> bool:
        """With Redis down and on_redis_down = "reject": whether this request gets 503 (a limit or
        quota applies to it) rather than going on unlimited-as-before."""
        if self.on_redis_down != "reject":
            return False
        checks, _ = self.checks(global_spec, key, 0)
        return any(is_limiting(c) for c in checks)

    def _down(self, why: str) -> None:
        if not self._falling_back:
            self._falling_back = True
            what = "per-router limits" if self.on_redis_down == "local" else "503 for limited keys"
            log.warning("shared limits unavailable (%s): %s until Redis is back", why, what)

    def _up(self) -> None:
        if self._falling_back:
            self._falling_back = False
            log.warning("shared limits: Redis reachable again, limits are shared across routers again")

    def finish(self, shared: SharedTicket) -> None:
        """The request is over: settle its tokens and free its leases in the background (a Redis
        that is down lets the leases lapse by themselves)."""
        self._spawn(self._finish(shared))

    async def _finish(self, shared: SharedTicket) -> None:
        with contextlib.suppress(ClusterUnavailable):
            await self.store.finish(shared.admission, shared.used_tokens)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the settles under way, at shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
