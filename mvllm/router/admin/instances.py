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

from mvllm.router.admin.agent_calls import forward, json_body, model_routes, named_agent
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import STATE_KEY
from mvllm.router.fleet.agent_client import call_agent, describe
from mvllm.router.fleet.agents import AgentNode

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


async def create_instance(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    body = await json_body(request)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise AdminError(400, "`model` is required (an HF id or a path on the agent's host)", code="invalid_parameter")
    node_name = body.pop("node", None) or request.query.get("node")
    if node_name is not None and not isinstance(node_name, str):
        raise AdminError(400, "`node` must be a node name", code="invalid_parameter")
    if node_name:
        agent = named_agent(state, node_name, "only agents start and change engines")
    else:
        chosen = pick_agent(state.registry.agents(), time.monotonic())
        if chosen is None:
            raise AdminError(
                503, "no agent can take an instance now (none configured, down, draining or not read yet)",
                code="no_agent_available", headers={"Retry-After": "5"},
            )  # fmt: skip
        agent = chosen
    path = "/instances"
    if "wait" in request.query:
        path += "?" + urlencode({"wait": request.query["wait"]})
    log.info("admin: ad-hoc instance of %s on agent %s", body["model"], agent.name)
    wait = agent.cfg.load_timeout + _CALL_MARGIN_S
    return await forward(request, agent, "POST", path, body=body, timeout=wait, what="the start")


async def list_instances(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    node_name = request.query.get("node")
    agents = [named_agent(state, node_name, "only agents start and change engines")] if node_name else state.registry.agents()

    async def ask(agent: AgentNode) -> tuple[AgentNode, list[dict[str, Any]] | None, str | None]:
        try:
            answer = await call_agent(state, agent, "GET", "/instances", timeout=_LIST_TIMEOUT_S)
            if answer.status != 200:
                return agent, None, f"HTTP {answer.status}: {answer.body[:200].decode(errors='replace')}"
            items = json.loads(answer.body).get("instances") or []
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
        agent = named_agent(state, node_name, "only agents start and change engines")
    else:
        holders = [
            a for a in state.registry.agents()
            if a.state is not None and any(i.name == name and i.adhoc for i in a.state.instances)
        ]  # fmt: skip
        if not holders:
            raise AdminError(404, f"no agent has an ad-hoc instance named {name!r}", code="instance_not_found")
        if len(holders) > 1:
            names = ", ".join(a.name for a in holders)
            raise AdminError(409, f"{name!r} is on several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")
        agent = holders[0]
    log.info("admin: remove ad-hoc instance %s on agent %s", name, agent.name)
    wait = agent.cfg.load_timeout + _CALL_MARGIN_S
    return await forward(request, agent, "DELETE", f"/instances/{quote(name, safe='')}", timeout=wait, what="the removal")


async def assign_model(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    body = await json_body(request)
    node_name = request.query.get("node") or None
    routes = model_routes(state, model, node_name)
    if len(routes) > 1:
        names = ", ".join(r.agent.name for r in routes)
        raise AdminError(409, f"`{model}` is in the catalog of several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")
    route = routes[0]
    agent = route.agent
    log.info("admin: assign %s on agent %s (catalog entry %s): %s", model, agent.name, route.instance_name, body)
    wait = 2 * agent.cfg.load_timeout + _CALL_MARGIN_S  # a restart drains, stops and loads
    path = f"/models/{quote(route.instance_name, safe='')}/assign"
    return await forward(request, agent, "POST", path, body=body, timeout=wait, what="the assignment")


ROUTES = [
    web.post("/admin/instances", create_instance),
    web.get("/admin/instances", list_instances),
    web.delete("/admin/instances/{name}", delete_instance),
    web.post("/admin/models/{model:.+}/assign", assign_model),
]
