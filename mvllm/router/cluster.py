"""Several routers as one, through the Redis of `[cluster] redis_url`: the glue between the app and
the ClusterStore. It connects at start, keeps this router's leases and figures alive (heartbeat),
applies key enable/disable and node drains made on other routers (pub/sub, then a re-read after
every reconnect), forwards this router's events to the shared log, and gives the admin API the
fleet-wide load lock. Without redis_url none of this exists and the router keeps all in memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from mvllm.common.tasks import background_task
from mvllm.router.access.shared import KEY_SCOPE_PREFIX, SharedLimits
from mvllm.router.cluster_store import Change, ClusterStore, ClusterUnavailable, QuotaUsage
from mvllm.router.config import ClusterConfig
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.cluster")

# How often this router refreshes its leases and publishes its figures; well under lease_ttl.
HEARTBEAT_S = 1.0
# Events kept locally while Redis is down or slow, waiting to be forwarded (older ones drop).
EVENTS_BUFFERED = 1000
EVENTS_FLUSH_S = 0.5


class _Forward(logging.Handler):
    """Copies this router's log records (info and up) into a bounded buffer for the shared log."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.buffer: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS_BUFFERED)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("mvllm.router.cluster", "mvllm.router.access.shared")):
            return  # the cluster's own state changes would echo every outage into the log it lost
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self.buffer.append({"time": record.created, "level": record.levelname, "logger": record.name, "message": message})


class Cluster:
    """One router's membership of the cluster: the store, the shared limits and the sync loops."""

    def __init__(self, config: ClusterConfig, state: RouterState) -> None:
        assert config.redis_url is not None
        self.config = config
        self.state = state
        router_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.store = ClusterStore(config.redis_url, config.key_prefix, router_id=router_id)
        self.shared = SharedLimits(self.store, config.on_redis_down, config.lease_ttl)
        self.routers: dict[str, dict[str, Any]] = {}  # the last view of every live router
        self.listen: str | None = None  # host:port, for the view
        self.log_handler = _Forward()  # attached to the mvllm loggers while the app runs

    @property
    def router_id(self) -> str:
        return self.store.router_id

    # -- changes made on other routers ----------------------------------------------------------

    async def on_change(self, change: Change) -> None:
        try:
            if change.kind == "resync":
                await self.resync()
            elif change.origin == self.router_id:
                return  # applied here already
            elif change.kind == "keys":
                self._apply_key(str(change.data.get("key", "")), bool(change.data.get("enabled", True)))
            elif change.kind == "drain":
                self._apply_drain(str(change.data.get("node", "")), bool(change.data.get("drained", False)))
        except ClusterUnavailable:
            pass  # the watcher reconnects and delivers "resync" again
        except Exception:  # a bug here must not end the watch: later changes would be lost
            log.exception("cluster: applying %s from another router failed", change.kind)

    async def resync(self) -> None:
        """Read the shared key and drain sets again (at start, after any reconnect)."""
        disabled = await self.store.disabled_keys()
        drained = await self.store.drained_nodes()
        gate = self.state.gate
        for key in gate.config.keys:
            live = gate.store.by_name(key.name)
            override = gate.overrides.get(key.name)
            if key.name in disabled:
                if live is not None and live.enabled:
                    self._apply_key(key.name, False)
            elif override is not None and not override.enabled:
                # Disabled at run time, and enabled since on some router while we did not listen.
                self._apply_key(key.name, True)
        for node in self.state.registry.nodes():
            self._apply_drain(node.name, node.name in drained)

    def _apply_key(self, name: str, enabled: bool) -> None:
        gate = self.state.gate
        live = gate.store.by_name(name)
        if live is None or live.enabled == enabled:
            return
        gate.set_enabled(name, enabled)
        log.info("key %s %s on another router", name, "enabled" if enabled else "disabled")

    def _apply_drain(self, name: str, drained: bool) -> None:
        node = self.state.registry.get(name)
        if node is None or node.admin_drain == drained:
            return
        node.admin_drain = drained
        log.info("node %s %s on another router", name, "drained" if drained else "undrained")

    # -- changes made here, for the others (the admin API calls these) ----------------------------

    async def set_key_enabled(self, name: str, enabled: bool) -> bool:
        """Share a key's enable/disable; False (logged) when Redis is down: it applies here only."""
        try:
            await self.store.set_key_enabled(name, enabled)
        except ClusterUnavailable as exc:
            log.warning("key %s: %s here only, not on the other routers (%s)", name, "enabled" if enabled else "disabled", exc)
            return False
        return True

    async def set_drained(self, name: str, drained: bool) -> bool:
        try:
            await self.store.set_drained(name, drained)
        except ClusterUnavailable as exc:
            log.warning("node %s: %s here only, not on the other routers (%s)", name, "drained" if drained else "undrained", exc)
            return False
        return True

    async def acquire_load_lock(self, model: str, ttl_s: float) -> tuple[bool, str | None]:
        """(may load, lock token): another router's load in progress gives (False, None); Redis
        down gives (True, None) — a load without the lock beats no load at all."""
        try:
            token = await self.store.acquire_load_lock(model, ttl_s)
        except ClusterUnavailable as exc:
            log.warning("load of %s without the fleet-wide lock: %s", model, exc)
            return True, None
        return token is not None, token

    async def release_load_lock(self, model: str, token: str | None) -> None:
        if token is not None:
            with contextlib.suppress(ClusterUnavailable):
                await self.store.release_load_lock(model, token)

    async def load_lock_holder(self, model: str) -> str | None:
        try:
            return await self.store.load_lock_holder(model)
        except ClusterUnavailable:
            return None

    async def seed_quotas(self) -> int:
        """At start: the usage file's quota counters into Redis, for keys no router counts there yet
        (the first router of a cluster brings the history; later ones never overwrite it)."""
        seeded = 0
        for name, usage in self.state.gate.limits.export_usage().items():
            if usage.requests_total or usage.requests_today:
                counted = QuotaUsage(usage.requests_total, usage.requests_today, usage.day)
                seeded += await self.store.restore_quota(KEY_SCOPE_PREFIX + name, counted)
        return seeded

    async def quota_usage(self, names: list[str]) -> dict[str, QuotaUsage]:
        """The shared quota counters of these keys ({} while Redis is down: callers show their own)."""
        out: dict[str, QuotaUsage] = {}
        try:
            for name in names:
                out[name] = await self.store.quota_usage(KEY_SCOPE_PREFIX + name)
        except ClusterUnavailable:
            return {}
        return out

    async def reset_quota(self, name: str) -> None:
        try:
            await self.store.reset_quota(KEY_SCOPE_PREFIX + name)
        except ClusterUnavailable as exc:
            log.warning("key %s: usage reset here only, not in the shared quota (%s)", name, exc)

    # -- this router's figures and the view of all --------------------------------------------------

    def own_stats(self) -> dict[str, Any]:
        nodes = list(self.state.registry.iter_all())
        counters = self.state.gate.limits.counters()
        limits = counters.get("global", {})
        denied = sum(v for c in counters.values() for k, v in c.items() if k.startswith("denied_"))
        return {
            "router_id": self.router_id,
            "pid": os.getpid(),
            "listen": self.listen,
            "started_at": self.state.started_at,
            "in_flight": sum(n.in_flight for n in nodes),
            "limit_in_flight": int(limits.get("in_flight", 0)),
            "admitted": int(limits.get("admitted", 0)),
            "denied": int(denied),  # answered 429 by a limit, any scope
        }

    def snapshot(self) -> dict[str, Any]:
        """What /load-stats shows of the cluster: every live router and the sums over them."""
        routers = dict(self.routers)
        routers[self.router_id] = self.own_stats()  # this one always as it is now
        return {
            "redis": self.store.display_url,
            "healthy": self.store.healthy,
            "on_redis_down": self.config.on_redis_down,
            "shared_limits": not self.shared.falling_back,
            "router_id": self.router_id,
            "routers": [routers[k] for k in sorted(routers)],
            "in_flight": sum(int(r.get("in_flight", 0)) for r in routers.values()),
        }

    async def heartbeat(self) -> None:
        """Every HEARTBEAT_S until cancelled: leases refreshed, this router's figures published, the view read."""
        ttl = max(2.0, self.config.lease_ttl)
        while True:
            with contextlib.suppress(ClusterUnavailable):
                await self.store.refresh_leases()
                await self.store.put_router_stats(self.own_stats(), ttl)
                self.routers = await self.store.router_stats()
            await asyncio.sleep(HEARTBEAT_S)

    async def forward_events(self) -> None:
        """Until cancelled: this router's buffered log records appended to the shared log."""
        buffer = self.log_handler.buffer
        while True:
            await asyncio.sleep(EVENTS_FLUSH_S)
            while buffer:
                try:
                    await self.store.append_event(buffer[0])
                except ClusterUnavailable:
                    break
                buffer.popleft()

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The shared log's last `count` events, oldest first (each names its router)."""
        return [{"id": eid, **event} for eid, event in await self.store.events(count)]


