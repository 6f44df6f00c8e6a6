"""Ad-hoc instances and catalog re-assignment through the router, forwarded to agents with their token:

    POST   /admin/instances                {model, node?, name?, params, ttl?, ...}  start one
    GET    /admin/instances[?node=N]       every agent's ad-hoc instances (asked now)
    DELETE /admin/instances/{name}[?node=N]
    POST   /admin/models/{model}/assign[?node=N]   {devices?, gpu_memory_utilization?, ..., restart?}

Without `node`, a new instance goes to the routable agent with the most free memory on one GPU
(then the most free in all). After a change the agent's /state is read again at once, so a
request for the new instance's name routes right away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web

from mvllm.common.errors import error_response
from mvllm.router.admin_models import _routes
from mvllm.router.app import SCRAPER_KEY, STATE_KEY
from mvllm.router.fleet.agent_client import call_agent, describe
from mvllm.router.fleet.agents import AUTH_STATUSES, AgentNode
from mvllm.router.proxy import NODE_HEADER
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.admin")

# Beyond the agent's own wait (load_timeout, or a drain before a stop).
_CALL_MARGIN_S = 30.0
_LIST_TIMEOUT_S = 5.0


def pick_agent(agents: list[AgentNode], now: float) -> AgentNode | None:
    """The routable agent with the most free memory on one GPU, then in all; None when none is."""
    best: AgentNode | None = None
    best_key: tuple[int, int] = (-1, -1)
    for agent in sorted(agents, key=lambda a: a.name):
        if agent.state is None or not agent.routable(now):
            continue
        free = [g.memory_free_bytes for g in agent.state.gpus]
        key = (max(free, default=0), sum(free))
        if key > best_key:
            best, best_key = agent, key
    return best


def _agents(state: RouterState) -> list[AgentNode]:
    return [n for n in state.registry.nodes() if isinstance(n, AgentNode)]


def _named_agent(state: RouterState, name: str) -> AgentNode | web.Response:
    node = state.registry.get(name)
    if node is None:
        return error_response(404, f"no node named {name!r}", code="node_not_found")
    if not isinstance(node, AgentNode):
        return error_response(
            400, f"node {name} is a static server: only agents start and change engines", code="not_an_agent"
        )
    return node


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        data = await request.json() if request.can_read_body else {}
    except ValueError:
        return error_response(400, "request body is not valid JSON", code="invalid_json")
    if not isinstance(data, dict):
        return error_response(400, "request body must be a JSON object", code="invalid_json")
    return data


async def _forward(
    request: web.Request, agent: AgentNode, method: str, path: str, *, body: Any = None, timeout: float, what: str
) -> web.Response:
    """One call to `agent`, its answer returned as it is (with `node` added to a JSON object)."""
    state = request.app[STATE_KEY]
    headers = {NODE_HEADER: agent.name}
    try:
        status, raw, ctype = await call_agent(state, agent, method, path, timeout=timeout, json=body)
    except asyncio.TimeoutError:
        return error_response(504, f"agent {agent.name} did not finish {what} within {timeout:g} s", headers=headers)
    except (aiohttp.ClientError, OSError) as exc:
        return error_response(502, f"agent {agent.name} unreachable: {describe(exc)}", code="agent_unreachable", headers=headers)
    if status in AUTH_STATUSES:
        message = f"agent {agent.name} rejected the router's token (HTTP {status}): check its token in servers.toml"
        log.error("admin: %s", message)
        return error_response(502, message, code="agent_auth_failed", headers=headers)
    if 200 <= status < 300:
        # Routing learns the change now, not at the next scrape.
        await request.app[SCRAPER_KEY].probe([agent])
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            doc["node"] = agent.name
            raw = json.dumps(doc).encode()
    return web.Response(status=status, body=raw, headers={"Content-Type": ctype or "application/json", **headers})


async def create_instance(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body.get("model"), str) or not body["model"]:
        return error_response(400, "`model` is required (an HF id or a path on the agent's host)", code="invalid_parameter")
    node_name = body.pop("node", None) or request.query.get("node")
    if node_name is not None and not isinstance(node_name, str):
        return error_response(400, "`node` must be a node name", code="invalid_parameter")
    if node_name:
        agent = _named_agent(state, node_name)
        if isinstance(agent, web.Response):
            return agent
    else:
        chosen = pick_agent(_agents(state), time.monotonic())
        if chosen is None:
            return error_response(
                503, "no agent can take an instance now (none configured, down, draining or not read yet)",
                code="no_agent_available", headers={"Retry-After": "5"},
            )  # fmt: skip
        agent = chosen
    path = "/instances"
    if "wait" in request.query:
        path += "?" + urlencode({"wait": request.query["wait"]})
    log.info("admin: ad-hoc instance of %s on agent %s", body["model"], agent.name)
    wait = agent.cfg.load_timeout + _CALL_MARGIN_S
    return await _forward(request, agent, "POST", path, body=body, timeout=wait, what="the start")


async def list_instances(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    node_name = request.query.get("node")
    if node_name:
        agent = _named_agent(state, node_name)
        if isinstance(agent, web.Response):
            return agent
        agents = [agent]
    else:
        agents = _agents(state)

    async def ask(agent: AgentNode) -> tuple[AgentNode, list[dict[str, Any]] | None, str | None]:
        try:
            status, raw, _ = await call_agent(state, agent, "GET", "/instances", timeout=_LIST_TIMEOUT_S)
            if status != 200:
                return agent, None, f"HTTP {status}: {raw[:200].decode(errors='replace')}"
            items = json.loads(raw).get("instances") or []
            return agent, [{**i, "node": agent.name} for i in items if isinstance(i, dict)], None
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, AttributeError) as exc:
            return agent, None, describe(exc)

    results = await asyncio.gather(*(ask(a) for a in agents))
    instances = [i for _a, items, _e in results for i in items or []]
    errors = {a.name: e for a, _items, e in results if e is not None}
    return web.json_response({"instances": instances, "errors": errors})


async def delete_instance(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    name = request.match_info["name"]
    node_name = request.query.get("node")
    if node_name:
        agent = _named_agent(state, node_name)
        if isinstance(agent, web.Response):
            return agent
    else:
        holders = [
            a for a in _agents(state)
            if a.state is not None and any(i.name == name and i.adhoc for i in a.state.instances)
        ]  # fmt: skip
        if not holders:
            return error_response(404, f"no agent has an ad-hoc instance named {name!r}", code="instance_not_found")
        if len(holders) > 1:
            names = ", ".join(a.name for a in holders)
            return error_response(409, f"{name!r} is on several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")
        agent = holders[0]
    log.info("admin: remove ad-hoc instance %s on agent %s", name, agent.name)
    wait = agent.cfg.load_timeout + _CALL_MARGIN_S
    return await _forward(request, agent, "DELETE", f"/instances/{quote(name, safe='')}", timeout=wait, what="the removal")


async def assign_model(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    body = await _json_object(request)
    if isinstance(body, web.Response):
        return body
    node_name = request.query.get("node") or None
    routes = _routes(state, model, node_name)
    if isinstance(routes, web.Response):
        return routes
    if len(routes) > 1:
        names = ", ".join(r.agent.name for r in routes)
        return error_response(409, f"`{model}` is in the catalog of several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")
    route = routes[0]
    agent = route.agent
    log.info("admin: assign %s on agent %s (catalog entry %s): %s", model, agent.name, route.instance_name, body)
    wait = 2 * agent.cfg.load_timeout + _CALL_MARGIN_S  # a restart drains, stops and loads
    path = f"/models/{quote(route.instance_name, safe='')}/assign"
    return await _forward(request, agent, "POST", path, body=body, timeout=wait, what="the assignment")


def register_instance_routes(app: web.Application) -> None:
    app.router.add_post("/admin/instances", create_instance)
    app.router.add_get("/admin/instances", list_instances)
    app.router.add_delete("/admin/instances/{name}", delete_instance)
    app.router.add_post("/admin/models/{model:.+}/assign", assign_model)
