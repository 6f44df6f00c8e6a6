"""LoRA adapters through the router, sent to every agent that serves the base model:

    POST /admin/models/{base}/lora[?node=N]   {"action": "load"|"unload", "lora_name", "lora_path"?}
    POST /admin/load-lora-adapter             {"lora_name", "lora_path", "base_model_name"?}
    POST /admin/unload-lora-adapter           {"lora_name", "base_model_name"?}

A load goes to each agent where the base is awake, an unload to each agent that lists the adapter;
the answer has one result per agent (200 all done, 207 some, else the first failure's status).
The aliases take vLLM's /v1/load_lora_adapter body; without `base_model_name` the base is the one
model awake in the fleet (a load) or every model that lists the adapter (an unload).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote

from aiohttp import web

from mvllm.common.errors import error_body
from mvllm.common.state import READY
from mvllm.router.admin.agent_calls import call, json_body, model_routes
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import SCRAPER_KEY, STATE_KEY
from mvllm.router.fleet.agents import AgentRoute
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.admin")

ACTIONS = ("load", "unload")
# A load into an awake engine takes seconds; this bounds an agent that hangs.
_LORA_TIMEOUT_S = 60.0


def _base_name(route: AgentRoute) -> str:
    e = route.entry
    return e.served_model_names[0] if e.served_model_names else e.name


def _lora_request(body: dict[str, Any], action: str | None = None) -> dict[str, Any]:
    """The agent's /models/NAME/lora body from the admin body, checked (AdminError 400)."""
    action = action or body.get("action", "load")
    if action not in ACTIONS:
        raise AdminError(400, f"action must be 'load' or 'unload', got {action!r}", code="invalid_parameter")
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise AdminError(400, "`lora_name` is required", code="invalid_parameter")
    out: dict[str, Any] = {"action": action, "lora_name": name}
    path = body.get("lora_path")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise AdminError(400, "`lora_path` must be a path on the agents' hosts", code="invalid_parameter")
        out["lora_path"] = path
    return out


def _lists(route: AgentRoute, lora: str) -> bool:
    loaded = route.instance.loras if route.instance is not None else []
    return lora in route.entry.lora_adapters or lora in loaded


def _targets(routes: list[AgentRoute], action: str, lora: str, base: str) -> list[AgentRoute]:
    """Where the request goes: a load where the base is awake, an unload where the adapter is known."""
    if action == "load":
        chosen = [r for r in routes if r.state == READY]
        if not chosen:
            states = ", ".join(f"{r.agent.name}: {r.state}" for r in routes)
            raise AdminError(
                409, f"`{base}` is awake on no agent ({states}); load it first: POST /admin/models/{base}/load",
                code="not_awake",
            )  # fmt: skip
        return chosen
    chosen = [r for r in routes if _lists(r, lora)]
    if not chosen:
        raise AdminError(404, f"no agent serving `{base}` has LoRA adapter `{lora}`", code="lora_not_found")
    return chosen


async def _send(state: RouterState, route: AgentRoute, body: dict[str, Any]) -> dict[str, Any]:
    """One agent's result: {node, instance, status, ok, and the instance's state or the error}."""
    agent = route.agent
    path = f"/models/{quote(route.instance_name, safe='')}/lora"
    result: dict[str, Any] = {"node": agent.name, "instance": route.instance_name}
    try:
        answer = await call(state, agent, "POST", path, timeout=_LORA_TIMEOUT_S, what=f"LoRA {body['action']}", body=body)
    except AdminError as exc:
        return {**result, "status": exc.status, "ok": False, **error_body(exc.status, exc.message, type=exc.type, code=exc.code)}
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    ok = 200 <= answer.status < 300
    result.update(status=answer.status, ok=ok)
    if ok:
        result["state"] = doc
    elif isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        result["error"] = doc["error"]
    else:
        result.update(error_body(answer.status, f"agent {agent.name} answered HTTP {answer.status}", code="agent_error"))
    return result


async def _apply(request: web.Request, routes: list[AgentRoute], body: dict[str, Any], base: str) -> web.Response:
    state = request.app[STATE_KEY]
    targets = _targets(routes, body["action"], body["lora_name"], base)
    log.info(
        "admin: LoRA %s %s on %s", body["action"], body["lora_name"], ", ".join(f"{r.agent.name}/{r.instance_name}" for r in targets)
    )
    results = list(await asyncio.gather(*(_send(state, r, body) for r in targets)))
    done = [r.agent for r, res in zip(targets, results, strict=True) if res["ok"]]
    if done:  # routing learns the adapter (or its absence) now, not at the next scrape
        await request.app[SCRAPER_KEY].probe(list(dict.fromkeys(done)))
    doc: dict[str, Any] = {"action": body["action"], "lora_name": body["lora_name"], "base": base, "results": results}
    if len(done) == len(results):
        status = 200
    elif done:
        status = 207
    else:
        first = results[0]
        status = first["status"]
        doc["error"] = first["error"]
    return web.json_response(doc, status=status)


async def model_lora(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    base = request.match_info["model"]
    body = _lora_request(await json_body(request))
    return await _apply(request, model_routes(state, base, request.query.get("node") or None), body, base)


def _alias(action: str) -> Any:
    async def handle(request: web.Request) -> web.Response:
        state = request.app[STATE_KEY]
        raw = await json_body(request)
        body = _lora_request(raw, action)
        base = raw.get("base_model_name") or request.query.get("model")
        if base is not None and not isinstance(base, str):
            raise AdminError(400, "`base_model_name` must be a model name", code="invalid_parameter")
        node = request.query.get("node") or None
        if base:
            return await _apply(request, model_routes(state, base, node), body, base)
        agents = [a for a in state.registry.agents() if node is None or a.name == node]
        routes = [r for a in agents for r in a.routes.values()]
        if action == "load":
            bases = sorted({_base_name(r) for r in routes if r.state == READY})
            if len(bases) != 1:
                awake = f"awake: {', '.join(bases)}" if bases else "none is awake"
                raise AdminError(
                    400, f"name the base model in `base_model_name` ({awake})", code="base_model_required"
                )
            base = bases[0]
            routes = [r for r in routes if _base_name(r) == base]
        else:
            routes = [r for r in routes if _lists(r, body["lora_name"])]
            base = ", ".join(sorted({_base_name(r) for r in routes})) or "-"
        return await _apply(request, routes, body, base)

    return handle


ROUTES = [
    web.post("/admin/models/{model:.+}/lora", model_lora),
    web.post("/admin/load-lora-adapter", _alias("load")),
    web.post("/admin/unload-lora-adapter", _alias("unload")),
]
