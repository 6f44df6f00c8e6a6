"""relay: CPU per request and per streamed chunk of each relay, side by side in one run (issue 15).

Targets in front of one emulated vLLM backend (`benchmarks/fakevllm.py`): direct, nginx, the Rust
`vllm-router`, the mvllm router, and the mvllm router with API keys and limits on. The agent cannot
front an external backend (it runs its own engines), so the agent's relay is measured in front of
the `mvllm sim` engines it starts (engine = "sim"), against those same engines direct. Relay and
backend are pinned to CPU 0, the load generator to CPU 1. Not in the default run (about 2.5 minutes;
`--quick` about 75 s): `python -m benchmarks.run --only relay [--quick]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import tomli_w

from benchmarks.harness import (
    HOST,
    Endpoint,
    Harness,
    Unavailable,
    cpu_seconds,
    free_port,
    wait_until,
)
from benchmarks.loadgen import ChatRequest, closed_loop, make_session
from benchmarks.report import Check, Row, ScenarioResult
from benchmarks.scenarios import Context
from benchmarks.stats import RequestRecord, RunStats, run_stats, wall_time

MODEL = "bench-model"
PACED_TOKENS = 64
PACED_MS = 31.0  # 64 chunks over ~2 s
API_KEY = "sk-bench-relay-0123456789abcdef"
RELAY_CPU, LOAD_CPU = 0, 1


@dataclass(frozen=True)
class LegSpec:
    name: str
    stream: bool
    max_tokens: int
    concurrency: int


LEGS = (
    LegSpec("json c=1", False, 8, 1),
    LegSpec("json c=32", False, 8, 32),
    LegSpec("stream16 c=32", True, 16, 32),
    LegSpec(f"stream{PACED_TOKENS} c=32", True, PACED_TOKENS, 32),
)


@dataclass
class Target:
    name: str
    url: str
    pid: int | None  # the relay's process (None: direct)
    children: bool  # count children's CPU too (nginx's workers), not the agent's engines
    model: str = MODEL
    paced_model: str = MODEL
    paced_url: str | None = None  # where the paced model is served, when not at `url`
    headers: dict[str, str] = field(default_factory=dict)
    baseline: str = "direct"


@dataclass
class Measured:
    records: list[RequestRecord] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0

    def stats(self) -> RunStats:
        return run_stats(self.records, self.wall)


def pinned() -> list[str]:
    """What runs a command on the relay CPU (its children inherit it), when the machine has two."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(RELAY_CPU)]
    return []


@contextlib.contextmanager
def load_generator_cpu() -> Iterator[None]:
    """Pin this process (the load generator) to its own CPU for the scenario, then restore."""
    before = os.sched_getaffinity(0)
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {LOAD_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def vllm_router_command() -> tuple[list[str], dict[str, str]] | None:
    """How to start `vllm-router`: installed here, or from a `pip install --target` dir in $VLLM_ROUTER_PATH."""
    target = os.environ.get("VLLM_ROUTER_PATH")
    if target and Path(target, "vllm_router").is_dir():
        return [sys.executable, "-m", "vllm_router.launch_router"], {"PYTHONPATH": target}
    if importlib.util.find_spec("vllm_router") is not None:
        return [sys.executable, "-m", "vllm_router.launch_router"], {}
    return None


async def start_backend(h: Harness) -> Endpoint:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.fakevllm", "--port", str(port), "--model", MODEL,
            "--paced-from", str(PACED_TOKENS), "--paced-ms", str(PACED_MS)]  # fmt: skip
    svc = h.spawn(f"fakevllm-{port}", argv)
    await h.wait_ok(f"http://{HOST}:{port}/health", svc, port)
    return Endpoint("backend", svc, port)


async def start_vllm_router(h: Harness, upstream: str) -> Endpoint:
    cmd = vllm_router_command()
    if cmd is None:
        raise Unavailable("vllm-router not installed (pip install vllm-router, or set VLLM_ROUTER_PATH)")
    head, env = cmd
    port, prom = free_port(), free_port()
    argv = [*head, "--host", HOST, "--port", str(port), "--worker-urls", upstream, "--policy", "round_robin",
            "--log-level", "warning", "--prometheus-host", HOST, "--prometheus-port", str(prom)]  # fmt: skip
    svc = h.spawn(f"vllm-router-{port}", argv, env)
    await h.wait_ok(f"http://{HOST}:{port}/health", svc, port, timeout=60)
    return Endpoint("vllm-router", svc, port)


