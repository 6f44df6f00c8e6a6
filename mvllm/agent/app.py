"""The agent's HTTP API: bearer-token middleware, lifecycle routes, /state, /metrics, and the /v1 gatekeeper.

The supervisor and its loops (crash checks and idle timers, GPU and metrics polling) are owned by
a `cleanup_ctx`, so leaving the app (SIGTERM, SIGINT) stops every engine before the process ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mvllm.agent import engine_info, engine_metrics, enginelogs, procs, report, runtime_api
from mvllm.agent.appkeys import CONFIG, GATEKEEPER, METRICS, REAP_STALE, SUPERVISOR
from mvllm.agent.config import AgentConfig
from mvllm.agent.errors import BadRequest, Busy
from mvllm.agent.gpu import GpuBackend, NvmlBackend, SimBackend
from mvllm.agent.http_helpers import Handler, api, json_body, wants_wait
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.proxy import ENGINE_KEEPALIVE_S, Gatekeeper
from mvllm.agent.supervisor import Supervisor
from mvllm.agent.warm_launcher import WarmLauncher
from mvllm.common.errors import error_response
from mvllm.common.upstream import Upstream

log = logging.getLogger("mvllm.agent")

_TICK_S = 0.25
_OPEN_PATHS = frozenset({"/health"})
# vLLM's un-versioned aliases, relayed like /v1/*.
_ALIASES = ("/tokenize", "/detokenize", "/rerank", "/score", "/pooling", "/classify", "/invocations")


def _auth_middleware(token: str | None) -> Any:
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if "/." in request.path and any(seg in (".", "..") for seg in request.path.split("/")):
            # The engine URL is built from the path: /v1/../sleep would reach the engine's /sleep.
            return error_response(400, "invalid request path: '.' or '..' segments", code="invalid_path")
        if expected is not None and request.path not in _OPEN_PATHS:
            # surrogateescape: a header that is not UTF-8 compares as its raw bytes (a 401, not a 500).
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return error_response(
                    401, "invalid or missing bearer token", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
        return await handler(request)

    return auth


@web.middleware
async def _http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown route, wrong method, body too large) in OpenAI form too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.text or exc.reason)


routes = web.RouteTableDef()


# ------------------------------------------------------------------ handlers


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/state")
async def state(request: web.Request) -> web.Response:
    return web.json_response(report.snapshot(request.app[SUPERVISOR]).to_dict())


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    own = request.app[METRICS].render()
    texts = {i.name: i.stats.metrics_text for i in sup.instances.values() if i.stats.metrics_text}
    body = own + engine_metrics.merge(texts).encode()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _instance_json(request: web.Request, name: str) -> web.Response:
    sup = request.app[SUPERVISOR]
    return web.json_response(report.instance_state(sup, sup.get(name)).to_dict())


@routes.get("/models/{name}")
@api
async def model_get(request: web.Request) -> web.Response:
    return _instance_json(request, request.match_info["name"])


@routes.post("/models/{name}/load")
@api
async def model_load(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    name = request.match_info["name"]
    sup.get(name)
    wait = wants_wait(request)
    task = asyncio.ensure_future(sup.load(name))
    if not wait:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return web.json_response(report.instance_state(sup, sup.get(name)).to_dict(), status=202)
    try:
        await asyncio.wait_for(asyncio.shield(task), request.app[CONFIG].load_timeout)
    except asyncio.TimeoutError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return web.json_response(report.instance_state(sup, sup.get(name)).to_dict(), status=202)
    return _instance_json(request, name)


@routes.post("/models/{name}/unload")
@api
async def model_unload(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[SUPERVISOR].unload(name)
    return _instance_json(request, name)


@routes.post("/models/{name}/sleep")
@api
async def model_sleep(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    name = request.match_info["name"]
    inst = sup.get(name)
    body = await json_body(request)
    raw = request.query.get("level", body.get("level", inst.spec.effective_sleep_level_on_idle or 1))
    try:
        level = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"level must be 1 or 2, got {raw!r}") from None
    await sup.sleep(name, level)
    return _instance_json(request, name)


@routes.post("/models/{name}/wake")
@api
async def model_wake(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    sup = request.app[SUPERVISOR]
    try:
        await asyncio.wait_for(sup.wake(name), request.app[CONFIG].load_timeout)
    except asyncio.TimeoutError:
        raise Busy.waiting_on_load(
            f"model {name} is not awake after {request.app[CONFIG].load_timeout:g} s; see GET /state",
            sup.get(name).predicted_wait_s(),
        ) from None
    return _instance_json(request, name)


@routes.post("/models/{name}/lora")
@api
async def model_lora(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    name = request.match_info["name"]
    inst = sup.get(name)
    body = await json_body(request)
    action = body.get("action", "load")
    lname = body.get("lora_name")
    if action not in ("load", "unload"):
        raise BadRequest("action must be 'load' or 'unload'")
    if not isinstance(lname, str) or not lname:
        raise BadRequest("lora_name is required")
    owner = sup.resolve(lname)
    if owner is not None and (owner[0] is not inst or owner[1] is None):
        raise BadRequest(f"{lname!r} already names another model of this agent")
    if action == "load":
        path = body.get("lora_path")
        if path is not None and not isinstance(path, str):
            raise BadRequest("lora_path must be a string")
        await inst.add_lora(lname, path)
    else:
        await inst.remove_lora(lname)
    return _instance_json(request, name)


@routes.get("/models/{name}/logs")
@api
async def model_logs(request: web.Request) -> web.Response:
    inst = request.app[SUPERVISOR].get(request.match_info["name"])
    return await enginelogs.model_logs(request, inst.name)  # ?tail=N, or ?cursor= to follow


async def relay(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEKEEPER].relay(request)


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    return await request.app[GATEKEEPER].list_models(request)


@routes.get("/v1/models/{model}")
async def get_model(request: web.Request) -> web.Response:
    return await request.app[GATEKEEPER].get_model(request)


# After /v1/models: routes match in the order they were added.
routes.route("*", "/v1/{tail:.*}")(relay)
for _path in _ALIASES:
    routes.post(_path)(relay)


# ------------------------------------------------------------------ lifetime


async def _loop(name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s loop iteration failed", name)
        await asyncio.sleep(interval)


async def _agent_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S),
        auto_decompress=False,
    )
    # The relay's own client to the engines: its pooled connections tell each request whether it
    # went out on a reused one (the stale-connection resend).
    upstream = Upstream(keepalive=ENGINE_KEEPALIVE_S)
    backend: GpuBackend = SimBackend(cfg.sim_gpus, session) if cfg.engine == "sim" else NvmlBackend()
    metrics_ = AgentMetrics()
    agent_id = procs.agent_id()
    launcher = WarmLauncher(cfg.engine, cfg.log_dir, agent_id) if cfg.warm_launcher_on else None
    if launcher is not None:
        await launcher.start()
    sup = Supervisor(cfg, backend, session, metrics_, agent_id, launcher=launcher)
    metrics_.watch(lambda: report.snapshot(sup))
    app[SUPERVISOR] = sup
    app[METRICS] = metrics_
    app[GATEKEEPER] = Gatekeeper(sup, upstream, metrics_, cfg.load_timeout, cfg.max_queue)
    await sup.start(reap_stale=app[REAP_STALE])

    async def tick() -> None:
        await sup.check_crashes()
        sup.check_idle()

    loops = [
        asyncio.create_task(_loop("supervise", _TICK_S, tick)),
        asyncio.create_task(_loop("poll", cfg.poll_interval, sup.poll)),
    ]
    log.info("agent ready: %d catalog model(s), engine %s", len(cfg.models), cfg.engine)
    try:
        yield
    finally:
        for t in loops:
            t.cancel()
        for t in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await sup.close()
        if launcher is not None:
            await launcher.close()
        await upstream.close()
        await session.close()
        backend.close()
        log.info("agent stopped; no engine left running")


def create_app(cfg: AgentConfig, *, reap_stale: bool = False) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware(cfg.token), _http_errors], client_max_size=64 * 1024**2)
    app[CONFIG] = cfg
    app[REAP_STALE] = reap_stale
    app.cleanup_ctx.append(_agent_ctx)
    app.add_routes(routes)
    app.add_routes(runtime_api.routes)  # ad-hoc instances, assign
    app.add_routes(engine_info.routes)  # GET /models/NAME/proxy/{path}: an engine's health, models, metrics
    app.cleanup_ctx.append(runtime_api.runtime_ctx)  # after the agent's own: it needs the supervisor
    logs = enginelogs.EngineLogs(cfg.log_dir, cfg.engine_log_max_bytes, cfg.engine_log_backups, cfg.log)
    enginelogs.register_log_routes(app, logs, lambda a: list(a[SUPERVISOR].instances), cfg.log_check_interval)
    return app
