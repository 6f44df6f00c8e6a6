"""Logs through the router's admin API: `GET /admin/logs/stats` (the router's log files and every
agent's), `POST /admin/logs/cleanup[?days=N]` (files older than N days, or each part's own
`log_retention_days`), `GET /admin/models/{model}/logs` (an engine's log from its agent, by tail or
by cursor, what `mvllm logs` reads), and the hourly cleanup of the router's own rotated logs.
`/admin/log-stats` and `/admin/clean-logs` are aliases of the first two.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from mvllm.common.logfiles import file_entries, remove_older_than, rotated_files, summary
from mvllm.common.state import STOPPED
from mvllm.common.tasks import background_task
from mvllm.router.admin.agent_calls import call, model_routes
from mvllm.router.admin.errors import AdminError, non_negative_param
from mvllm.router.appkeys import STATE_KEY
from mvllm.router.fleet.agent_client import call_agent, describe
from mvllm.router.fleet.agents import AgentNode, AgentRoute
from mvllm.router.proxy import NODE_HEADER
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.logs")

_AGENT_TIMEOUT_S = 10.0
_CLEANUP_EVERY_S = 3600.0


# -- the router's own files ---------------------------------------------------------------------------


def router_log_files(state: RouterState) -> tuple[Path | None, list[Path]]:
    """(the active log file, its rotated copies) of the current config."""
    active = state.config.log.file
    return active, rotated_files(active) if active is not None else []


def _router_stats(state: RouterState) -> dict[str, Any]:
    active, rotated = router_log_files(state)
    entries = file_entries([active, *rotated] if active else [], active=[active] if active else [])
    cfg = state.config.log
    return {
        "log_file": str(active) if active else None,
        "log_max_bytes": cfg.max_bytes,
        "log_backups": cfg.backups,
        "retention_days": cfg.retention_days,
        "total": summary(entries),
        "files": entries,
    }


def _router_cleanup(state: RouterState, days: float) -> list[dict[str, Any]]:
    """Rotated copies older than `days`; the active file is never removed."""
    return remove_older_than(router_log_files(state)[1], days)


# -- agents ---------------------------------------------------------------------------------------------


async def _agent_json(state: RouterState, agent: AgentNode, method: str, path: str, params: dict[str, str] | None) -> dict[str, Any]:
    """The agent's JSON answer, or {"error": why} (one agent's trouble never fails the whole call)."""
    try:
        answer = await call_agent(state, agent, method, path, timeout=_AGENT_TIMEOUT_S, params=params)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return {"error": f"agent unreachable: {describe(exc)}"}
    status, body = answer.status, answer.body
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        doc = {}
    if status != 200:
        err = doc.get("error") if isinstance(doc, dict) else None
        message = err.get("message") if isinstance(err, dict) else None
        return {"error": f"HTTP {status}: {message or body[:200].decode(errors='replace')}"}
    return doc if isinstance(doc, dict) else {"error": "the agent's answer is not a JSON object"}


# -- handlers ---------------------------------------------------------------------------------------------


async def logs_stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    agents = state.registry.agents()
    router, answers = await asyncio.gather(
        asyncio.to_thread(_router_stats, state),
        asyncio.gather(*(_agent_json(state, a, "GET", "/logs/stats", None) for a in agents)),
    )
    per_agent = {a.name: doc for a, doc in zip(agents, answers, strict=True)}
    totals = [router["total"], *(d["total"] for d in per_agent.values() if isinstance(d.get("total"), dict))]
    return web.json_response(
        {
            "router": router,
            "agents": per_agent,
            "total": {"files": sum(t.get("files", 0) for t in totals), "bytes": sum(t.get("bytes", 0) for t in totals)},
        }
    )


async def logs_cleanup(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    days = non_negative_param(request, "days", float, "days must be a number >= 0, got {raw!r}")
    own_days = days if days is not None else state.config.log.retention_days
    if own_days is None:
        router: dict[str, Any] = {"skipped": "no ?days=N and no [router] log_retention_days"}
    else:
        removed = await asyncio.to_thread(_router_cleanup, state, own_days)
        router = {"days": own_days, "removed": removed, "freed_bytes": sum(r["bytes"] for r in removed)}
        if removed:
            log.info("log cleanup (older than %g days): removed %d router log file(s)", own_days, len(removed))
    agents = state.registry.agents()
    params = {"days": f"{days:g}"} if days is not None else None
    answers = await asyncio.gather(*(_agent_json(state, a, "POST", "/logs/cleanup", params) for a in agents))
    return web.json_response({"router": router, "agents": {a.name: d for a, d in zip(agents, answers, strict=True)}})


def _pick(routes: list[AgentRoute], model: str) -> AgentRoute:
    """The engine whose log is meant: the one agent where the model runs (or ran); else ask for --node."""
    live = [r for r in routes if r.state != STOPPED]
    if len(live) == 1:
        return live[0]
    if not live and len(routes) == 1:
        return routes[0]
    names = ", ".join(r.agent.name for r in (live or routes))
    raise AdminError(409, f"`{model}` is on several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")


async def model_logs(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    node_name = request.query.get("node") or None
    routes = model_routes(state, model, node_name)
    route = routes[0] if node_name else _pick(routes, model)
    agent = route.agent
    params = {k: request.query[k] for k in ("tail", "cursor") if request.query.get(k)}
    headers = {NODE_HEADER: agent.name}
    path = f"/models/{quote(route.instance_name, safe='')}/logs"
    answer = await call(state, agent, "GET", path, timeout=_AGENT_TIMEOUT_S, params=params)
    status, body, up_headers = answer.status, answer.body, answer.headers
    if status != 200:
        # The agent's own OpenAI-form error (a bad cursor, an unknown model), as it is.
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)
    return web.json_response(
        {
            "model": model,
            "node": agent.name,
            "instance": route.instance_name,
            "state": route.state,
            "text": body.decode(errors="replace"),
            "cursor": up_headers.get("X-Log-Cursor"),
            "more": up_headers.get("X-Log-More") == "1",
            "skipped": up_headers.get("X-Log-Skipped") == "1",
        },
        headers=headers,
    )


# -- the periodic cleanup -----------------------------------------------------------------------------------


async def _cleanup_loop(state: RouterState) -> None:
    while True:
        days = state.config.log.retention_days  # read each turn: a reload may change it
        if days is not None:
            try:
                removed = await asyncio.to_thread(_router_cleanup, state, days)
                if removed:
                    log.info("log cleanup (older than %g days): removed %d router log file(s)", days, len(removed))
            except Exception:
                log.exception("router log cleanup failed")
        await asyncio.sleep(_CLEANUP_EVERY_S)


async def _cleanup_ctx(app: web.Application) -> AsyncIterator[None]:
    async with background_task(_cleanup_loop(app[STATE_KEY]), name="mvllm-log-cleanup"):
        yield


ROUTES = [
    web.get("/admin/logs/stats", logs_stats),
    web.post("/admin/logs/cleanup", logs_cleanup),
    # The names vllm-server used, so its scripts keep working.
    web.get("/admin/log-stats", logs_stats),
    web.post("/admin/clean-logs", logs_cleanup),
    web.get("/admin/models/{model:.+}/logs", model_logs),
]


def setup(app: web.Application) -> None:
    """The hourly cleanup of the router's own rotated logs."""
    app.cleanup_ctx.append(_cleanup_ctx)
