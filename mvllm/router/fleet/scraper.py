"""Background knowledge of the nodes: load from /metrics every scrape_interval, /health every
health_check_interval, models from /v1/models on join and every models_refresh_interval.

All requests go through the app's one pooled session with short timeouts. Each loop reads its
interval from the current config, so a reload changes them without restarting anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

import aiohttp

from mvllm.common.prom import iter_samples
from mvllm.common.tasks import TaskSet
from mvllm.router.fleet.agent_client import describe, poll_agent
from mvllm.router.fleet.agents import AgentNode
from mvllm.router.fleet.engines import missing_metrics_message, parse_sglang_load
from mvllm.router.fleet.targets import Health, Node
from mvllm.router.state import RouterState

log = logging.getLogger("mvllm.router.scraper")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
_FAMILIES = (RUNNING, WAITING)
KV_USAGE = "vllm:kv_cache_usage_perc"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
_CACHE_FAMILIES = (KV_USAGE, PREFIX_HITS, PREFIX_QUERIES)
_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


def parse_load(text: str) -> tuple[float, float, dict[str, tuple[float, float]]] | None:
    """(running, waiting, {model_name: (running, waiting)}) summed over label sets, or None when
    the text has neither family (not a vLLM engine, or one started with --disable-log-stats)."""
    per_model: dict[str, list[float]] = {}
    seen = False
    for s in iter_samples(text, _FAMILIES):
        seen = True
        slot = per_model.setdefault(s.labels.get("model_name", ""), [0.0, 0.0])
        slot[0 if s.name == RUNNING else 1] += s.value
    if not seen:
        return None
    running = sum(v[0] for v in per_model.values())
    waiting = sum(v[1] for v in per_model.values())
    return running, waiting, {m: (v[0], v[1]) for m, v in per_model.items()}


def parse_cache(text: str) -> tuple[float | None, float | None, float | None]:
    """(kv_cache_usage, prefix_cache_hits, prefix_cache_queries) of a vLLM /metrics text: the
    fullest engine's KV usage (0..1) and the counters summed over label sets; None where absent."""
    kv: float | None = None
    hits: float | None = None
    queries: float | None = None
    for s in iter_samples(text, _CACHE_FAMILIES):
        if s.name == KV_USAGE:
            kv = s.value if kv is None else max(kv, s.value)
        elif s.name == PREFIX_HITS:
            hits = (hits or 0.0) + s.value
        else:
            queries = (queries or 0.0) + s.value
    return kv, hits, queries


