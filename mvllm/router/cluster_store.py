"""ClusterStore: the state several routers share through one Redis (limits, leases, key and drain
sets, the fleet-wide load lock, the event log, change notifications), a pure I/O adapter.

Every verb is one round trip (a Lua script from router/cluster_scripts.py, or one command or
pipeline), so limits stay exact across routers. When Redis cannot be reached, a verb raises
ClusterUnavailable within about one socket timeout, and for `retry_interval` s afterwards at once
(no caller waits on a dead server twice); the next call after that tries again, so the store
reconnects by itself. What to do instead (local limits, 503) is the caller's choice.

A `key_id` is the caller's scope name, shared by every router: keep scopes apart (e.g. "global"
and "key:<name>", so no key can be called "global"). `now`, where a verb takes it, is epoch
seconds (quotas count UTC days from it); leave it None in production to use Redis's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mvllm.router import cluster_scripts as scripts
from mvllm.router.cluster_scripts import (
    Admission,
    Check,
    Lease,
    QuotaCheck,
    RateCheck,
    SlotCheck,
    TokenCheck,
    TokenReservation,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# What "Redis is not there" looks like from the client; anything else (a script error, a wrong
# type) is a bug and propagates as is.
_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


def redact_url(url: str) -> str:
    """The URL without its password, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


class ClusterUnavailable(Exception):
    """Redis could not be reached (or did not answer in time); the verb did nothing or is unknown."""


