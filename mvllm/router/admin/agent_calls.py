"""Admin requests that go on to an agent: finding the agent or the model's routes named in the
request, the admin body, and the one call helper whose failures (no answer, timeout, the agent
refusing the router's token) become the client's 502/504 in one wording."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from mvllm.common.http import BodyError, json_object
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import SCRAPER_KEY, STATE_KEY
from mvllm.router.fleet.agent_client import AgentAnswer, call_agent, describe
from mvllm.router.fleet.agents import AUTH_STATUSES, AgentNode, AgentRoute
from mvllm.router.proxy import NODE_HEADER
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.admin")


def named_agent(state: RouterState, name: str, static_why: str) -> AgentNode:
    """The agent called `name`; AdminError 404 if no node is, 400 (`static_why`) if it is a static server."""
    node = state.registry.get(name)
    if node is None:
        raise AdminError(404, f"no node named {name!r}", code="node_not_found")
    agent = next((a for a in state.registry.agents() if a is node), None)
    if agent is None:
        raise AdminError(400, f"node {name} is a static server: {static_why}", code="not_an_agent")
    return agent


def model_routes(state: RouterState, model: str, node_name: str | None) -> list[AgentRoute]:
    """The routes of `model` (a name clients send, or a catalog name) on the agent named, or on every agent."""
    agents = [named_agent(state, node_name, "its models are managed where it runs")] if node_name else state.registry.agents()
    routes = []
    for agent in agents:
        route = agent.by_model.get(model) or agent.routes.get(model)
        if route is not None:
            routes.append(route)
    if routes:
        return routes
    unread = [f"{a.name} ({a.error or 'not read yet'})" for a in agents if a.state is None]
    if node_name:
        message = f"agent {node_name}'s catalog has no model `{model}`"
    else:
        message = f"no agent's catalog has model `{model}`"
    if unread:
        message += f"; catalog unknown for {', '.join(unread)}"
    raise AdminError(404, message, code="model_not_found")


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} without a body); AdminError 400 otherwise."""
    if not request.can_read_body:
        return {}
    try:
        return json_object(await request.read())
    except BodyError as exc:
        raise AdminError(400, exc.message, code=exc.code) from None


async def call(
    state: RouterState,
    agent: AgentNode,
    method: str,
    path: str,
    *,
    timeout: float,
    what: str | None = None,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> AgentAnswer:
    """One call to `agent`. No answer: AdminError 502 (504 "did not finish `what`" when it timed
    out and `what` is given); the agent refusing our token: 502, logged (a config error)."""
    headers = {NODE_HEADER: agent.name}
    try:
        answer = await call_agent(state, agent, method, path, timeout=timeout, json=body, params=params)
    except asyncio.TimeoutError as exc:
        if what is None:
            raise AdminError(502, f"agent {agent.name} unreachable: {describe(exc)}", code="agent_unreachable", headers=headers) from None
        raise AdminError(504, f"agent {agent.name} did not finish {what} within {timeout:g} s", headers=headers) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise AdminError(502, f"agent {agent.name} unreachable: {describe(exc)}", code="agent_unreachable", headers=headers) from None
    if answer.status in AUTH_STATUSES:
        message = f"agent {agent.name} rejected the router's token (HTTP {answer.status}): check its token in servers.toml"
        log.error("admin: %s", message)
        raise AdminError(502, message, code="agent_auth_failed", headers=headers)
    return answer


async def forward(
    request: web.Request, agent: AgentNode, method: str, path: str, *, body: Any = None, timeout: float, what: str
) -> web.Response:
    """One call to `agent`, its answer returned as it is (with `node` added to a JSON object);
    after a success routing learns the change at once, not at the next scrape."""
    answer = await call(request.app[STATE_KEY], agent, method, path, timeout=timeout, what=what, body=body)
    raw = answer.body
    if 200 <= answer.status < 300:
        await request.app[SCRAPER_KEY].probe([agent])
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            doc["node"] = agent.name
            raw = json.dumps(doc).encode()
    return relay(answer, agent, raw)


def relay(answer: AgentAnswer, agent: AgentNode, body: bytes | None = None) -> web.Response:
    """The agent's answer (or `body` in its place) as the admin answer, naming the agent."""
    return web.Response(
        status=answer.status,
        body=answer.body if body is None else body,
        headers={"Content-Type": answer.content_type or "application/json", NODE_HEADER: agent.name},
    )
