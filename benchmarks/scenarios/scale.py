"""scale: 1,000 concurrent open streams through one proxy, and a registry of 50 nodes x 10 models.

Streams: two sim nodes (max_num_seqs 1024 each) produce slow streams (one token every few hundred
ms) so that 1,000 of them are open at once for several seconds. During the run the proxy's RSS is
sampled every 0.25 s (psutil, process and children), the router's own event-loop lag metric
(`mvllm_event_loop_lag_seconds*`) is read from its /metrics if it has one, and a separate client
probes GET /health every 100 ms: a probe's latency bounds any stall of the router's loop from
above (it also includes the load generator's own delays, which share the machine).

Registry: one in-process fake fleet (benchmarks.fakefleet) serves /health, /v1/models and a
vLLM-shaped /metrics for 10 models on each of 50 ports; the router scrapes it as configured (every
1 s by default) and its CPU time over an idle window gives the scrape cost per second. The time
per routing decision is measured in-process by calling the router's policy (mvllm.router.policy)
over the registry's 50 candidates.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import timeit
from dataclasses import dataclass, field

import aiohttp

from benchmarks.fakefleet import FakeFleet
from benchmarks.harness import Endpoint, Harness, SimSpec, Unavailable, cpu_seconds, rss_bytes, wait_until
from benchmarks.loadgen import ChatRequest, closed_loop, make_session
from benchmarks.report import Check, Row, ScenarioResult
from benchmarks.scenarios import Context
from benchmarks.stats import max_concurrency, summarize

STREAMS = 1000
LAG_METRIC = "mvllm_event_loop_lag_seconds"
MB = 1e6


@dataclass
class Watch:
    """What the sampler saw of one proxy while the streams ran."""

    rss_idle: int = 0
    rss_peak: int = 0
    lag_max: float | None = None  # from the router's own metric
    lag_source: str = ""
    probes: list[float] = field(default_factory=list)
    probe_errors: int = 0
    client_lag_max: float = 0.0  # the load generator's own loop: how late its 0.1 s waits woke


def lag_from_metrics(text: str) -> tuple[float | None, str]:
    """The largest loop lag the router reports: a gauge or `_max` sample as it is, or for a
    histogram the upper bound of the highest non-empty bucket. None when the metric is absent."""
    from mvllm.common.prom import iter_samples

    gauges: list[float] = []
    buckets: dict[float, float] = {}
    for s in iter_samples(text):
        if not s.name.startswith(LAG_METRIC):
            continue
        suffix = s.name[len(LAG_METRIC) :]
        if suffix in ("", "_max"):
            gauges.append(s.value)
        elif suffix == "_bucket":
            le = s.labels.get("le", "+Inf")
            bound = math.inf if le in ("+Inf", "Inf") else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + s.value
    if gauges:
        return max(gauges), "gauge"
    if buckets:
        # Cumulative buckets: the max lag lies at or below the smallest bound holding every count.
        total = buckets.get(math.inf, max(buckets.values()))
        for bound in sorted(buckets):
            if buckets[bound] >= total:
                return bound, "histogram bound"
    return None, ""


async def _watch(h: Harness, ep: Endpoint, watch: Watch, stop: asyncio.Event, router: bool) -> None:
    """Sample RSS, the lag metric and /health latency until `stop` is set (bounded by the caller)."""
    probe_url = f"{ep.url}/health"
    next_rss = next_metrics = 0.0
    async with aiohttp.ClientSession() as probe:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_rss:
                watch.rss_peak = max(watch.rss_peak, rss_bytes(ep.pid))
                next_rss = now + 0.25
            if router:
                t = time.monotonic()
                try:
                    async with probe.get(probe_url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        await resp.read()
                    watch.probes.append(time.monotonic() - t)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    watch.probe_errors += 1
                if now >= next_metrics:
                    next_metrics = now + 1.0
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                        _, body = await h.get(f"{ep.url}/metrics", timeout=5)
                        lag, src = lag_from_metrics(body.decode(errors="replace"))
                        if lag is not None:
                            watch.lag_max = lag if watch.lag_max is None else max(watch.lag_max, lag)
                            watch.lag_source = src
            t = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            if not stop.is_set():
                watch.client_lag_max = max(watch.client_lag_max, time.monotonic() - t - 0.1)


async def _streams_leg(ctx: Context, h: Harness, proxy: str) -> tuple[Row, Watch]:
    itl = ctx.pick(250.0, 400.0)
    tokens = ctx.pick(16, 24)
    ramp = ctx.pick(2.0, 4.0)  # shorter than a stream, so all of them are open together
    spec = SimSpec(max_num_seqs=1024, ttft_ms=10, itl_ms=itl, extra=("--sim-batch-slowdown", "0"))
    nodes = await h.start_sims([spec, spec])
    if proxy == "router":
        ep = await h.start_router([(f"n{i}", n.url, n.max_num_seqs) for i, n in enumerate(nodes)])
    else:
        ep = await h.start_nginx([n.url for n in nodes])
    watch = Watch()
    req = ChatRequest(nodes[0].model, int(tokens), True)
    async with make_session() as session:
        await closed_loop(session, ep.url, ChatRequest(nodes[0].model, 4, True), 8, count=32)  # warm-up
        await asyncio.sleep(0.5)
        watch.rss_idle = rss_bytes(ep.pid)
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(_watch(h, ep, watch, stop, proxy == "router"))
        # Opened over a few seconds: the target is about holding 1,000 streams, not about
        # accepting 1,000 connections in one burst (which the first-token times would show).
        result = await closed_loop(session, ep.url, req, STREAMS, count=STREAMS, ramp_s=ramp, timeout=60)
        stop.set()
        await asyncio.wait_for(watcher, 10)
    await h.stop_all()
    st = result.stats()
    parts = [
        f"{max_concurrency(result.records)} open at peak",
        f"RSS {watch.rss_peak / MB:.0f} MB peak ({watch.rss_idle / MB:.0f} MB idle)",
    ]
    if proxy == "router":
        lag = "n/a (no mvllm_event_loop_lag_seconds)" if watch.lag_max is None else f"{watch.lag_max * 1000:.1f} ms ({watch.lag_source})"
        parts.append(f"loop lag max {lag}")
        pr = summarize(watch.probes)
        parts.append(
            f"/health probe p50 {pr.p50 * 1000:.1f} p99 {pr.p99 * 1000:.1f} max {pr.max * 1000:.1f} ms"
            + (f", {watch.probe_errors} failed" if watch.probe_errors else "")
        )
        parts.append(f"client loop lag max {watch.client_lag_max * 1000:.0f} ms")
    if st.errors:
        parts.append("errors " + ", ".join(f"{k}={v}" for k, v in st.errors.items()))
    parts.append(f"each stream ~{(tokens - 1) * itl / 1000 + 0.01:.1f} s, opened over {ramp:g} s")
    return Row.from_stats("scale", f"{proxy} {STREAMS} streams", st, "; ".join(parts)), watch


def _policy_timing(nodes: int, models: int) -> tuple[str, dict[str, float]]:
    """Microseconds per routing decision over `nodes` candidates, calling the router's own code."""
    try:
        from mvllm.router import policy as pol
    except ImportError as exc:
        return f"pending ({exc})", {}
    try:
        from mvllm.router.config import NodeConfig, PolicyConfig, RouterConfig
        from mvllm.router.fleet.registry import Registry
    except ImportError as exc:
        return f"pending ({exc})", {}
    rng = random.Random(0)
    names = [f"fleet-model-{j}" for j in range(models)]
    cfg = RouterConfig(
        nodes=tuple(NodeConfig(name=f"n{i}", url=f"http://127.0.0.1:{20000 + i}", capacity=256, models=tuple(names)) for i in range(nodes))
    )
    reg = Registry(cfg)
    now = time.monotonic()
    for node in reg.nodes():
        # Busy enough that no node is under the idle threshold: the full lowest-score scan runs.
        node.record_scrape(float(rng.randint(130, 250)), float(rng.randint(0, 20)), {}, now)
    out: dict[str, float] = {}
    model = names[3]
    for kind in ("least-score", "round-robin"):
        policy = pol.make_policy(PolicyConfig(type=kind))

        def decide(policy=policy) -> object:
            # As the router's proxy does per attempt (mvllm/router/proxy.py `_forward`).
            t = time.monotonic()
            tried: list[object] = []
            cands = [n for n in reg.nodes_for(model) if n.routable(t) and n not in tried]
            return policy.choose(cands, model)

        if decide() is None:
            return "pending (policy chose no node)", {}
        n = 20000
        best = min(timeit.repeat(decide, number=n, repeat=3))
        out[kind] = best / n * 1e6
        cands = [n for n in reg.nodes_for(model) if n.routable(now)]
        out[kind + " (choose only)"] = min(timeit.repeat(lambda p=policy, c=cands: p.choose(c, model), number=n, repeat=3)) / n * 1e6
    return "", out


