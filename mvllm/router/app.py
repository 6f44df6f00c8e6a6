"""The router's aiohttp application: routes, the middleware list, and the background loops
(pooled session, scraper, autoscaler, config watcher) owned by cleanup_ctx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mvllm.common.errors import error_response
from mvllm.common.tasks import background_task
from mvllm.common.upstream import Upstream
from mvllm.router import admin
from mvllm.router.access.gate import API_KEY, GATE_KEY, authenticate, visible_models
from mvllm.router.access.guard import guard_check
from mvllm.router.appkeys import CONFIG_PATH_KEY, SCRAPER_KEY, STATE_KEY
from mvllm.router.cluster import CLUSTER_KEY, add_cluster_view
from mvllm.router.cluster import setup as setup_cluster
from mvllm.router.config import RouterConfig
from mvllm.router.eventloop import LoopLagMonitor
from mvllm.router.fleet.autoscaler import Autoscaler
from mvllm.router.fleet.scraper import Scraper
from mvllm.router.metrics import CONTENT_TYPE
from mvllm.router.proxy import (
    NODE_HEADER,
    PROXIED_ALIASES,
    REQUEST_ID_HEADER,
    REQUEST_ID_KEY,
    VERSIONED_ALIASES,
    Proxy,
    new_request_id,
)
from mvllm.router.reload import ConfigWatcher
from mvllm.router.state import RouterState
from mvllm.router.stats import load_stats_snapshot
from mvllm.router.wire import JsonErrorRunner

log = logging.getLogger("mvllm.router.app")

# How long the first look at the nodes (health, models, load) may hold up the start.
_STARTUP_PROBE_TIMEOUT = 5.0
# In-flight requests get this long to finish when the router stops.
SHUTDOWN_TIMEOUT = 10.0
_MAX_REQUEST_ID = 128
# Seconds an idle pooled connection to a node is kept (see _session_ctx).
UPSTREAM_KEEPALIVE = 4.0


# -- middlewares ------------------------------------------------------------------------------------


@web.middleware
async def front_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The router's one middleware. In order: the request id (every answer carries x-request-id,
    the client's own if it sent a sane one, and x-mvllm-node, "-" when the router answered by
    itself); errors in OpenAI form (aiohttp's own 404/405 and unexpected ones); request hygiene
    (access/guard.py); API keys, and the release of the request's limits at its end (access/gate.py).

    One layer rather than four: each middleware layer costs a coroutine and a call per request."""
    rid = request.headers.get(REQUEST_ID_HEADER)
    if not rid or len(rid) > _MAX_REQUEST_ID or not rid.isprintable():
        rid = new_request_id()
    request[REQUEST_ID_KEY] = rid
    try:
        resp = guard_check(request)
        if resp is None:
            gate = request.app[GATE_KEY]
            resp = authenticate(gate, request)
            if resp is None:
                if gate.active:
                    try:
                        resp = await handler(request)
                    except BaseException:
                        gate.finish(request, None)
                        raise
                    gate.finish(request, resp)
                else:
                    resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = _http_error(request, exc)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        if request.writer is not None and request.writer.output_size > 0:
            raise
        resp = error_response(500, "internal error in the router (see its log)")
    if not resp.prepared:
        headers = resp.headers
        if REQUEST_ID_HEADER not in headers:
            headers[REQUEST_ID_HEADER] = rid
        if NODE_HEADER not in headers:
            headers[NODE_HEADER] = "-"
    return resp


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """An error aiohttp raised itself (404, 405 ...), in OpenAI form."""
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        message = f"{request.method} {request.path} is not served by this router"
    else:
        message = f"{exc.reason}: {request.method} {request.path}"
    return error_response(exc.status, message, headers=headers)


# The one list of middlewares, outermost first (add a layer only where front_middleware cannot
# hold the check: every layer is paid on every request).
MIDDLEWARES = (front_middleware,)


