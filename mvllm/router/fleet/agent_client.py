"""The router's HTTP calls to its agents: the `GET /state` poll of the scrape cycle (applied to the
AgentNode) and one lifecycle call (`POST /models/NAME/load` ...) with the agent's token."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from mvllm.common.state import READY, AgentState, StateVersionError
from mvllm.router.fleet.agents import AUTH_STATUSES, AgentNode
from mvllm.router.fleet.targets import Health
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.agents")


def describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def poll_agent(state: RouterState, node: AgentNode) -> tuple[bool | None, str | None]:
    """Read one agent's `/state` and apply it. Returns (answered, error) for its health: answered
    is True when the agent answered at all (even 401), False when it could not be reached (error
    says why), None when the read timed out (no verdict: the health check decides)."""
    session = state.session
    assert session is not None
    timeout = aiohttp.ClientTimeout(total=state.config.scrape.timeout)
    sent = time.monotonic()
    try:
        async with session.get(node.url + "/state", headers=node.auth_headers, timeout=timeout) as resp:
            if resp.status in AUTH_STATUSES:
                _set_fatal(
                    node,
                    f"the agent rejected the router's token (HTTP {resp.status} on /state): "
                    f"check token / token_env of agent {node.name} in servers.toml",
                )
                return True, None
            if resp.status != 200:
                node.scrape_error = f"/state answered HTTP {resp.status}"
                return True, None
            doc = await resp.json(content_type=None)
    except asyncio.TimeoutError:
        node.scrape_error = "/state: timed out"
        return None, node.scrape_error
    except (aiohttp.ClientConnectionError, OSError) as exc:
        node.scrape_error = f"/state: {describe(exc)}"
        _unreachable(node)
        return False, node.scrape_error
    except (aiohttp.ClientError, ValueError) as exc:
        node.scrape_error = f"/state: {describe(exc)}"
        return True, None
    try:
        st = AgentState.from_dict(doc)
    except StateVersionError as exc:
        _set_fatal(node, f"agent {node.name} sent a /state this router cannot read ({exc}): upgrade one of them")
        return True, None
    except (ValueError, TypeError, KeyError) as exc:
        node.scrape_error = f"/state is malformed: {describe(exc)}"
        return True, None
    if node.fatal_error is not None:
        log.info("agent %s accepts the router again", node.name)
        node.fatal_error = None
    if node.unreachable or node.health is Health.DOWN:
        _readmit_routes(state, node)
    first = node.state is None
    try:
        moved = node.apply_state(st, sent, time.monotonic())
        changed = state.registry.set_models(node, node.model_cards())
    except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong type: keep the last view
        node.scrape_error = f"/state is malformed: {describe(exc)}"
        return True, None
    if moved and not changed and not node.retired:
        state.registry.reindex()
    if node.cache_lost:
        # Prefixes are indexed per agent, not per engine: all of the agent's are dropped.
        state.forget_cache(node.name, "an engine slept, woke, stopped or restarted")
    if first or changed:
        awake = [r.instance_name for r in node.routes.values() if r.state == READY]
        log.info(
            "agent %s (%s, engine %s): catalog %s; awake: %s",
            node.name,
            st.host,
            st.engine,
            ", ".join(sorted(node.models)) or "empty",
            ", ".join(awake) or "none",
        )
    return True, None


def _set_fatal(node: AgentNode, message: str) -> None:
    node.scrape_error = message
    if node.fatal_error != message:
        log.error("agent %s: %s", node.name, message)  # once per change, not once per scrape
        node.fatal_error = message


def _unreachable(node: AgentNode) -> None:
    if not node.unreachable:
        node.unreachable = True
        log.debug("agent %s unreachable: %s", node.name, node.scrape_error)


def _readmit_routes(state: RouterState, node: AgentNode) -> None:
    """The agent is back: its engines get a fresh start instead of waiting out their breakers."""
    node.unreachable = False
    for route in node.routes.values():
        transition = route.breaker.reset()
        if transition is not None:
            state.metrics.breaker_transitions.labels(node.name, transition.new.value).inc()


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """An agent's answer to one call, read whole."""

    status: int
    body: bytes
    headers: CIMultiDict[str]

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


async def call_agent(
    state: RouterState,
    node: AgentNode,
    method: str,
    path: str,
    *,
    timeout: float,
    json: Any = None,
    params: Mapping[str, str] | None = None,
) -> AgentAnswer:
    """One call of an agent's API (`POST /models/NAME/load`, `GET /logs/stats` ...) with its token
    and an optional JSON body. Raises aiohttp.ClientError / asyncio.TimeoutError / OSError when
    there is no answer."""
    session = state.session
    assert session is not None
    async with session.request(
        method,
        node.url + path,
        json=json,
        params=params,
        headers=node.auth_headers,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=state.config.timeouts.connect),
    ) as resp:
        return AgentAnswer(resp.status, await resp.read(), resp.headers.copy())