async def start_mvllm_router(h: Harness, upstream: str, *, auth: bool) -> Endpoint:
    doc: dict[str, Any] = {
        "policy": {"type": "least-score"},
        "servers": {"servers": [{"name": "n0", "url": upstream, "max_concurrent_requests": 4096}]},
    }
    if auth:
        # Limits high enough never to bind: what is measured is the cost of checking them.
        doc["auth"] = {
            "keys": [
                {
                    "name": "bench",
                    "key": API_KEY,
                    "limits": {
                        "requests_per_second": 1_000_000,
                        "burst": 1_000_000,
                        "max_concurrent": 4096,
                        "tokens_per_minute": 10**12,
                    },
                }
            ],
            "usage_file": False,
            "limits": {
                "requests_per_second": 1_000_000,
                "burst": 1_000_000,
                "max_concurrent": 4096,
                "tokens_per_minute": 10**12,
            },
        }
    ep = await h.start_router_doc(doc, log_level="warning", name=f"mvllm-router{'-auth' if auth else ''}")
    return Endpoint("mvllm", ep.service, ep.port)


async def start_agent(h: Harness) -> tuple[Endpoint, dict[str, str]]:
    """The agent with two sim engines (instant and paced); returns it and each model's engine URL."""
    base = free_port() % 20000 + 40000
    sim = {"ttft_ms": 0, "prefill_ms_per_token": 0, "batch_slowdown": 0, "weights_gib": 1}
    entry = {"devices": [0], "memory_gib": 8, "max_num_seqs": 1024, "preload": True, "pinned": True}
    settings = {
        "host": HOST,
        "engine": "sim",
        "engine_port_range": [base, base + 200],
        "log_level": "WARNING",
        "sim_gpus": [{"memory_gib": 80}],
    }
    models = {
        "fast": {**entry, "model": "fast", "sim": {**sim, "itl_ms": 0}},
        "paced": {**entry, "model": "paced", "sim": {**sim, "itl_ms": PACED_MS}},
    }
    agent = await h.start_agent("agent", settings, tomli_w.dumps({"models": models}), ready_timeout=60,
                                log_level="WARNING")
    svc = agent.service
    engines: dict[str, str] = {}

    def found() -> bool:
        engines.update(_engine_urls(svc.pid))
        return {"fast", "paced"} <= engines.keys()

    if not await wait_until(found, 60.0, 0.25):
        raise Unavailable(f"agent engines not listening: {engines} {svc.log_tail()}")
    return agent, engines