async def _registry_leg(ctx: Context, h: Harness) -> Row:
    fleet = FakeFleet(nodes=50, models_per_node=10)
    window = ctx.pick(5.0, 10.0)
    await fleet.start()
    try:
        ep = await h.start_router([(f"f{i}", f"http://127.0.0.1:{p}", 256) for i, p in enumerate(fleet.ports)])
        # Let discovery and the first scrape rounds finish before measuring.
        await wait_until(lambda: len({port for (port, path) in fleet.hits if path == "/metrics"}) >= fleet.nodes, 15, 0.2)
        await asyncio.sleep(1.0)
        scrapes0, cpu0, t0 = fleet.scrapes(), cpu_seconds(ep.pid), time.monotonic()
        await asyncio.sleep(window)
        cpu, dt, scrapes = cpu_seconds(ep.pid) - cpu0, time.monotonic() - t0, fleet.scrapes() - scrapes0
        _, body = await h.get(f"{ep.url}/v1/models")
        rss = rss_bytes(ep.pid)
    finally:
        await h.stop_all()
        await fleet.stop()
    per_scrape = cpu / scrapes * 1000 if scrapes else math.nan
    return Row(
        "scale",
        "registry 50x10 scrape",
        extra=(
            f"router CPU {cpu / dt * 1000:.0f} ms/s idle; {scrapes / dt:.1f} scrapes/s of {fleet.metrics_bytes / 1000:.0f} kB "
            f"({per_scrape:.2f} ms CPU each); RSS {rss / MB:.0f} MB; /v1/models {len(body) / 1000:.0f} kB"
        ),
    )


