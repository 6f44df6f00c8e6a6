"""Models through the router: `GET /admin/models` (each model's replicas: agent, state, score,
released, and its autoscale bounds) and the lifecycle `POST /admin/models/{model}/load|unload|sleep|wake`
(`?node=NAME` picks the agent, `?level=1|2` the sleep level, `?wait=false` a load that answers
while the engine starts), forwarded to that agent's lifecycle API with its token.
The agent's answer (the instance's state) comes back as it is."""

from __future__ import annotations

import json
import logging
import math
import time
from urllib.parse import quote

from aiohttp import web

from mvllm.common.state import FAILED, READY, SLEEPING, STOPPED, InstanceState
from mvllm.router.admin.agent_calls import call, model_routes, relay
from mvllm.router.admin.errors import AdminError
from mvllm.router.appkeys import SCRAPER_KEY, STATE_KEY
from mvllm.router.autoscale import REPLICA_STATES
from mvllm.router.cluster import CLUSTER_KEY
from mvllm.router.fleet import replicas
from mvllm.router.fleet.agents import AgentRoute
from mvllm.router.routing import next_route
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.admin")

ACTIONS = ("load", "unload", "sleep", "wake")
# Beyond the agent's own wait (load_timeout, or its drain before a sleep or unload).
_CALL_MARGIN_S = 30.0


def _states(routes: list[AgentRoute]) -> str:
    return ", ".join(f"{r.agent.name}: {r.state}" for r in routes)


def _choose(state: RouterState, action: str, model: str, routes: list[AgentRoute]) -> AgentRoute:
    """Which agent acts when the request names none (load and wake as a request for the model would)."""
    now = time.monotonic()
    if action == "load":
        # The proxy's choice for a request of the model (no prompt: no prefix affinity, nothing indexed).
        picked = next_route(state.policy, state.prefix_index, routes, (), model, None, now)
        chosen = None if picked is None else picked[0]
        if chosen is None:
            # Failed wherever it could go: an operator's load is the retry a failed model waits for
            # (the agent starts it afresh), on any agent that is up, without --node.
            failed = [r for r in routes if r.state == FAILED and r.agent.routable(now)]
            chosen = state.policy.choose(failed, model)
        if chosen is None:
            wait = max(1, math.ceil(state.config.health.interval))
            raise AdminError(
                503,
                f"no agent can load `{model}` now ({_states(routes)}): down, ejected or failed",
                code="no_agent_available",
                headers={"Retry-After": str(wait)},
            )
        return chosen
    if action == "wake":
        asleep = [r for r in routes if r.state == SLEEPING and r.agent.routable(now)]
        chosen = state.policy.choose(asleep, model)
        if chosen is None:
            raise AdminError(
                409, f"`{model}` is asleep on no reachable agent ({_states(routes)}); use load", code="not_sleeping"
            )
        return chosen
    # sleep / unload act where the model is; with it on several agents, the operator says which.
    holders = [r for r in routes if (r.state == READY if action == "sleep" else r.state != STOPPED)]
    if len(holders) == 1:
        return holders[0]
    if not holders:
        what = "awake" if action == "sleep" else "loaded"
        raise AdminError(409, f"`{model}` is not {what} on any agent ({_states(routes)})", code=f"not_{what}")
    names = ", ".join(r.agent.name for r in holders)
    raise AdminError(
        409, f"`{model}` is on several agents ({names}): choose one with ?node=NAME", code="ambiguous_node"
    )


async def model_action(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    model = request.match_info["model"]
    action = request.match_info["action"]
    raw_level = request.query.get("level")
    if raw_level is not None:
        if action != "sleep":
            raise AdminError(400, f"level applies to sleep only, not to {action}", code="invalid_parameter")
        if raw_level not in ("1", "2"):
            raise AdminError(400, f"level must be 1 or 2, got {raw_level!r}", code="invalid_parameter")
    node_name = request.query.get("node") or None
    routes = model_routes(state, model, node_name)
    if node_name:
        route = routes[0]
    else:
        try:
            route = _choose(state, action, model, routes)
        except AdminError as exc:
            if exc.status != 409:
                raise
            # The router's view of its agents is up to a scrape interval old (a request may have
            # just woken or loaded the model): read them now and decide again before saying no.
            await request.app[SCRAPER_KEY].probe(list(dict.fromkeys(r.agent for r in routes)))
            routes = model_routes(state, model, None)
            route = _choose(state, action, model, routes)
    agent = route.agent
    path = f"/models/{quote(route.instance_name, safe='')}/{action}"
    if raw_level is not None:
        path += f"?level={raw_level}"
    elif action == "load" and request.query.get("wait", "").lower() in ("0", "false", "no"):
        path += "?wait=false"  # the agent answers 202 as soon as the engine is starting
    wait = agent.cfg.load_timeout + _CALL_MARGIN_S
    log.info("admin: %s %s on agent %s (catalog entry %s)", action, model, agent.name, route.instance_name)
    cluster = request.app.get(CLUSTER_KEY) if action == "load" else None
    token: str | None = None
    if cluster is not None:  # one cold load per model fleet-wide, whichever router is asked
        allowed, token = await cluster.acquire_load_lock(model, wait)
        if not allowed:
            holder = await cluster.load_lock_holder(model)
            raise AdminError(
                409,
                f"`{model}` is being loaded through another router ({holder or 'lock held'}); wait for it",
                code="load_in_progress",
                headers={"Retry-After": "5"},
            )
    try:
        answer = await call(state, agent, "POST", path, timeout=wait, what=f"{action} of `{model}`")
    finally:
        if cluster is not None:
            await cluster.release_load_lock(model, token)
    if 200 <= answer.status < 300:
        _apply_instance(route, answer.body)
    # Read the agent again soon: placement and memory moved with this action.
    request.app[SCRAPER_KEY].probe_soon([agent])
    return relay(answer, agent)


def _apply_instance(route: AgentRoute, body: bytes) -> None:
    """Routing sees the agent's answer at once instead of at the next /state."""
    try:
        inst = InstanceState.from_dict(json.loads(body))
    except (ValueError, TypeError):
        return
    if inst.name == route.instance_name:
        route.update(route.entry, inst)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    auto = state.config.autoscale
    models = []
    for model, views in replicas.by_model(state.registry).items():
        counts = dict.fromkeys(REPLICA_STATES, 0)
        listed = []
        for v in views:
            if v.state is None:
                continue
            counts[v.state] += 1
            score = state.policy.score(v.target) if v.state in ("awake", "draining") else None
            listed.append(
                {
                    "agent": v.agent,
                    "kind": v.target.kind,
                    "instance": v.route.instance_name if v.route is not None else None,
                    "state": v.state,
                    "score": round(score, 4) if score is not None and score != float("inf") else None,
                    "released": v.target.released,
                    "in_flight": v.target.in_flight,
                }
            )
        lo, hi = auto.bounds(model)
        models.append(
            {
                "model": model,
                "replicas": listed,
                "counts": counts,
                "autoscale": {"enabled": auto.enabled, "min_replicas": lo, "max_replicas": hi},
            }
        )
    return web.json_response({"models": models, "autoscale": {"enabled": auto.enabled}})


# A model name may hold slashes (HF ids): the action is the last path segment.
ROUTES = [
    web.get("/admin/models", list_models),
    web.post("/admin/models/{model:.+}/{action:load|unload|sleep|wake}", model_action),
]