def _engine_urls(agent_pid: int) -> dict[str, str]:
    """Served name -> URL of each sim engine the agent runs (read from its children's sockets)."""
    out: dict[str, str] = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(agent_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = child.cmdline()
                if "--served-model-name" not in cmd:
                    continue
                name = cmd[cmd.index("--served-model-name") + 1]
                for c in child.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN and c.laddr:
                        out[name] = f"http://{HOST}:{c.laddr.port}"
    return out


async def _ready(session: aiohttp.ClientSession, t: Target) -> None:
    """One successful chat through the target (engines loaded, upstream connections warm)."""
    url = t.url + "/v1/chat/completions"
    body = ChatRequest(t.model, 4, False).body()
    last = ""
    for _ in range(120):
        try:
            async with session.post(
                url, data=body, headers={"content-type": "application/json", **t.headers}
            ) as r:
                await r.read()
                if r.status == 200:
                    return
                last = f"http {r.status}"
        except aiohttp.ClientError as exc:
            last = repr(exc)
        await asyncio.sleep(0.25)
    raise Unavailable(f"{t.name}: no 200 from {url}: {last}")


async def run(ctx: Context) -> ScenarioResult:
    res = ScenarioResult("relay")
    t0 = time.monotonic()
    seconds = ctx.pick(1.5, 4.0)
    paced_seconds = ctx.pick(2.5, 6.0)
    rounds = int(ctx.pick(1, 2))
    with load_generator_cpu():
        async with ctx.harness("relay") as h:
            h.launcher = pinned()  # relays and backend on the relay CPU
            targets = await _start_targets(h, res)
            measured: dict[tuple[str, str], Measured] = {}
            sessions: dict[str, aiohttp.ClientSession] = {}
            try:
                for t in targets:
                    sessions[t.name] = make_session() if not t.headers else _session_with(t.headers)
                for t in targets:
                    await _ready(sessions[t.name], t)
                    for leg in LEGS[:3]:  # warm code paths
                        await closed_loop(
                            sessions[t.name],
                            t.url,
                            ChatRequest(t.model, leg.max_tokens, leg.stream),
                            8,
                            duration=0.3,
                        )
                # Each leg runs in `rounds` slices interleaved with the other targets' slices, so a
                # busy spell of the shared machine spreads over all targets instead of hitting one.
                for rnd in range(rounds):
                    for leg in LEGS:
                        for t in targets:
                            ctx.log(f"relay: round {rnd + 1}/{rounds} {leg.name} {t.name}")
                            await _measure(
                                sessions[t.name],
                                t,
                                leg,
                                measured,
                                (paced_seconds if leg.max_tokens >= PACED_TOKENS else seconds) / rounds,
                            )
            finally:
                for s in sessions.values():
                    await s.close()
    res.rows, res.checks = rows_and_checks(targets, measured)
    res.notes.append(
        f"{seconds:g} s per leg ({paced_seconds:g} s for {PACED_TOKENS} chunks at {PACED_MS:g} ms) in {rounds} interleaved slices, closed loop; "
        f"relay and backend pinned to CPU {RELAY_CPU}, load generator to CPU {LOAD_CPU}; CPU = the relay process's "
        "user+system time over the leg / requests completed; the agent is measured against its own sim engines"
    )
    res.seconds = time.monotonic() - t0
    return res


async def _measure(
    session: aiohttp.ClientSession,
    t: Target,
    leg: LegSpec,
    measured: dict[tuple[str, str], Measured],
    seconds: float,
) -> None:
    """One slice of one leg through one target, added to what earlier slices measured."""
    paced = leg.max_tokens >= PACED_TOKENS
    req = ChatRequest(t.paced_model if paced else t.model, leg.max_tokens, leg.stream)
    url = t.paced_url if t.paced_url and paced else t.url
    cpu0 = cpu_seconds(t.pid, t.children) if t.pid else 0.0
    result = await closed_loop(session, url, req, leg.concurrency, duration=seconds, timeout=30)
    m = measured.setdefault((t.name, leg.name), Measured())
    m.records += result.records
    m.wall += wall_time(result.records)
    if t.pid:
        m.cpu += cpu_seconds(t.pid, t.children) - cpu0


def _session_with(headers: dict[str, str]) -> aiohttp.ClientSession:
    s = make_session()
    s.headers.update(headers)
    return s


async def _start_targets(h: Harness, res: ScenarioResult) -> list[Target]:
    backend = await start_backend(h)
    up = backend.url
    targets = [Target("direct", up, None, False)]
    starters = (
        ("nginx", lambda: h.start_nginx([up]), True, {}),
        ("vllm-router", lambda: start_vllm_router(h, up), True, {}),
        ("mvllm", lambda: start_mvllm_router(h, up, auth=False), False, {}),
        (
            "mvllm+keys",
            lambda: start_mvllm_router(h, up, auth=True),
            False,
            {"authorization": f"Bearer {API_KEY}"},
        ),
    )
    for name, start, children, headers in starters:
        try:
            ep = await start()
            targets.append(Target(name, ep.url, ep.pid, children, headers=headers))
        except Unavailable as exc:
            res.notes.append(f"{name}: skipped ({exc})"[:500])
    try:
        agent, engines = await start_agent(h)
        # Direct to the agent's own engines: the paced model has an engine (and URL) of its own.
        targets.append(
            Target(
                "sim direct",
                engines["fast"],
                None,
                False,
                "fast",
                "paced",
                paced_url=engines["paced"],
                baseline="sim direct",
            )
        )
        targets.append(
            Target("mvllm agent", agent.url, agent.pid, False, "fast", "paced", baseline="sim direct")
        )
    except Unavailable as exc:
        res.notes.append(f"mvllm agent: skipped ({exc})"[:500])
    return targets


def rows_and_checks(
    targets: list[Target], measured: dict[tuple[str, str], Measured]
) -> tuple[list[Row], list[Check]]:
    rows: list[Row] = []
    stats = {k: m.stats() for k, m in measured.items()}
    for leg in LEGS:
        for t in targets:
            m = measured.get((t.name, leg.name))
            if m is None:
                continue
            st = stats[(t.name, leg.name)]
            extra: list[str] = []
            base = stats.get((t.baseline, leg.name))
            if t.pid and st.ok:
                per = m.cpu * 1000 / st.ok
                extra.append(f"CPU {per:.3f} ms/req")
                if leg.max_tokens >= PACED_TOKENS:
                    extra.append(f"{per / leg.max_tokens:.4f} ms/chunk")
            if base is not None and t.name != t.baseline:
                if leg.concurrency == 1 and not math.isnan(st.e2e.p50) and not math.isnan(base.e2e.p50):
                    extra.append(f"added p50 {(st.e2e.p50 - base.e2e.p50) * 1000:+.2f} ms")
                if base.throughput:
                    extra.append(f"{st.throughput / base.throughput:.2f}x {t.baseline} req/s")
            if st.requests:
                extra.append(f"goodput {st.ok}/{st.requests}, error rate {st.error_count / st.requests:.1%}")
            if st.errors:
                extra.append("errors " + ", ".join(f"{k}={v}" for k, v in st.errors.items()))
            rows.append(Row.from_stats("relay", f"{t.name} {leg.name}", st, "; ".join(extra)))
    return rows, _checks(targets, measured, stats)


def cpu_per_request(
    measured: dict[tuple[str, str], Measured], stats: dict[tuple[str, str], RunStats], target: str, leg: str
) -> float:
    m, st = measured.get((target, leg)), stats.get((target, leg))
    if m is None or st is None or not st.ok:
        return math.nan
    return m.cpu / st.ok


def _checks(
    targets: list[Target], measured: dict[tuple[str, str], Measured], stats: dict[tuple[str, str], RunStats]
) -> list[Check]:
    checks: list[Check] = []
    names = {t.name for t in targets}

    def cpu(target: str, leg: str) -> float:
        return cpu_per_request(measured, stats, target, leg)

    paced = LEGS[3].name
    if {"mvllm", "vllm-router"} <= names:
        for leg in (LEGS[1].name, LEGS[2].name):
            a, b = cpu("mvllm", leg), cpu("vllm-router", leg)
            checks.append(
                Check(
                    f"router CPU/req <= vllm-router's ({leg})",
                    f"mvllm {a * 1000:.3f} ms, vllm-router {b * 1000:.3f} ms",
                    a <= b,
                )
            )
    if "mvllm" in names:
        per_chunk = cpu("mvllm", paced) / PACED_TOKENS
        checks.append(
            Check(
                "CPU per relayed SSE chunk <= 0.05 ms",
                f"mvllm {per_chunk * 1000:.4f} ms",
                per_chunk <= 0.00005,
            )
        )
        st, d = stats.get(("mvllm", LEGS[0].name)), stats.get(("direct", LEGS[0].name))
        if st and d:
            add = st.e2e.p50 - d.e2e.p50
            checks.append(Check("added p50 at c=1 <= 0.5 ms", f"mvllm {add * 1000:+.2f} ms", add <= 0.0005))
        st, d = stats.get(("mvllm", LEGS[1].name)), stats.get(("direct", LEGS[1].name))
        if st and d and d.throughput:
            r = st.throughput / d.throughput
            checks.append(Check("max throughput >= 0.6x direct (json c=32)", f"mvllm {r:.2f}x", r >= 0.6))
    if {"mvllm", "mvllm agent"} <= names:
        a, b = cpu("mvllm agent", LEGS[2].name), cpu("mvllm", LEGS[2].name)
        checks.append(
            Check(
                "agent relay CPU/req <= router's (stream16 c=32)",
                f"agent {a * 1000:.3f} ms, router {b * 1000:.3f} ms",
                a <= b,
            )
        )
    if {"mvllm", "mvllm+keys"} <= names:
        a, b = cpu("mvllm+keys", LEGS[1].name), cpu("mvllm", LEGS[1].name)
        checks.append(
            Check(
                "keys + limits cost <= +10 % (json c=32)",
                f"{(a / b - 1) * 100:+.0f} % ({a * 1000:.3f} vs {b * 1000:.3f} ms)",
                a <= 1.1 * b,
            )
        )
    return checks