async def run(ctx: Context) -> ScenarioResult:
    res = ScenarioResult("scale")
    t0 = time.monotonic()
    watches: dict[str, Watch] = {}
    proxies = ["router"] if ctx.router_ok else []
    if not ctx.router_ok:
        res.notes.append(f"router not available: {ctx.router_reason}")
    proxies.append("nginx")
    async with ctx.harness("scale") as h:
        for proxy in proxies:
            ctx.log(f"scale: {STREAMS} streams via {proxy}")
            try:
                row, watch = await _streams_leg(ctx, h, proxy)
            except Unavailable as exc:
                await h.stop_all()
                res.notes.append(f"{proxy} leg skipped: {exc}"[:700])
                continue
            res.rows.append(row)
            watches[proxy] = watch
        if ctx.router_ok:
            ctx.log("scale: registry of 50 nodes x 10 models")
            try:
                res.rows.append(await _registry_leg(ctx, h))
            except Unavailable as exc:
                res.notes.append(f"registry leg skipped: router not available: {exc}"[:700])
    reason, timing = _policy_timing(50, 10)
    res.rows.append(
        Row(
            "scale",
            "routing decision, 50 candidates",
            extra=reason or "; ".join(f"{k} {v:.1f} µs" for k, v in timing.items()),
        )
    )
    res.checks += _checks(watches.get("router"))
    res.seconds = time.monotonic() - t0
    return res


def _checks(w: Watch | None) -> list[Check]:
    if w is None:
        return [
            Check(f"router RSS < 150 MB with {STREAMS} open streams", "router leg missing", None),
            Check("no event-loop stall over 50 ms in the scale run", "router leg missing", None),
        ]
    rss = Check(f"router RSS < 150 MB with {STREAMS} open streams", f"{w.rss_peak / MB:.0f} MB peak", w.rss_peak < 150 * MB)
    probe_max = max(w.probes, default=math.nan) * 1000
    if w.lag_max is None:
        lag = Check(
            "no event-loop stall over 50 ms in the scale run",
            f"n/a: router has no {LAG_METRIC}; /health probe max {probe_max:.1f} ms (an upper bound: the load "
            f"generator's own loop lagged up to {w.client_lag_max * 1000:.0f} ms)",
            None,
        )
    else:
        lag = Check(
            "no event-loop stall over 50 ms in the scale run",
            f"{w.lag_max * 1000:.1f} ms ({w.lag_source}); /health probe max {probe_max:.1f} ms",
            w.lag_max <= 0.050,
        )
    return [rss, lag]
