"""The autoscale loop: every scrape interval, the agents' replicas of each model become observations
for the pure policy (mvllm.router.autoscale), and its decisions are carried out.

ScaleUp: a released replica still awake is taken back first (cheapest: no GPU work); else the
cheapest agent by the routing tiers that holds no awake or loading copy (wake a sleeping copy >
cold load where there is room > cold load after evicting idle models) is asked to wake or load it,
as `POST /admin/models/NAME/load` would. The new replica joins routing when its agent reports it
ready. ScaleDown: the replica is released (AgentRoute.released): no new request while another
copy is awake, in-flight ones finish, and the agent's idle timers sleep and unload it.
Every decision is logged (logger mvllm.router.autoscale), so it shows in /admin/events.
Static servers are never scaled; only agents' engines are observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from urllib.parse import quote

import aiohttp

from mvllm.common.state import FAILED, READY, SLEEPING, InstanceState
from mvllm.common.tasks import TaskSet
from mvllm.router.autoscale import AutoscalePolicy, ModelObservation, Replica, ScaleDown, ScaleUp
from mvllm.router.fleet.agent_client import call_agent, describe
from mvllm.router.fleet.agents import AgentNode, AgentRoute
from mvllm.router.fleet.replicas import model_key, route_state
from mvllm.router.fleet.targets import Node
from mvllm.router.policy import TIER_EVICT, TIER_FITS, TIER_NAMES, TIER_SLEEPING, choose_tiered
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.autoscale")

# Tiers a new replica may come from; no_room is left out (the agent would refuse it).
_UP_TIERS = frozenset({TIER_SLEEPING, TIER_FITS, TIER_EVICT})
# How long a wake call may take beyond the agent's own load_timeout.
_CALL_MARGIN_S = 30.0


class Autoscaler:
    """The loop's state: the policy's timers and the loads and wakes it asked for, by (model, agent)."""

    def __init__(self, state: RouterState, probe_soon: Callable[[list[Node]], None]) -> None:
        self.state = state
        self.policy = AutoscalePolicy(state.config.autoscale)
        self.probe_soon = probe_soon
        self.pending: dict[tuple[str, str], float] = {}  # -> monotonic deadline
        self._no_candidate: set[str] = set()  # models whose "no agent can add one" was logged
        self._tasks = TaskSet()

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.state.config.scrape.interval)
            try:
                self.step(time.monotonic())
            except Exception:
                log.exception("autoscale step failed; trying again at the next interval")

    async def close(self) -> None:
        await self._tasks.close()

    def step(self, now: float) -> None:
        """One tick: follow a reload, observe, decide, act (agent calls run as tasks)."""
        cfg = self.state.config.autoscale
        if cfg is not self.policy.config:
            was = self.policy.config.enabled
            self.policy.reconfigure(cfg)
            if was and not cfg.enabled:
                self._release_none()
                log.info("autoscale disabled: released replicas take requests again")
            elif cfg.enabled and not was:
                log.info("autoscale enabled (min %d, max %d replicas)", cfg.min_replicas, cfg.max_replicas)
        if not cfg.enabled:
            return
        groups = self._groups()
        for decision in self.policy.tick(now, self._observations(groups, now)):
            routes = groups.get(decision.model, [])
            if isinstance(decision, ScaleUp):
                self._scale_up(decision, routes, now)
            elif isinstance(decision, ScaleDown):
                self._scale_down(decision, routes)

    # -- observing --------------------------------------------------------------------------------------

    def observe(self, now: float) -> list[ModelObservation]:
        """What the policy is shown at a tick taken now."""
        return self._observations(self._groups(), now)

    def _groups(self) -> dict[str, list[AgentRoute]]:
        groups: dict[str, list[AgentRoute]] = {}
        for agent in self.state.registry.agents():
            for route in agent.routes.values():
                groups.setdefault(model_key(route), []).append(route)
        return groups

    def _loading(self, model: str, route: AgentRoute, now: float) -> bool:
        key = (model, route.agent.name)
        deadline = self.pending.get(key)
        if deadline is None:
            return False
        if now > deadline or route.state in (READY, FAILED):
            del self.pending[key]
            return False
        return True

    def _observations(self, groups: dict[str, list[AgentRoute]], now: float) -> list[ModelObservation]:
        out = []
        policy = self.state.policy
        for model, routes in groups.items():
            replicas = []
            for route in routes:
                if not route.agent.routable(now):
                    continue
                st = route_state(route, self._loading(model, route, now))
                if st is None:
                    continue
                score = policy.score(route) if st == "awake" else 0.0
                replicas.append(Replica(route.agent.name, st, score))  # type: ignore[arg-type]
            used = any(r.dispatched_at > 0 for r in routes)
            if replicas:
                out.append(ModelObservation(model, tuple(replicas), used))
        return out

    # -- acting -----------------------------------------------------------------------------------------

    def _scale_up(self, d: ScaleUp, routes: list[AgentRoute], now: float) -> None:
        released = [r for r in routes if r.released and r.state == READY and r.agent.routable(now)]
        if released:
            route = min(released, key=lambda r: r.agent.name)
            route.released = False
            log.info("autoscale: scale up %s: taking back released replica on %s (%s)", d.model, route.agent.name, d.reason)
            return
        candidates = [
            r
            for r in routes
            if r.tier in _UP_TIERS and r.routable(now) and (d.model, r.agent.name) not in self.pending
        ]
        route = choose_tiered(self.state.policy, candidates, d.model)
        if route is None:
            if d.model not in self._no_candidate:
                self._no_candidate.add(d.model)
                log.warning("autoscale: scale up %s wanted (%s) but no agent can add a replica now", d.model, d.reason)
            return
        self._no_candidate.discard(d.model)
        action = "wake" if route.state == SLEEPING else "load"
        tier = TIER_NAMES.get(route.tier or 0, "?")
        agent = route.agent
        self.pending[(d.model, agent.name)] = now + agent.cfg.load_timeout + _CALL_MARGIN_S
        log.info("autoscale: scale up %s: %s on %s (%s; %s)", d.model, action, agent.name, tier, d.reason)
        self._tasks.spawn(self._call(d.model, route, action), name="mvllm-autoscale-call")

    async def _call(self, model: str, route: AgentRoute, action: str) -> None:
        agent: AgentNode = route.agent
        path = f"/models/{quote(route.instance_name, safe='')}/{action}"
        if action == "load":
            path += "?wait=false"  # 202 as soon as it starts; the replica joins when ready
        try:
            answer = await call_agent(
                self.state, agent, "POST", path, timeout=agent.cfg.load_timeout + _CALL_MARGIN_S
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.pending.pop((model, agent.name), None)
            log.warning("autoscale: %s of %s on %s failed: %s", action, model, agent.name, describe(exc))
            return
        if not 200 <= answer.status < 300:
            self.pending.pop((model, agent.name), None)
            log.warning(
                "autoscale: %s of %s on %s refused (HTTP %d): %s",
                action, model, agent.name, answer.status, _error_message(answer.body),
            )
            return
        with contextlib.suppress(ValueError, TypeError, KeyError):
            inst = InstanceState.from_dict(json.loads(answer.body))
            if inst.name == route.instance_name:
                route.update(route.entry, inst)  # routing sees the new state before the next /state
        self.probe_soon([agent])

    def _scale_down(self, d: ScaleDown, routes: list[AgentRoute]) -> None:
        route = next((r for r in routes if r.agent.name == d.agent and r.state == READY), None)
        if route is None:
            return
        route.released = True
        log.info("autoscale: scale down %s: released replica on %s (%s)", d.model, d.agent, d.reason)

    def _release_none(self) -> None:
        for agent in self.state.registry.agents():
            for route in agent.routes.values():
                route.released = False


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        return str(err.get("message")) if isinstance(err, dict) else body[:200].decode(errors="replace")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
