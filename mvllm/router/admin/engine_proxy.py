"""`/proxy/{instance}/{path}` (admin keys, like /admin/*): one instance's engine answers a path
that carries no model (/health, /v1/models, /metrics ...: mvllm.common.engine_paths), through the
agent that runs it (`GET /models/NAME/proxy/{path}` there). `?node=N` picks the agent when several
have an instance of that name. Requests that name a model go to /v1/* with `model` = the instance's name.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from aiohttp import web

from mvllm.common.engine_paths import is_info_path, refusal
from mvllm.router.admin.agent_calls import call, named_agent, relay
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import STATE_KEY
from mvllm.router.fleet.agents import AgentNode
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.admin")

PREFIX = "/proxy"
_TIMEOUT_S = 15.0


def _holder(state: RouterState, name: str, node_name: str | None) -> AgentNode:
    if node_name:
        agent = named_agent(state, node_name, "its engine is reached directly")
        if agent.state is not None and not any(i.name == name for i in agent.state.instances):
            raise AdminError(404, f"agent {node_name} has no instance named {name!r}", code="instance_not_found")
        return agent
    holders = [a for a in state.registry.agents() if a.state is not None and any(i.name == name for i in a.state.instances)]
    if not holders:
        raise AdminError(404, f"no agent has an instance named {name!r} (see GET /admin/instances)", code="instance_not_found")
    if len(holders) > 1:
        names = ", ".join(a.name for a in holders)
        raise AdminError(409, f"{name!r} is on several agents ({names}): choose one with ?node=NAME", code="ambiguous_node")
    return holders[0]


async def proxy_instance(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    name = request.match_info["instance"]
    path = request.match_info["path"].strip("/")
    if request.method != "GET" or not is_info_path(path):
        raise AdminError(404 if request.method == "GET" else 405, refusal(path), code="path_not_passed")
    query = {k: v for k, v in request.query.items() if k != "node"}
    agent = _holder(state, name, request.query.get("node") or None)
    answer = await call(
        state, agent, "GET", f"/models/{quote(name, safe='')}/proxy/{path}", timeout=_TIMEOUT_S, params=query or None
    )
    return relay(answer, agent)


ROUTES = [web.route("*", PREFIX + "/{instance}/{path:.*}", proxy_instance)]
