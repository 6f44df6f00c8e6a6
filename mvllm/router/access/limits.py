"""Request limits as pure policies (token bucket, concurrency, tokens per minute, quota) and the
LimitSet that folds the router's global limits and one key's limits into a single decision.

No I/O and no asyncio here: every policy takes the time as an argument, LimitSet reads injectable
clocks, and a request that may queue gets told how long to sleep; the async layer only sleeps.

Algorithms, with every parameter:

- TokenBucket(rate, burst): `tokens(t) = min(burst, tokens(t0) + (t - t0) * rate)`, starting full.
  A request takes one token; with fewer than one it must wait `(1 - tokens) / rate` seconds.
  `burst` defaults to `max(1, ceil(rate))`.
- ConcurrencyLimit(limit): requests in flight; acquire fails at `limit`; release never goes below 0.
  `limit=None` only counts.
- TokensPerMinute(limit, window=60, resolution=1): prompt + completion tokens in a sliding window,
  kept as one slot per `resolution` seconds (at most window/resolution + 1 slots, so memory is
  bounded whatever the request rate). Tokens charged at time t leave the window between `window`
  and `window + resolution` seconds later: never early, so the limit holds for every window.
  A request reserves an estimate up front (clamped to `limit`, so a request whose `max_tokens`
  alone exceeds the budget can still run once the window is empty) and settles with the usage the
  engine reports: a smaller usage is refunded to the slot it was charged to, a larger one is charged
  now.
- Quota(requests_total, requests_per_day): request counters; the day is the UTC day of the wall
  clock (POSIX time has no leap seconds, so days are exactly 86400 s and roll over at 00:00 UTC).
  Kept in memory here; `LimitSet.export_usage` / `restore_usage` let the router persist them
  (router/access/usage_store.py), so a restart does not reset them.
- LimitSet: global limits plus, per key, its own limits and quota. A request is admitted only when
  every limit of every scope allows it, and then charged to all of them at once (nothing is charged
  on a denial). Otherwise the limit with the longest wait is reported: 429, `Retry-After` (integer
  seconds, >= 1; none for a used-up total quota, which no wait cures) and its name. With a wait
  queue (`queue_timeout` > 0), a request whose wait fits in what is left of its `queue_timeout`,
  while fewer than `max_queued` requests wait, is told to sleep and try again instead; quotas never
  queue. The queue bounds waiting, it is not FIFO: a sleeper competes with new arrivals on waking.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

SECONDS_PER_DAY = 86400
# A queued request held back by a concurrency limit cannot know when a slot frees up: it sleeps
# this long and tries again (the async layer may wake it earlier, e.g. on a release).
QUEUE_POLL_SECONDS = 0.05
# Never tell a caller to sleep less than this, so float rounding cannot turn a wait into a spin.
MIN_WAIT_SECONDS = 0.001
_EPS = 1e-9


# --------------------------------------------------------------------------------------------------
# Configuration (what servers.toml / the keys file says), frozen so a reload can compare them.


@dataclass(frozen=True)
class LimitSpec:
    """Rate limits of one scope (the router as a whole, or one key). None = no such limit."""

    requests_per_second: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    @property
    def empty(self) -> bool:
        return (
            self.requests_per_second is None and self.max_concurrent is None and self.tokens_per_minute is None
        )


@dataclass(frozen=True)
class QuotaSpec:
    """Request quotas of one key. None = no such quota."""

    requests_total: int | None = None
    requests_per_day: int | None = None


@dataclass(frozen=True)
class KeyUsage:
    """What one key used: requests in total and on UTC day `day` (days since the epoch), tokens
    the engines reported, and its denials by limit name (only those > 0)."""

    requests_total: int = 0
    requests_today: int = 0
    day: int | None = None
    tokens: int = 0
    denied: Mapping[str, int] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class QueueSpec:
    """The wait queue: a limited request may wait up to `timeout` s while fewer than `max_queued` wait.

    `timeout = 0` (the default) answers 429 at once.
    """

    timeout: float = 0.0
    max_queued: int = 0

    @property
    def enabled(self) -> bool:
        return self.timeout > 0 and self.max_queued > 0


class KeyLimits(Protocol):
    """What LimitSet needs of a key (keys.ApiKey has it); limits never imports keys."""

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> LimitSpec | None: ...

    @property
    def quota(self) -> QuotaSpec | None: ...


# --------------------------------------------------------------------------------------------------
# The policies.


class TokenBucket:
    """Requests per second with bursts (see the module docstring for the formula)."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else float(max(1, math.ceil(rate)))
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._tokens = self.burst
        self._last: float | None = None

    def _refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        elapsed = now - self._last
        if elapsed > 0:  # a clock that steps back just refills nothing
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def wait_time(self, now: float, n: float = 1.0) -> float:
        """Seconds until `n` tokens are there (0 = now; inf = never, more than the burst)."""
        self._refill(now)
        if n > self.burst + _EPS:
            return math.inf
        missing = n - self._tokens
        return 0.0 if missing <= _EPS else missing / self.rate

    def consume(self, now: float, n: float = 1.0) -> None:
        self._refill(now)
        self._tokens -= n

    def try_acquire(self, now: float, n: float = 1.0) -> float:
        """Take `n` tokens and return 0, or take nothing and return the seconds to wait."""
        wait = self.wait_time(now, n)
        if wait == 0.0:
            self._tokens -= n
        return wait

    def reconfigure(self, rate: float, burst: float | None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else float(max(1, math.ceil(rate)))
        self._tokens = min(self._tokens, self.burst)


class ConcurrencyLimit:
    """Requests in flight, at most `limit` (None: count only)."""

    __slots__ = ("in_use", "limit", "underflows")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        # Releases with nothing acquired: a bug in the caller, counted so it shows, never applied.
        self.underflows = 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.in_use >= self.limit

    def try_acquire(self) -> bool:
        if self.full:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        if self.in_use > 0:
            self.in_use -= 1
        else:
            self.underflows += 1


class _Slot:
    __slots__ = ("amount", "live", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.amount = 0
        self.live = True


class Reservation:
    """Tokens charged up front for one request; settled once with the real usage."""

    __slots__ = ("_slot", "amount", "settled")

    def __init__(self, slot: _Slot, amount: int) -> None:
        self._slot = slot
        self.amount = amount
        self.settled = False


class TokensPerMinute:
    """Tokens per sliding window with reserve-then-settle (see the module docstring)."""

    __slots__ = ("_slots", "_used", "limit", "resolution", "window")

    def __init__(self, limit: int, *, window: float = 60.0, resolution: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.window = window
        self.resolution = resolution
        self._slots: deque[_Slot] = deque()
        self._used = 0

    def _expire(self, now: float) -> None:
        slots = self._slots
        horizon = self.window + self.resolution
        while slots and slots[0].start + horizon <= now:
            slot = slots.popleft()
            slot.live = False
            self._used -= slot.amount

    def _slot_at(self, now: float) -> _Slot:
        start = math.floor(now / self.resolution) * self.resolution
        slots = self._slots
        if slots and slots[-1].start >= start:  # same slot (or a clock that stepped back)
            return slots[-1]
        slot = _Slot(start)
        slots.append(slot)
        return slot

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used

    def clamp(self, amount: int) -> int:
        return max(0, min(int(amount), self.limit))

    def wait_time(self, now: float, amount: int) -> float:
        """Seconds until `amount` more tokens fit (0 = now; inf = never, more than the limit)."""
        self._expire(now)
        excess = self._used + amount - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        horizon = self.window + self.resolution
        for slot in self._slots:
            freed += slot.amount
            if freed >= excess:
                return max(0.0, slot.start + horizon - now)
        return math.inf

    def reserve(self, now: float, amount: int) -> Reservation:
        """Charge `amount` (clamped to the limit) now, without checking: call wait_time first."""
        amount = self.clamp(amount)
        self._expire(now)
        slot = self._slot_at(now)
        slot.amount += amount
        self._used += amount
        return Reservation(slot, amount)

    def settle(self, now: float, reservation: Reservation, actual: int) -> None:
        """Replace the reservation by the real usage; a second settle of one reservation is ignored."""
        if reservation.settled:
            return
        reservation.settled = True
        self._expire(now)
        delta = max(0, int(actual)) - reservation.amount
        if delta < 0:
            slot = reservation._slot
            if slot.live:  # an expired slot already gave its tokens back
                slot.amount += delta
                self._used += delta
        elif delta > 0:
            slot = self._slot_at(now)
            slot.amount += delta
            self._used += delta

    def add(self, now: float, amount: int) -> None:
        """Charge tokens that were never reserved."""
        if amount > 0:
            self._expire(now)
            self._slot_at(now).amount += amount
            self._used += amount


class Quota:
    """Requests in total and per UTC day (None: count only). Times are wall-clock epoch seconds."""

    __slots__ = ("_day", "requests_per_day", "requests_total", "used_today", "used_total")

    def __init__(self, requests_total: int | None = None, requests_per_day: int | None = None) -> None:
        self.requests_total = requests_total
        self.requests_per_day = requests_per_day
        self.used_total = 0
        self.used_today = 0
        self._day: int | None = None

    def _roll(self, wall: float) -> None:
        day = int(wall // SECONDS_PER_DAY)
        if day != self._day:
            # A wall clock stepped back across midnight starts a fresh count too: erring towards
            # allowing is the lesser harm for a counter that is not persisted anyway.
            self._day = day
            self.used_today = 0

    def check(self, wall: float) -> tuple[str, int | None] | None:
        """None if one more request fits, else (quota name, Retry-After seconds or None = never)."""
        self._roll(wall)
        if self.requests_total is not None and self.used_total >= self.requests_total:
            return "requests_total", None
        if self.requests_per_day is not None and self.used_today >= self.requests_per_day:
            next_midnight = (int(wall // SECONDS_PER_DAY) + 1) * SECONDS_PER_DAY
            return "requests_per_day", max(1, math.ceil(next_midnight - wall))
        return None

    def consume(self, wall: float) -> None:
        self._roll(wall)
        self.used_total += 1
        self.used_today += 1

    def requests_today(self, wall: float) -> int:
        self._roll(wall)
        return self.used_today

    @property
    def day(self) -> int | None:
        """The UTC day (days since the epoch) `used_today` counts, None before any use."""
        return self._day

    def restore(self, used_total: int, used_today: int, day: int | None) -> None:
        """Counters saved earlier: `used_today` counts for `day` only (the next look rolls it over)."""
        self.used_total = max(0, int(used_total))
        self.used_today = max(0, int(used_today)) if day is not None else 0
        self._day = day

    def reset(self) -> None:
        self.used_total = 0
        self.used_today = 0


# --------------------------------------------------------------------------------------------------
# LimitSet: scopes, tickets and decisions.

GLOBAL_SCOPE = "global"
LIMIT_NAMES = ("requests_per_second", "max_concurrent", "tokens_per_minute", "requests_total", "requests_per_day")


class Verdict(Enum):
    ALLOW = "allow"
    WAIT = "wait"  # sleep `LimitDecision.wait` seconds, then call LimitSet.admit again
    DENY = "deny"  # answer 429 with `LimitDecision.message` and `headers`


@dataclass(frozen=True)
class LimitDecision:
    verdict: Verdict
    wait: float = 0.0
    retry_after: int | None = None
    limit: str | None = None  # which limit held the request back (one of LIMIT_NAMES)
    scope: str | None = None  # GLOBAL_SCOPE or the key's name
    message: str = ""
    code: str | None = None  # "rate_limit_exceeded" or "insufficient_quota" (OpenAI's codes)
    status: int = 429

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


_ALLOW = LimitDecision(Verdict.ALLOW, status=200)


@dataclass(frozen=True)
class _Denial:
    scope: _Scope
    limit: str
    wait: float | None  # None: unknown (a concurrency slot); inf: never
    retry_after: int | None  # None: no wait cures it
    queueable: bool


_NO_LIMITS = LimitSpec()


def _fmt(x: float) -> str:
    return f"{x:g}"


class _Scope:
    """Counters and policies of one scope; mutated in place on reconfigure, so tickets stay valid."""

    __slots__ = (
        "admitted",
        "bucket",
        "concurrency",
        "denied",
        "label",
        "name",
        "queued",
        "quota",
        "quota_spec",
        "spec",
        "tokens_reported",
        "tpm",
    )

    def __init__(self, name: str, label: str, *, with_quota: bool) -> None:
        self.name = name
        self.label = label  # "key 'team-a'" or "the router (global)"
        self.spec: LimitSpec | None = None
        self.quota_spec: QuotaSpec | None = None
        self.bucket: TokenBucket | None = None
        self.concurrency = ConcurrencyLimit()
        self.tpm: TokensPerMinute | None = None
        self.quota: Quota | None = Quota() if with_quota else None
        self.admitted = 0
        self.queued = 0
        self.tokens_reported = 0
        self.denied: dict[str, int] = dict.fromkeys(LIMIT_NAMES, 0)

    def configure(self, spec: LimitSpec | None, quota: QuotaSpec | None) -> None:
        spec = spec or _NO_LIMITS
        if spec is not self.spec and spec != self.spec:
            self.spec = spec
            if spec.requests_per_second is None:
                self.bucket = None
            elif self.bucket is None:
                self.bucket = TokenBucket(spec.requests_per_second, spec.burst)
            else:
                self.bucket.reconfigure(spec.requests_per_second, spec.burst)
            self.concurrency.limit = spec.max_concurrent
            if spec.tokens_per_minute is None:
                self.tpm = None
            elif self.tpm is None:
                self.tpm = TokensPerMinute(spec.tokens_per_minute)
            else:
                self.tpm.limit = spec.tokens_per_minute
        if self.quota is not None and quota is not self.quota_spec and quota != self.quota_spec:
            self.quota_spec = quota
            self.quota.requests_total = quota.requests_total if quota else None
            self.quota.requests_per_day = quota.requests_per_day if quota else None

    def check(self, now: float, wall: Callable[[], float], tokens: int, out: list[_Denial]) -> None:
        if self.quota is not None and (
            self.quota.requests_total is not None or self.quota.requests_per_day is not None
        ):
            hit = self.quota.check(wall())
            if hit is not None:
                out.append(_Denial(self, hit[0], math.inf, hit[1], queueable=False))
        if self.bucket is not None:
            wait = self.bucket.wait_time(now)
            if wait > 0:
                out.append(_Denial(self, "requests_per_second", wait, _ceil_retry(wait), queueable=True))
        if self.concurrency.full:
            out.append(_Denial(self, "max_concurrent", None, 1, queueable=True))
        if self.tpm is not None:
            wait = self.tpm.wait_time(now, self.tpm.clamp(tokens))
            if wait > 0:
                out.append(_Denial(self, "tokens_per_minute", wait, _ceil_retry(wait), queueable=True))

    def describe(self, limit: str) -> str:
        spec = self.spec or LimitSpec()
        qs = self.quota_spec or QuotaSpec()
        if limit == "requests_per_second":
            return f"rate limit 'requests_per_second' of {self.label} exceeded ({_fmt(spec.requests_per_second or 0)}/s)"
        if limit == "max_concurrent":
            return f"concurrency limit 'max_concurrent' of {self.label} exceeded ({spec.max_concurrent} requests in flight)"
        if limit == "tokens_per_minute":
            return f"rate limit 'tokens_per_minute' of {self.label} exceeded ({spec.tokens_per_minute} tokens/min)"
        if limit == "requests_per_day":
            return f"quota 'requests_per_day' of {self.label} used up ({qs.requests_per_day} requests/day, resets at 00:00 UTC)"
        return f"quota 'requests_total' of {self.label} used up ({qs.requests_total} requests)"


def _ceil_retry(wait: float) -> int | None:
    if math.isinf(wait):
        return None
    return max(1, math.ceil(wait - _EPS))


class Ticket:
    """One request's passage through a LimitSet: created on arrival, admitted, settled, released."""

    __slots__ = ("admitted", "created", "estimate", "key_name", "queued", "released", "reservations", "scopes", "settled")

    def __init__(self, scopes: tuple[_Scope, ...], key_name: str | None, estimate: int, created: float) -> None:
        self.scopes = scopes
        self.key_name = key_name
        self.estimate = max(0, int(estimate))
        self.created = created
        self.queued = False
        self.admitted = False
        self.settled = False
        self.released = False
        self.reservations: list[tuple[TokensPerMinute, Reservation]] = []

    def __repr__(self) -> str:
        state = "released" if self.released else "admitted" if self.admitted else "queued" if self.queued else "new"
        return f"Ticket(key={self.key_name!r}, estimate={self.estimate}, {state})"


class LimitSet:
    """Global limits plus per-key limits and quotas, giving one decision per request.

    Use, from the async layer (one task per request, no await between the calls of one step):

        ticket = limits.ticket(key, estimate_tokens(body))
        while (d := limits.admit(ticket)).verdict is Verdict.WAIT:
            await asyncio.sleep(d.wait)
        if not d.allowed:
            limits.release(ticket); return error_response(429, d.message, code=d.code, headers=d.headers)
        try: ... proxy, then limits.settle(ticket, usage.prompt_tokens + usage.completion_tokens) ...
        finally: limits.release(ticket)
    """

    def __init__(
        self,
        limits: LimitSpec | None = None,
        queue: QueueSpec | None = None,
        *,
        now: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._now = now
        self._wall = wall
        self._global = _Scope(GLOBAL_SCOPE, "the router (global)", with_quota=False)
        self._keys: dict[str, _Scope] = {}
        self.queue = QueueSpec()
        self.queued = 0
        self.update(limits, queue)

    def update(self, limits: LimitSpec | None, queue: QueueSpec | None = None) -> None:
        """New global limits (hot reload); counters and requests in flight are kept."""
        self._global.configure(limits, None)
        self.queue = queue or QueueSpec()

    def prune(self, keep: Iterable[str]) -> None:
        """Forget the state of keys no longer configured (their tickets in flight still release fine)."""
        keep = set(keep)
        for name in [n for n in self._keys if n not in keep]:
            del self._keys[name]

    def _scope_for(self, key: KeyLimits) -> _Scope:
        scope = self._keys.get(key.name)
        if scope is None:
            scope = self._keys[key.name] = _Scope(key.name, f"key '{key.name}'", with_quota=True)
        scope.configure(key.limits, key.quota)  # cheap when unchanged: two dataclass compares
        return scope

    def ticket(self, key: KeyLimits | None, estimate_tokens: int = 0) -> Ticket:
        """Start a request; `key` None when auth is open. Its queue time counts from now."""
        scopes = (self._global,) if key is None else (self._global, self._scope_for(key))
        return Ticket(scopes, key.name if key is not None else None, estimate_tokens, self._now())

    def admit(self, ticket: Ticket) -> LimitDecision:
        """Allow (and charge every limit), tell the caller to wait and ask again, or deny (429)."""
        if ticket.released:
            raise ValueError(f"{ticket!r} was released; start a new ticket")
        if ticket.admitted:
            return _ALLOW
        now = self._now()
        denials: list[_Denial] = []
        for scope in ticket.scopes:
            scope.check(now, self._wall, ticket.estimate, denials)
        if not denials:
            self._charge(ticket, now)
            return _ALLOW

        return self._decide(ticket, now, denials)

    def admit_shared(self, ticket: Ticket, denials: Iterable[tuple[str, str, float | None]]) -> LimitDecision:
        """The decision of limits kept elsewhere (router/cluster.py: Redis, shared by several routers):
        `denials` as (scope name, limit name, wait: None unknown, inf never), empty when that store
        admitted and charged the request. Queues, denies and counts as `admit` does; on allow, charges
        the local counters without checking them (they only count, and warm the fallback)."""
        if ticket.released:
            raise ValueError(f"{ticket!r} was released; start a new ticket")
        if ticket.admitted:
            return _ALLOW
        now = self._now()
        by_name = {scope.name: scope for scope in ticket.scopes}
        found: list[_Denial] = []
        for scope_name, limit, wait in denials:
            scope = by_name.get(scope_name, ticket.scopes[-1])
            retry = 1 if wait is None else _ceil_retry(wait)
            queueable = limit not in ("requests_total", "requests_per_day")
            found.append(_Denial(scope, limit, wait, retry, queueable=queueable))
        if not found:
            self._charge(ticket, now, checked=False)
            return _ALLOW
        return self._decide(ticket, now, found)

    def _decide(self, ticket: Ticket, now: float, denials: list[_Denial]) -> LimitDecision:
        worst = max(denials, key=lambda d: (d.retry_after is None, d.retry_after or 0, d.wait or 0.0))
        decision = self._maybe_queue(ticket, now, denials, worst)
        if decision is not None:
            return decision
        self._leave_queue(ticket)
        worst.scope.denied[worst.limit] += 1
        message = worst.scope.describe(worst.limit)
        if worst.retry_after is not None:
            message += f"; retry after {worst.retry_after} s"
        is_quota = worst.limit in ("requests_total", "requests_per_day")
        return LimitDecision(
            Verdict.DENY,
            retry_after=worst.retry_after,
            limit=worst.limit,
            scope=worst.scope.name,
            message=message,
            code="insufficient_quota" if is_quota else "rate_limit_exceeded",
        )

    def _maybe_queue(self, ticket: Ticket, now: float, denials: list[_Denial], worst: _Denial) -> LimitDecision | None:
        queue = self.queue
        if not queue.enabled or not all(d.queueable for d in denials):
            return None
        remaining = ticket.created + queue.timeout - now
        need = max((d.wait for d in denials if d.wait is not None), default=0.0)
        if remaining <= 0 or need > remaining:
            return None  # the wait will not fit: say so now rather than after a pointless sleep
        if not ticket.queued:
            if self.queued >= queue.max_queued:
                return None
            ticket.queued = True
            self.queued += 1
            for scope in ticket.scopes:
                scope.queued += 1
        if any(d.wait is None for d in denials):
            need = max(need, QUEUE_POLL_SECONDS)
        wait = max(MIN_WAIT_SECONDS, min(need, remaining))
        return LimitDecision(Verdict.WAIT, wait=wait, limit=worst.limit, scope=worst.scope.name, status=200)

    def _leave_queue(self, ticket: Ticket) -> None:
        if ticket.queued:
            ticket.queued = False
            self.queued -= 1
            for scope in ticket.scopes:
                scope.queued -= 1

    def _charge(self, ticket: Ticket, now: float, *, checked: bool = True) -> None:
        wall: float | None = None
        for scope in ticket.scopes:
            if scope.bucket is not None:
                scope.bucket.consume(now)
            if checked:
                scope.concurrency.try_acquire()  # checked above; always succeeds
            else:  # admitted elsewhere: counted even past the local limit, released as usual
                scope.concurrency.in_use += 1
            if scope.tpm is not None:
                ticket.reservations.append((scope.tpm, scope.tpm.reserve(now, ticket.estimate)))
            if scope.quota is not None:
                if wall is None:
                    wall = self._wall()
                scope.quota.consume(wall)
            scope.admitted += 1
        ticket.admitted = True
        self._leave_queue(ticket)

    def settle(self, ticket: Ticket, used_tokens: int) -> None:
        """The usage the engine reported (prompt + completion, streamed usage too); once per ticket."""
        if not ticket.admitted or ticket.settled:
            return
        ticket.settled = True
        now = self._now()
        used = max(0, int(used_tokens))
        for tpm, reservation in ticket.reservations:
            tpm.settle(now, reservation, used)
        for scope in ticket.scopes:
            scope.tokens_reported += used

    def release(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or abandoned). Idempotent.

        An unsettled reservation stays charged: the engine may have spent those tokens.
        """
        if ticket.released:
            return
        ticket.released = True
        self._leave_queue(ticket)
        if ticket.admitted:
            for scope in ticket.scopes:
                scope.concurrency.release()

    # -- per-key usage, saved and restored across restarts (router/access/usage_store.py) ----------------------

    def _key_scope(self, name: str) -> _Scope:
        scope = self._keys.get(name)
        if scope is None:  # configured on the key's first request, as _scope_for does
            scope = self._keys[name] = _Scope(name, f"key '{name}'", with_quota=True)
        return scope

    def export_usage(self) -> dict[str, KeyUsage]:
        """What each key has used so far: the numbers a restart must not lose."""
        wall = self._wall()
        out = {}
        for name, scope in self._keys.items():
            quota = scope.quota
            assert quota is not None  # key scopes always count
            today = quota.requests_today(wall)  # rolls over first, so `day` is today's
            out[name] = KeyUsage(
                requests_total=quota.used_total,
                requests_today=today,
                day=quota.day if quota.day is not None else int(wall // SECONDS_PER_DAY),
                tokens=scope.tokens_reported,
                denied={k: v for k, v in scope.denied.items() if v},
            )
        return out

    def restore_usage(self, name: str, usage: KeyUsage) -> None:
        """Set a key's counters to saved ones (at start, before its first request)."""
        scope = self._key_scope(name)
        assert scope.quota is not None
        scope.quota.restore(usage.requests_total, usage.requests_today, usage.day)
        scope.tokens_reported = max(0, int(usage.tokens))
        for limit, n in usage.denied.items():
            if limit in scope.denied:
                scope.denied[limit] = max(0, int(n))

    def reset_usage(self, name: str) -> None:
        """Zero a key's quota counters, tokens and denials (requests in flight keep their slots)."""
        scope = self._key_scope(name)
        assert scope.quota is not None
        scope.quota.reset()
        scope.tokens_reported = 0
        scope.admitted = 0
        scope.denied = dict.fromkeys(LIMIT_NAMES, 0)

    def counters(self) -> dict[str, dict[str, float]]:
        """Plain numbers per scope ("global", then each key), for /metrics and the dashboard.

        Always present: admitted, in_flight, queued, tokens_reported and denied_<limit> for every
        limit name. When configured: bucket_tokens, tokens_in_window; for keys: requests_today and
        requests_total.
        """
        now = self._now()
        wall = self._wall()
        out: dict[str, dict[str, float]] = {}
        for scope in (self._global, *self._keys.values()):
            c: dict[str, float] = {
                "admitted": scope.admitted,
                "in_flight": scope.concurrency.in_use,
                "queued": scope.queued,
                "tokens_reported": scope.tokens_reported,
            }
            for limit, n in scope.denied.items():
                c[f"denied_{limit}"] = n
            if scope.bucket is not None:
                c["bucket_tokens"] = scope.bucket.available(now)
            if scope.tpm is not None:
                c["tokens_in_window"] = scope.tpm.used(now)
            if scope.quota is not None:
                c["requests_today"] = scope.quota.requests_today(wall)
                c["requests_total"] = scope.quota.used_total
            out[scope.name] = c
        return out


# --------------------------------------------------------------------------------------------------
# Up-front estimate of a request's tokens, from its parsed JSON body.


def estimate_tokens(body: Mapping[str, Any], *, chars_per_token: float = 4.0, default_completion: int = 256) -> int:
    """Prompt tokens (text length / `chars_per_token`, token-id lists counted as is) plus the
    completion budget (`max_completion_tokens`, `max_tokens` or `max_output_tokens`, times `n`;
    `default_completion` when the request sets none; pass 0 for embeddings). Never raises on odd
    bodies: unknown shapes count as nothing, so a hostile body cannot break the limiter.
    """
    chars = 0
    ids = 0

    def text_of(value: Any) -> None:
        nonlocal chars, ids
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            for item in value[:100_000]:  # bounded even for a body that is one long list
                if isinstance(item, str):
                    chars += len(item)
                elif isinstance(item, int):
                    ids += 1
                elif isinstance(item, list):
                    ids += sum(1 for x in item if isinstance(x, int))
                elif isinstance(item, Mapping):
                    part = item.get("text")
                    if isinstance(part, str):
                        chars += len(part)
                    content = item.get("content")
                    if isinstance(content, str):  # chat messages
                        chars += len(content)
                    elif isinstance(content, list):
                        for p in content[:10_000]:
                            if isinstance(p, Mapping) and isinstance(p.get("text"), str):
                                chars += len(p["text"])

    if not isinstance(body, Mapping):
        return default_completion
    for field in ("messages", "prompt", "input", "instructions"):
        if field in body:
            text_of(body[field])
    completion = default_completion
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            completion = value
            break
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128:
        completion *= n
    return ids + math.ceil(chars / chars_per_token) + completion