CLUSTER_KEY = web.AppKey("mvllm_router_cluster", Cluster)


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    cluster = app[CLUSTER_KEY]
    store = cluster.store
    if await store.ping():
        log.info("cluster: sharing limits, keys, drains and events through Redis at %s (router %s)", store.display_url, cluster.router_id)
        with contextlib.suppress(ClusterUnavailable):
            await cluster.seed_quotas()
    else:
        log.warning(
            "cluster: Redis at %s unreachable at start (%s); serving with on_redis_down = %s, reconnecting by itself",
            store.display_url, store.last_error, cluster.config.on_redis_down,
        )  # fmt: skip
    logger = logging.getLogger("mvllm")
    logger.addHandler(cluster.log_handler)
    try:
        async with (
            background_task(store.watch(cluster.on_change), name="mvllm-cluster-watch"),
            background_task(cluster.heartbeat(), name="mvllm-cluster-heartbeat"),
            background_task(cluster.forward_events(), name="mvllm-cluster-events"),
        ):
            yield
    finally:
        logger.removeHandler(cluster.log_handler)
        await cluster.shared.drain()
        with contextlib.suppress(ClusterUnavailable):
            await store.forget_router()
        await store.close()


def setup(app: web.Application, state: RouterState) -> None:
    """With `[cluster] redis_url`: the cluster on the app, the gate's limits shared, its loops."""
    config = state.config.cluster
    if not config.enabled:
        return
    cluster = Cluster(config, state)
    app[CLUSTER_KEY] = cluster
    state.gate.shared = cluster.shared
    app.cleanup_ctx.append(_cluster_ctx)


def add_cluster_view(app: web.Application, doc: dict[str, Any]) -> dict[str, Any]:
    """/load-stats and /admin/nodes of a router in a cluster: `cluster` (every live router, the sums)
    and its summary under `router.cluster` (what the dashboard's header shows). Unchanged without."""
    cluster = app.get(CLUSTER_KEY)
    if cluster is None:
        return doc
    view = cluster.snapshot()
    doc["cluster"] = view
    doc["router"]["cluster"] = {
        "routers": len(view["routers"]),
        "in_flight": view["in_flight"],
        "redis": "ok" if view["healthy"] else "down",
        "shared_limits": view["shared_limits"],
    }
    return doc