# -- routes of the router itself ----------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """Liveness: the router answers (200 whatever its nodes); `healthy_nodes` counts only nodes
    seen healthy, `unknown_nodes` those whose first check is still to come."""
    state = request.app[STATE_KEY]
    nodes = state.registry.nodes()
    return _json(
        {
            "status": "ok",
            "nodes": len(nodes),
            "healthy_nodes": state.registry.healthy_count(time.monotonic()),
            "unknown_nodes": state.registry.unknown_count(),
            "models": len(state.registry.models()),
        }
    )


async def ready(request: web.Request) -> web.Response:
    """Readiness (the Dockerfile's HEALTHCHECK, load balancers, systemd checks): 200 while at
    least one node is seen healthy and not ejected, else 503 in OpenAI form."""
    state = request.app[STATE_KEY]
    healthy = state.registry.healthy_count(time.monotonic())
    if healthy:
        return _json({"status": "ready", "healthy_nodes": healthy})
    total = len(state.registry.nodes())
    unknown = state.registry.unknown_count()
    if not total:
        why = "no node is configured"
    elif unknown:
        why = f"no node seen healthy yet ({unknown} of {total} not checked yet)"
    else:
        why = f"none of the {total} nodes is healthy"
    return error_response(503, f"not ready: {why}", code="not_ready", headers={"Retry-After": "5"})


async def load_stats(request: web.Request) -> web.Response:
    doc = load_stats_snapshot(request.app[STATE_KEY], request.app.get(CONFIG_PATH_KEY))
    return _json(add_cluster_view(request.app, doc))  # several routers on one Redis: the whole too


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_models(request: web.Request) -> web.Response:
    doc = request.app[STATE_KEY].registry.models_document()
    key = request.get(API_KEY)
    if key is not None:  # a key sees only the models it may use
        doc = {**doc, "data": visible_models(key, doc["data"])}
    return _json(doc)


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    cards = visible_models(request.get(API_KEY), request.app[STATE_KEY].registry.models_document()["data"])
    for card in cards:
        if card.get("id") == model:
            return _json(card)
    return error_response(404, f"The model `{model}` does not exist.", code="model_not_found")


# -- background work ------------------------------------------------------------------------------------


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE_KEY]
    # One connector, whose pools are per node (host, port): keep-alive connections, no limit of our
    # own (the engines queue), TCP_NODELAY set by aiohttp on every connection. Idle connections are
    # closed after UPSTREAM_KEEPALIVE, below the engines' own 5 s (uvicorn's default, vLLM's
    # VLLM_HTTP_TIMEOUT_KEEP_ALIVE): if the engine closed first, a request sent on the connection
    # at that moment would fail and count against a healthy node. No cookie jar: cookies of one
    # client must never travel with another's request. No automatic Accept-Encoding: bodies are
    # relayed as is.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE, ttl_dns_cache=60)
    state.session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        trust_env=False,
    )
    # The proxied requests' own client: the same keep-alive rule, its pools per node as well.
    state.upstream = Upstream(keepalive=UPSTREAM_KEEPALIVE)
    try:
        yield
    finally:
        await state.upstream.close()
        await state.session.close()


async def _scraper_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE_KEY]
    scraper = app[SCRAPER_KEY]
    state.on_nodes_changed = scraper.probe_soon
    nodes = state.registry.nodes()
    if nodes:
        try:
            await asyncio.wait_for(scraper.probe(nodes), timeout=_STARTUP_PROBE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("some nodes did not answer within %.0fs at start; they are checked again shortly", _STARTUP_PROBE_TIMEOUT)
    for n in nodes:
        log.info("node %s (%s): %s, models: %s", n.name, n.url, n.health.value, ", ".join(sorted(n.models)) or "none yet")
    try:
        async with background_task(scraper.run(), name="mvllm-scraper"):
            try:
                yield
            finally:
                state.on_nodes_changed = None
    finally:
        await scraper.close()


async def _autoscale_ctx(app: web.Application) -> AsyncIterator[None]:
    # Runs whatever [autoscale] says (off by default): a reload that enables it needs no restart.
    autoscaler = Autoscaler(app[STATE_KEY], app[SCRAPER_KEY].probe_soon)
    try:
        async with background_task(autoscaler.run(), name="mvllm-autoscale"):
            yield
    finally:
        await autoscaler.close()


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    # mvllm_event_loop_lag_seconds: how late the loop runs what is due (stalls show there).
    monitor = LoopLagMonitor()
    registry = app[STATE_KEY].metrics.registry
    registry.register(monitor)
    try:
        async with background_task(monitor.run(), name="mvllm-loop-lag"):
            yield
    finally:
        registry.unregister(monitor)


def _watch_ctx(path: Path) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        watcher = ConfigWatcher(app[STATE_KEY], path)
        task = asyncio.get_running_loop().create_task(watcher.run(), name="mvllm-config-watch")
        try:
            yield
        finally:
            await watcher.stop(task)

    return ctx


def create_app(config: RouterConfig, *, config_path: Path | None = None, watch: bool = True) -> web.Application:
    """The router app for `config`; with `config_path` and `watch`, the file is hot-reloaded."""
    # Bodies are read by the proxy itself against config.max_body_bytes (reloadable), so aiohttp's
    # own cap is lifted.
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=2**62)
    state = RouterState.create(config)
    app[STATE_KEY] = state
    app[GATE_KEY] = state.gate
    app[SCRAPER_KEY] = Scraper(state)
    if config_path is not None:
        app[CONFIG_PATH_KEY] = str(config_path)
    proxy = Proxy(state, on_complete=state.gate.response_complete)

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/load-stats", load_stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
    app.router.add_route("*", "/v1/{tail:.*}", proxy.handle)
    app.router.add_route("*", "/v2/{tail:.*}", proxy.handle)
    for alias in sorted(PROXIED_ALIASES | VERSIONED_ALIASES.keys()):
        app.router.add_route("*", alias, proxy.handle)
    app.router.add_get("/models/{model:.+}", get_model)  # GET /models is /v1/models (above)
    # Anything else is aiohttp's 404/405, turned into OpenAI form by the error middleware.
    admin.register(app)  # /admin/*: nodes, events, reload, models, logs, instances, keys
    setup_cluster(app, state)  # after the usage file's load; nothing without [cluster] redis_url

    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_session_ctx)
    app.cleanup_ctx.append(_scraper_ctx)
    app.cleanup_ctx.append(_autoscale_ctx)
    if config_path is not None and watch:
        app.cleanup_ctx.append(_watch_ctx(config_path))
    return app


@dataclass
class RunningRouter:
    app: web.Application
    runner: web.AppRunner
    host: str
    port: int

    @property
    def state(self) -> RouterState:
        return self.app[STATE_KEY]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


@contextlib.asynccontextmanager
async def running_router(
    config: RouterConfig,
    *,
    host: str,
    port: int,
    config_path: Path | None = None,
    watch: bool = True,
    reuse_port: bool = False,
) -> AsyncIterator[RunningRouter]:
    """Start the router on host:port (0 = any free port) and stop it, in-flight requests drained.
    `reuse_port`: SO_REUSEPORT, so several worker processes share the port (mvllm run --workers)."""
    app = create_app(config, config_path=config_path, watch=watch)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connection, which makes the engine abort the request.
    # keepalive_timeout also closes a connection that never completes its first request's headers
    # (aiohttp arms it when the connection opens): idle and slow-header connections are bounded.
    # JsonErrorRunner: what aiohttp's HTTP parser refuses is answered in OpenAI form too.
    runner = JsonErrorRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        keepalive_timeout=config.client_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
        await site.start()
        bound = runner.addresses[0]
        cluster = app.get(CLUSTER_KEY)
        if cluster is not None:
            cluster.listen = f"{host}:{bound[1]}"
        warning = app[GATE_KEY].exposure_warning(host)
        if warning:
            log.warning("%s", warning)
        yield RunningRouter(app, runner, host, int(bound[1]))
    finally:
        await runner.cleanup()