class Scraper:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self._tasks = TaskSet()

    @property
    def _session(self) -> aiohttp.ClientSession:
        assert self.state.session is not None
        return self.state.session

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        """The three loops, until cancelled."""
        cfg = lambda: self.state.config  # noqa: E731 - read at every turn: reloads change intervals
        await asyncio.gather(
            self._every(lambda: cfg().scrape.interval, self.scrape),
            self._every(lambda: cfg().health.interval, self.check_health),
            self._every(lambda: cfg().scrape.models_interval, self.discover),
        )

    async def probe(self, nodes: Iterable[Node]) -> None:
        """Health, models and load of `nodes` now (a node joining, or the router starting)."""
        await asyncio.gather(*(self._probe_one(n) for n in nodes))

    def probe_soon(self, nodes: list[Node]) -> None:
        self._tasks.spawn(self.probe(nodes))

    async def close(self) -> None:
        await self._tasks.close()

    async def _probe_one(self, node: Node) -> None:
        await asyncio.gather(self.check_health(node), self.discover(node), self.scrape(node))

    async def _every(self, interval: Callable[[], float], job: Callable[[Node], Awaitable[None]]) -> None:
        last = time.monotonic()
        while True:
            # Short naps rather than one long sleep, so a reload that shortens the interval counts at once.
            await asyncio.sleep(min(interval(), 0.5))
            if time.monotonic() - last < interval():
                continue
            last = time.monotonic()
            nodes = self.state.registry.nodes()
            if nodes:
                await asyncio.gather(*(job(n) for n in nodes))

    # -- jobs (each catches its own errors: one bad node never stops a loop) ----------------------

    async def scrape(self, node: Node) -> None:
        if node.via_agent:
            # An agent's load, engines and catalog come from its /state, which also shows it is up.
            answered, error = await poll_agent(self.state, cast(AgentNode, node))
            if answered is not None:
                self._set_health(node, None if answered else error)
            return
        timeout = aiohttp.ClientTimeout(total=self.state.config.scrape.timeout)
        try:
            async with self._session.get(node.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    node.scrape_error = f"/metrics answered HTTP {resp.status}"
                    return
                text = await resp.text(errors="replace")
        except _ERRORS as exc:
            node.scrape_error = f"/metrics: {describe(exc)}"
            return
        if not self.state.config.health.enabled:
            self._set_health(node, None)  # no /health checks: a node answering its scrape is up
        now = time.monotonic()
        engine = node.cfg.engine
        load = parse_sglang_load(text) if engine == "sglang" else parse_load(text)
        if load is None:
            # No engine numbers: fall back to our own in-flight count as the node's load.
            node.record_scrape(float(node.in_flight), 0.0, {}, now)
            node.scrape_error = missing_metrics_message(engine)
            return
        node.record_scrape(load[0], load[1], load[2], now)
        if engine != "sglang" and node.record_cache(*parse_cache(text)):
            self.state.forget_cache(node.name, "restarted: its prefix-cache query counter went down")

    async def check_health(self, node: Node) -> None:
        cfg = self.state.config.health
        if not cfg.enabled:
            return
        t0 = time.monotonic()
        error: str | None = None
        try:
            async with self._session.get(node.url + "/health", timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as resp:
                await resp.read()
                if resp.status != 200:
                    error = f"/health answered HTTP {resp.status}"
        except _ERRORS as exc:
            error = f"/health: {describe(exc)}"
        if error is None and time.monotonic() - t0 > cfg.max_response_time:
            error = f"/health took {time.monotonic() - t0:.2f}s (> health_check_max_response_time)"
        self._set_health(node, error)

    async def discover(self, node: Node) -> None:
        if node.via_agent:
            return  # its catalog comes with its /state
        timeout = aiohttp.ClientTimeout(total=self.state.config.health.timeout)
        try:
            # A static server started with --api-key wants its key on /v1/models (not on /health, /metrics).
            headers = {"Authorization": "Bearer " + node.cfg.token} if node.cfg.token else None
            async with self._session.get(node.url + "/v1/models", timeout=timeout, headers=headers) as resp:
                if resp.status != 200:
                    log.debug("node %s: /v1/models answered HTTP %s", node.name, resp.status)
                    return
                doc = await resp.json(content_type=None)
        except _ERRORS as exc:
            log.debug("node %s: /v1/models: %s", node.name, describe(exc))
            return
        cards = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(cards, list):
            log.warning("node %s: /v1/models has no 'data' list; models unchanged", node.name)
            return
        if self.state.registry.set_models(node, [c for c in cards if isinstance(c, dict) and "id" in c]):
            log.info("node %s serves %s", node.name, ", ".join(sorted(node.models)) or "no models")

    def _set_health(self, node: Node, error: str | None) -> None:
        if error is None:
            node.health_failures = 0
            node.health_error = None
            if node.discovered_at is None and not node.cfg.models:
                # Up, but its models were never read (it was down when it joined): read them now.
                self._tasks.spawn(self.discover(node))
            if node.health is not Health.UP:
                was_down = node.health is Health.DOWN
                node.health = Health.UP
                if was_down:
                    log.info("node %s is up again", node.name)
                    # Seen coming back: re-admit now instead of waiting out the breaker's cooldown,
                    # and look at its models again (it may have restarted with others).
                    transition = node.breaker.reset()
                    if transition is not None:
                        self.state.metrics.breaker_transitions.labels(node.name, transition.new.value).inc()
                    self.probe_soon([node])
            return
        node.health_failures += 1
        node.health_error = error
        if node.health is not Health.DOWN and node.health_failures >= self.state.config.health.failures_to_down:
            node.health = Health.DOWN
            log.warning("node %s is down: %s", node.name, error)
            self.state.forget_cache(node.name, "down")
