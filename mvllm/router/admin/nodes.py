"""The router's admin API for nodes (`/admin/nodes`, drain/undrain, reload) and its recent-events
ring buffer (`/admin/events`), which the dashboard and `mvllm ps/drain/...` read over HTTP.

Runtime drain lives on the Node object (`Node.admin_drain`): a reload that keeps the node (same
name, url and kind, other keys changed or not) keeps it; a node replaced or removed forgets it.
`drain = true` in servers.toml always wins over an admin undrain.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from mvllm.router.admin.errors import AdminError, non_negative_param
from mvllm.router.appkeys import CONFIG_PATH_KEY, STATE_KEY
from mvllm.router.cluster import CLUSTER_KEY, add_cluster_view
from mvllm.router.cluster_store import ClusterUnavailable
from mvllm.router.fleet.targets import Node
from mvllm.router.reload import reload_config
from mvllm.router.state import RouterState
from mvllm.router.stats import load_stats_snapshot

log = logging.getLogger("mvllm.router.admin")

# Events kept for /admin/events: enough for a screen of log lines and the errors of the last minutes.
EVENTS_KEPT = 1000
_EVENTS_LOGGER = "mvllm"
_COUNT_MESSAGE = "query parameter {name!r} must be a non-negative integer, got {raw!r}"


class EventLog(logging.Handler):
    """A logging handler that keeps the last `maxlen` records of the `mvllm` loggers as dicts with
    a growing sequence number, so a reader asks for what came after the last one it saw."""

    def __init__(self, maxlen: int = EVENTS_KEPT) -> None:
        super().__init__(level=logging.DEBUG)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._seq = itertools.count(1)
        self.last_seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in a log call must not break logging
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__}: {exc}"
        seq = next(self._seq)
        self._events.append(
            {
                "seq": seq,
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
        )
        self.last_seq = seq

    def since(self, seq: int, limit: int | None = None) -> list[dict[str, Any]]:
        """Events after `seq`, oldest first (the newest `limit` of them when given)."""
        out = [e for e in list(self._events) if e["seq"] > seq]
        return out[-limit:] if limit else out

    @property
    def first_seq(self) -> int:
        return self._events[0]["seq"] if self._events else self.last_seq + 1


EVENTS_KEY = web.AppKey("mvllm_router_events", EventLog)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _node_or_404(state: RouterState, name: str) -> Node:
    node = state.registry.get(name)
    if node is None:
        known = ", ".join(n.name for n in state.registry.nodes()) or "none"
        raise AdminError(404, f"no node named {name!r} (nodes: {known})", code="node_not_found")
    return node


def _drained_by(node: Node) -> str | None:
    if node.retired:
        return "removed"
    if node.cfg.drain:
        return "config"
    if node.admin_drain:
        return "admin"
    return None


def nodes_document(state: RouterState, config_path: str | None) -> dict[str, Any]:
    """/load-stats plus, per node, its config, who drained it and its per-model load; plus the
    router settings a reader needs to judge staleness."""
    doc = load_stats_snapshot(state, config_path)
    by_name = {n.name: n for n in state.registry.iter_all()}
    for entry in doc["nodes"]:
        node = by_name.get(entry["name"])
        if node is None:
            continue
        cfg = node.cfg
        entry["config"] = {
            "url": cfg.url,
            "kind": cfg.kind,
            "engine": cfg.engine,
            "capacity": cfg.capacity,
            "models": list(cfg.models) if cfg.models is not None else None,
            "weight": cfg.weight,
            "drain": cfg.drain,
        }
        entry["drained_by"] = _drained_by(node)
        entry["per_model"] = {m: {"running": r, "waiting": w} for m, (r, w) in sorted(node.per_model.items()) if m}
    cfg = state.config
    doc["router"]["settings"] = {
        "scrape_interval": cfg.scrape.interval,
        "health_check_interval": cfg.health.interval,
        "default_capacity": cfg.default_capacity,
    }
    return doc


# -- handlers ------------------------------------------------------------------------------------------


async def get_nodes(request: web.Request) -> web.Response:
    return _json(add_cluster_view(request.app, nodes_document(request.app[STATE_KEY], request.app.get(CONFIG_PATH_KEY))))


def _node_entry(request: web.Request, name: str) -> dict[str, Any]:
    doc = nodes_document(request.app[STATE_KEY], request.app.get(CONFIG_PATH_KEY))
    return next(n for n in doc["nodes"] if n["name"] == name)


async def drain_node(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    node = _node_or_404(state, request.match_info["name"])
    if not node.admin_drain:
        node.admin_drain = True
        log.info("node %s drained by admin (%d request(s) in flight finish there)", node.name, node.in_flight)
        state.forget_cache(node.name, "drained")
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None:  # every router sharing the Redis drains it too
        await cluster.set_drained(node.name, True)
    return _json(_node_entry(request, node.name))


async def undrain_node(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    node = _node_or_404(state, request.match_info["name"])
    if node.cfg.drain:
        raise AdminError(
            409,
            f"node {node.name} is drained by servers.toml (drain = true); set drain = false there to undrain it",
            code="drained_by_config",
        )
    if node.admin_drain:
        node.admin_drain = False
        log.info("node %s undrained by admin", node.name)
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is not None:
        await cluster.set_drained(node.name, False)
    return _json(_node_entry(request, node.name))


async def reload(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    path = request.app.get(CONFIG_PATH_KEY)
    if path is None:
        raise AdminError(409, "this router runs without a config file (the demo): nothing to reload", code="no_config_file")
    log.info("config reload asked through the admin API")
    if not await reload_config(state, Path(path)):
        message = state.last_reload.message if state.last_reload else "invalid config"
        raise AdminError(400, f"config rejected, the previous one stays: {message}", code="invalid_config")
    status = state.last_reload
    return _json(
        {
            "ok": True,
            "config": path,
            "message": status.message if status else "",
            "nodes": [n.name for n in state.registry.nodes()],
        }
    )


async def get_events(request: web.Request) -> web.Response:
    events = request.app[EVENTS_KEY]
    since = non_negative_param(request, "since", int, _COUNT_MESSAGE, 0)
    limit = non_negative_param(request, "limit", int, _COUNT_MESSAGE)
    assert since is not None
    if request.query.get("scope") == "cluster":
        return await _cluster_events(request, limit)
    items = events.since(since, limit)
    return _json(
        {
            "events": items,
            "last": events.last_seq,
            # Events between `since` and this one fell out of the ring buffer before being read.
            "first": events.first_seq,
            "time": time.time(),
        }
    )


async def _cluster_events(request: web.Request, limit: int | None) -> web.Response:
    """`?scope=cluster`: the shared log of every router on the Redis (each event names its router)."""
    cluster = request.app.get(CLUSTER_KEY)
    if cluster is None:
        raise AdminError(409, "scope=cluster needs [cluster] redis_url: this router keeps its events alone", code="no_cluster")
    try:
        items = await cluster.events(limit or 100)
    except ClusterUnavailable as exc:
        raise AdminError(503, f"the shared event log is unavailable: {exc}", code="cluster_unavailable") from None
    return _json({"events": items, "router": cluster.router_id, "time": time.time()})


# -- wiring ------------------------------------------------------------------------------------------------


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    # Attached for the app's lifetime only: several apps in one process (tests) each keep their own.
    handler = app[EVENTS_KEY]
    logger = logging.getLogger(_EVENTS_LOGGER)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


ROUTES = [
    web.get("/admin/nodes", get_nodes),
    web.post("/admin/nodes/{name}/drain", drain_node),
    web.post("/admin/nodes/{name}/undrain", undrain_node),
    web.post("/admin/reload", reload),
    web.get("/admin/events", get_events),
]


def setup(app: web.Application) -> None:
    """Start recording events before any other background work starts (so startup lines are kept too)."""
    app[EVENTS_KEY] = EventLog()
    app.cleanup_ctx.insert(0, _events_ctx)