@dataclass(frozen=True)
class Change:
    """A notification from another router: `kind` is "keys", "drain", "resync" (after connecting or
    reconnecting the watcher: changes may have been missed, read everything again) or the kind a
    caller published; `data` is what it sent."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None  # router_id of the sender (a router may ignore its own changes)


@dataclass(frozen=True)
class QuotaUsage:
    requests_total: int
    requests_today: int
    day: int | None


class ClusterStore:
    """Shared state under `prefix` in the Redis at `url`; one instance per router process."""

    def __init__(
        self,
        url: str,
        prefix: str = "mvllm:",
        *,
        router_id: str | None = None,
        socket_timeout: float = 0.5,
        retry_interval: float = 1.0,
        events_max: int = 10_000,
    ) -> None:
        self.url = url
        self.display_url = redact_url(url)
        self.prefix = prefix
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self.retry_interval = retry_interval
        self.events_max = events_max
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # One immediate retry replaces a connection that a Redis restart left broken; a server
            # that is really gone fails the retry too, so the caller still hears it within ~2 timeouts.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self._admit = self._redis.register_script(scripts.ADMIT)
        self._add_tokens = self._redis.register_script(scripts.ADD_TOKENS)
        self._finish = self._redis.register_script(scripts.FINISH)
        self._tokens_in_window = self._redis.register_script(scripts.TOKENS_IN_WINDOW)
        self._refresh = self._redis.register_script(scripts.REFRESH_LEASES)
        self._slots_in_use = self._redis.register_script(scripts.SLOTS_IN_USE)
        self._release_lock = self._redis.register_script(scripts.RELEASE_LOCK)
        self._extend_lock = self._redis.register_script(scripts.EXTEND_LOCK)
        self._leases: dict[str, Lease] = {}  # lease_id -> lease: what refresh_leases keeps alive
        self._healthy = True
        self._down_until = 0.0
        self._last_error: str | None = None

    # -- health -----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False from a failed call until the next one that succeeds."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.prefix}{kind}:{name}" if name else f"{self.prefix}{kind}"

    @property
    def channel(self) -> str:
        return self._key("changed")

    def _mark_down(self, exc: BaseException) -> ClusterUnavailable:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._down_until = time.monotonic() + self.retry_interval
        if self._healthy:  # logged once per outage, not once per request
            log.warning("cluster store: Redis at %s unreachable (%s)", self.display_url, self._last_error)
        self._healthy = False
        return ClusterUnavailable(f"Redis at {self.display_url} unreachable: {self._last_error}")

    def _mark_up(self) -> None:
        if not self._healthy:
            log.warning("cluster store: Redis at %s reachable again", self.display_url)
        self._healthy = True

    async def _run(self, op: Callable[[], Awaitable[T]]) -> T:
        if not self._healthy and time.monotonic() < self._down_until:
            raise ClusterUnavailable(f"Redis at {self.display_url} unreachable: {self._last_error}")
        try:
            result = await op()
        except _DOWN_ERRORS as exc:
            raise self._mark_down(exc) from exc
        self._mark_up()
        return result

    async def ping(self) -> bool:
        """True when Redis answers; False (not an exception) when it does not."""
        try:
            await self._run(self._redis.ping)
        except ClusterUnavailable:
            return False
        return True

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> ClusterStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- limits: one atomic admission over any number of checks -----------------------------------

    def _now_arg(self, now: float | None) -> str:
        return "" if now is None else repr(float(now))

    async def admit(self, checks: Sequence[Check], *, now: float | None = None) -> Admission:
        """Check every limit and, only when all allow, charge them all (leases taken, tokens reserved,
        quotas counted). The leases are refreshed by refresh_leases until released."""
        if not checks:
            return Admission(True)
        keys = [scripts.redis_key(self.prefix, c) for c in checks]
        lease_ids = [self._new_lease_id() if isinstance(c, SlotCheck) else None for c in checks]
        argv = [scripts.encode_checks(checks, lease_ids), self._now_arg(now)]
        reply = await self._run(lambda: self._admit(keys=keys, args=argv))
        admission = scripts.parse_admission(reply, checks, keys, lease_ids)
        for lease in admission.leases:
            self._leases[lease.lease_id] = lease
        return admission

    def _new_lease_id(self) -> str:
        return f"{self.router_id}:{uuid.uuid4().hex[:16]}"

    async def try_acquire_rate(
        self, key_id: str, rate: float, burst: float | None = None, *, now: float | None = None
    ) -> float:
        """Take one request from `key_id`'s rate (GCRA): 0.0 if taken, else the seconds to wait."""
        admission = await self.admit([RateCheck(key_id, rate, burst)], now=now)
        worst = admission.worst
        return 0.0 if worst is None else (worst.wait if worst.wait is not None else math.inf)

    async def acquire_slot(
        self, key_id: str, limit: int | None, ttl_s: float = 5.0, *, now: float | None = None
    ) -> Lease | None:
        """A concurrency lease on `key_id` while fewer than `limit` are live, else None."""
        admission = await self.admit([SlotCheck(key_id, limit, ttl_s)], now=now)
        return admission.leases[0] if admission.allowed else None

    async def release_slot(self, lease: Lease) -> None:
        """Give a lease back (idempotent). Forgotten locally even when Redis is down: it lapses there."""
        self._leases.pop(lease.lease_id, None)
        await self._run(lambda: self._redis.zrem(lease.redis_key, lease.lease_id))

    async def release_all(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            self._leases.pop(lease.lease_id, None)
        if not leases:
            return

        async def op() -> None:
            pipe = self._redis.pipeline(transaction=False)
            for lease in leases:
                pipe.zrem(lease.redis_key, lease.lease_id)
            await pipe.execute()

        await self._run(op)

    async def finish(self, admission: Admission, used_tokens: int | None = None, *, now: float | None = None) -> None:
        """A request is over: settle its token reservations with `used_tokens` (None: leave them
        charged, the engine may have spent them) and release its leases, in one round trip."""
        for lease in admission.leases:
            self._leases.pop(lease.lease_id, None)
        if not admission.leases and (used_tokens is None or not admission.reservations):
            return
        keys = [r.redis_key for r in admission.reservations] + [lease.redis_key for lease in admission.leases]
        argv = [str(len(admission.reservations)), self._now_arg(now), "" if used_tokens is None else str(int(used_tokens))]
        for r in admission.reservations:
            argv += [r.slot, str(r.amount), repr(r.window_s), repr(r.resolution_s)]
        argv += [lease.lease_id for lease in admission.leases]
        await self._run(lambda: self._finish(keys=keys, args=argv))

    @property
    def held_leases(self) -> int:
        return len(self._leases)

    async def refresh_leases(self, ttl_s: float | None = None, *, now: float | None = None) -> int:
        """Heartbeat: push every held lease's expiry to now + its ttl (or `ttl_s`). Returns how many
        were still live; a lease that lapsed (Redis down longer than its ttl) is forgotten."""
        leases = list(self._leases.values())
        if not leases:
            return 0
        ttl = ttl_s if ttl_s is not None else max(lease.ttl_s for lease in leases)
        keys = [lease.redis_key for lease in leases]
        argv = ["", self._now_arg(now), repr(float(ttl)), *(lease.lease_id for lease in leases)]
        lapsed = await self._run(lambda: self._refresh(keys=keys, args=argv))
        for lease_id in lapsed:
            self._leases.pop(lease_id.decode() if isinstance(lease_id, bytes) else str(lease_id), None)
        return len(leases) - len(lapsed)

    async def heartbeat(self, interval_s: float = 1.5) -> None:
        """refresh_leases every `interval_s` until cancelled (a background task; keep the interval
        well under the leases' ttl). An outage is ridden out: leases that lapse meanwhile are dropped."""
        while True:
            with contextlib.suppress(ClusterUnavailable):
                await self.refresh_leases()
            await asyncio.sleep(interval_s)

    async def slots_in_use(self, key_id: str, *, now: float | None = None) -> int:
        key = scripts.redis_key(self.prefix, SlotCheck(key_id, None))
        return int(await self._run(lambda: self._slots_in_use(keys=[key], args=["", self._now_arg(now)])))

    async def reserve_tokens(
        self, key_id: str, limit: int, amount: int, *, window_s: float = 60.0, now: float | None = None
    ) -> TokenReservation | float:
        """Reserve `amount` tokens (clamped to `limit`) in the window: the reservation, or the seconds
        to wait (math.inf: never)."""
        admission = await self.admit([TokenCheck(key_id, limit, amount, window_s)], now=now)
        if admission.allowed:
            return admission.reservations[0]
        worst = admission.worst
        assert worst is not None
        return worst.wait if worst.wait is not None else math.inf

    async def settle_tokens(self, reservation: TokenReservation, actual: int, *, now: float | None = None) -> None:
        """Replace a reservation by the real usage: refund the difference to its slot, or charge more now."""
        delta = max(0, int(actual)) - reservation.amount
        if delta:
            await self._tokens(reservation.redis_key, delta, reservation, now)

    async def add_tokens(self, key_id: str, n: int, *, window_s: float = 60.0, now: float | None = None) -> None:
        """Charge tokens that were never reserved (counted even past the limit: they were spent)."""
        if n > 0:
            key = scripts.redis_key(self.prefix, TokenCheck(key_id, 1, 0))
            await self._tokens(key, int(n), TokenReservation(key, "", 0, window_s, 1.0), now)

    async def _tokens(self, key: str, delta: int, r: TokenReservation, now: float | None) -> None:
        argv = [r.slot, self._now_arg(now), str(delta), repr(r.window_s), repr(r.resolution_s)]
        await self._run(lambda: self._add_tokens(keys=[key], args=argv))

    async def tokens_in_window(
        self, key_id: str, *, window_s: float = 60.0, resolution_s: float = 1.0, now: float | None = None
    ) -> int:
        key = scripts.redis_key(self.prefix, TokenCheck(key_id, 1, 0))
        argv = ["", self._now_arg(now), repr(window_s), repr(resolution_s)]
        return int(await self._run(lambda: self._tokens_in_window(keys=[key], args=argv)))

    # -- quotas ------------------------------------------------------------------------------------

    def _quota_key(self, key_id: str) -> str:
        return scripts.redis_key(self.prefix, QuotaCheck(key_id))

    async def quota_usage(self, key_id: str) -> QuotaUsage:
        """Requests counted so far; `requests_today` is for UTC day `day` (compare with today's)."""
        raw = await self._run(lambda: self._redis.hmget(self._quota_key(key_id), "total", "day", "today"))
        total, day, today = (int(x) if x is not None else None for x in raw)
        return QuotaUsage(total or 0, today or 0, day)

    async def restore_quota(self, key_id: str, usage: QuotaUsage) -> bool:
        """Seed a key's counters (a first router importing usage_store's numbers); never overwrites
        counters another router already keeps. True when seeded."""

        async def op() -> bool:
            key = self._quota_key(key_id)
            pipe = self._redis.pipeline(transaction=True)
            pipe.hsetnx(key, "total", int(usage.requests_total))
            if usage.day is not None:
                pipe.hsetnx(key, "day", int(usage.day))
                pipe.hsetnx(key, "today", int(usage.requests_today))
            return bool((await pipe.execute())[0])

        return await self._run(op)

    async def reset_quota(self, key_id: str) -> None:
        await self._run(lambda: self._redis.delete(self._quota_key(key_id)))

    # -- key enable/disable and node drain: shared sets, with a change notification ---------------

    async def _set_member(self, kind: str, name: str, present: bool, change: Change) -> None:
        async def op() -> None:
            pipe = self._redis.pipeline(transaction=True)
            if present:
                pipe.sadd(self._key(kind), name)
            else:
                pipe.srem(self._key(kind), name)
            pipe.publish(self.channel, self._change_message(change.kind, change.data))
            await pipe.execute()

        await self._run(op)

    async def _members(self, kind: str) -> set[str]:
        raw = await self._run(lambda: self._redis.smembers(self._key(kind)))
        return {x.decode() if isinstance(x, bytes) else str(x) for x in raw}

    async def set_key_enabled(self, name: str, enabled: bool) -> None:
        await self._set_member("disabled_keys", name, not enabled, Change("keys", {"key": name, "enabled": enabled}))

    async def disabled_keys(self) -> set[str]:
        return await self._members("disabled_keys")

    async def set_drained(self, node: str, drained: bool) -> None:
        await self._set_member("drained", node, drained, Change("drain", {"node": node, "drained": drained}))

    async def drained_nodes(self) -> set[str]:
        return await self._members("drained")

    # -- one cold load per model, fleet-wide ------------------------------------------------------

    def _lock_key(self, model: str) -> str:
        return self._key("load_lock", model)

    async def acquire_load_lock(self, model: str, ttl_s: float = 60.0) -> str | None:
        """The lock's token if this router may load `model` now, else None (another router is).

        The lock lapses after `ttl_s` unless extended, so a router dying mid-load blocks no one long."""
        token = f"{self.router_id}:{uuid.uuid4().hex[:16]}"
        ok = await self._run(lambda: self._redis.set(self._lock_key(model), token, nx=True, px=int(ttl_s * 1000)))
        return token if ok else None

    async def extend_load_lock(self, model: str, token: str, ttl_s: float = 60.0) -> bool:
        key = self._lock_key(model)
        return bool(await self._run(lambda: self._extend_lock(keys=[key], args=[token, int(ttl_s * 1000)])))

    async def release_load_lock(self, model: str, token: str) -> bool:
        """Release only one's own lock (False: it lapsed, and someone else may hold it now)."""
        key = self._lock_key(model)
        return bool(await self._run(lambda: self._release_lock(keys=[key], args=[token])))

    async def load_lock_holder(self, model: str) -> str | None:
        raw = await self._run(lambda: self._redis.get(self._lock_key(model)))
        return raw.decode() if isinstance(raw, bytes) else raw

    # -- the event log: a capped stream ------------------------------------------------------------

    async def append_event(self, event: dict[str, Any]) -> str:
        """Add one event (JSON-able) to the shared log, capped near `events_max`; returns its id."""
        payload = json.dumps({**event, "router": self.router_id}, separators=(",", ":"), default=str)
        raw = await self._run(
            lambda: self._redis.xadd(self._key("events"), {"e": payload}, maxlen=self.events_max, approximate=True)
        )
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def events(self, count: int = 100, after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The last `count` events, oldest first, or the first `count` after event id `after`."""

        async def op() -> list[Any]:
            if after is None:
                return list(reversed(await self._redis.xrevrange(self._key("events"), count=count)))
            return await self._redis.xrange(self._key("events"), min=f"({after}", count=count)

        out = []
        for event_id, fields in await self._run(op):
            eid = event_id.decode() if isinstance(event_id, bytes) else event_id
            out.append((eid, json.loads(fields[b"e"] if b"e" in fields else fields["e"])))
        return out

    # -- each router's own figures, for a view of the whole (the dashboard, /load-stats) -----------

    async def put_router_stats(self, stats: dict[str, Any], ttl_s: float = 5.0) -> None:
        """Publish this router's figures (JSON-able); they count as gone `ttl_s` s after the last put."""
        payload = json.dumps({**stats, "expires": time.time() + ttl_s}, separators=(",", ":"), default=str)
        await self._run(lambda: self._redis.hset(self._key("routers"), self.router_id, payload))

    async def router_stats(self) -> dict[str, dict[str, Any]]:
        """Every live router's last figures by router_id (stale entries are dropped, there too)."""

        async def op() -> dict[str, dict[str, Any]]:
            raw = await self._redis.hgetall(self._key("routers"))
            out: dict[str, dict[str, Any]] = {}
            stale: list[Any] = []
            now = time.time()
            for rid, payload in raw.items():
                try:
                    doc = json.loads(payload)
                except ValueError:
                    doc = {}
                if float(doc.get("expires", 0)) < now:
                    stale.append(rid)
                    continue
                out[rid.decode() if isinstance(rid, bytes) else str(rid)] = doc
            if stale:
                await self._redis.hdel(self._key("routers"), *stale)
            return out

        return await self._run(op)

    async def forget_router(self) -> None:
        """At a clean stop: this router's figures leave the view at once."""
        await self._run(lambda: self._redis.hdel(self._key("routers"), self.router_id))

    # -- change notifications ----------------------------------------------------------------------

    def _change_message(self, kind: str, data: dict[str, Any]) -> str:
        return json.dumps({"kind": kind, "data": data, "origin": self.router_id}, separators=(",", ":"))

    async def publish_change(self, kind: str, data: dict[str, Any] | None = None) -> None:
        """Tell every watching router that `kind` changed (set_key_enabled and set_drained do it)."""
        message = self._change_message(kind, data or {})
        await self._run(lambda: self._redis.publish(self.channel, message))

    async def watch(
        self,
        on_change: Callable[[Change], Awaitable[None] | None],
        *,
        reconnect_delay: float = 0.5,
        ping_interval: float = 2.0,
    ) -> None:
        """Deliver changes to `on_change` until cancelled (run it as a background task). After every
        (re)subscription it first delivers Change("resync"): what happened while disconnected is lost,
        so the receiver reads the sets again. Never raises for Redis being down; keeps retrying."""
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._mark_up()
                await _deliver(on_change, Change("resync"))
                last_ping = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=min(1.0, ping_interval))
                    if message is not None and message.get("type") == "message":
                        await _deliver(on_change, _parse_change(message.get("data")))
                    if time.monotonic() - last_ping >= ping_interval:
                        # A cut that sends no FIN (network gone) shows only when we speak.
                        await pubsub.ping()
                        last_ping = time.monotonic()
            except _DOWN_ERRORS as exc:
                self._mark_down(exc)
            finally:
                with contextlib.suppress(*_DOWN_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(reconnect_delay)


def _parse_change(raw: Any) -> Change:
    try:
        obj = json.loads(raw)
        return Change(str(obj["kind"]), dict(obj.get("data") or {}), obj.get("origin"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return Change("resync")  # unreadable: the safe reading is "something changed"


async def _deliver(on_change: Callable[[Change], Awaitable[None] | None], change: Change) -> None:
    result = on_change(change)
    if inspect.isawaitable(result):
        await result
