"""balancing: least-score vs round-robin on four heterogeneous nodes at 75 % and 95 % of capacity.

Capacity of a node = max_num_seqs / service time of one request when the node is full, where the
sim's timing model (docs/simulator.md) gives
    service = ttft + prefill_ms_per_token * prompt_tokens + (max_tokens - 1) * step
    step    = itl * (1 + batch_slowdown * (max_num_seqs - 1) / max_num_seqs)
Total capacity is the sum over nodes. A short calibration (each node alone, closed loop at its
max_num_seqs, all at once) measures it too; the offered rates are fractions of the measured total
(the model's figure is printed beside it). Open-loop Poisson arrivals, one seed per load level, so
both policies see the same arrival times.
"""

from __future__ import annotations

import asyncio
import math
import time

from benchmarks.harness import SimNode, SimSpec, Unavailable
from benchmarks.loadgen import ChatRequest, closed_loop, make_session, open_loop
from benchmarks.report import Check, Row, ScenarioResult, fmt
from benchmarks.scenarios import Context
from benchmarks.stats import RunStats, ratio

MAX_TOKENS = 16
PROMPT = "Tell me about load balancing."  # a few tokens: prefill cost is negligible here
BATCH_SLOWDOWN = 1.0
# Big-and-slow to small-and-fast: about 34, 26, 14 and 25 requests/s (see model_capacity).
NODES = (
    SimSpec(max_num_seqs=16, ttft_ms=30, itl_ms=15, extra=("--sim-batch-slowdown", str(BATCH_SLOWDOWN))),
    SimSpec(max_num_seqs=8, ttft_ms=30, itl_ms=10, extra=("--sim-batch-slowdown", str(BATCH_SLOWDOWN))),
    SimSpec(max_num_seqs=4, ttft_ms=30, itl_ms=10, extra=("--sim-batch-slowdown", str(BATCH_SLOWDOWN))),
    SimSpec(max_num_seqs=4, ttft_ms=30, itl_ms=5, extra=("--sim-batch-slowdown", str(BATCH_SLOWDOWN))),
)
LEVELS = (0.75, 0.95)
POLICIES = ("least-score", "round-robin")


def model_capacity(spec: SimSpec, max_tokens: int = MAX_TOKENS, prompt_tokens: int = 16) -> float:
    """Requests/s a sim node completes when full, from the sim's timing model (see module doc)."""
    step = spec.itl_ms * (1 + BATCH_SLOWDOWN * (spec.max_num_seqs - 1) / spec.max_num_seqs)
    service_ms = spec.ttft_ms + spec.prefill_ms_per_token * prompt_tokens + (max_tokens - 1) * step
    return spec.max_num_seqs / (service_ms / 1000.0)


async def _calibrate(nodes: list[SimNode], seconds: float) -> list[float]:
    req = ChatRequest(nodes[0].model, MAX_TOKENS, True, PROMPT)
    async with make_session() as session:
        results = await asyncio.gather(
            *(closed_loop(session, n.url, req, n.max_num_seqs, duration=seconds) for n in nodes)
        )
    return [r.stats().throughput for r in results]


async def run(ctx: Context) -> ScenarioResult:
    res = ScenarioResult("balancing")
    t0 = time.monotonic()
    duration = ctx.pick(6.0, 20.0)
    if not ctx.router_ok:
        res.notes.append(f"router not available: {ctx.router_reason}")
    async with ctx.harness("balancing") as h:
        nodes = await h.start_sims(list(NODES))
        modelled = [model_capacity(s) for s in NODES]
        measured = await _calibrate(nodes, ctx.pick(2.0, 4.0))
        total = sum(measured)
        res.rows.append(
            Row(
                "balancing",
                "capacity",
                rps=total,
                extra="measured (model) req/s: "
                + ", ".join(f"n{i} {m:.1f} ({c:.1f})" for i, (m, c) in enumerate(zip(measured, modelled, strict=True)))
                + f"; total model {sum(modelled):.1f}",
            )
        )
        await h.wait_idle(nodes, interval=0.2)
        stats: dict[tuple[str, float], RunStats] = {}
        for level in LEVELS:
            rate = level * total
            for policy in POLICIES if ctx.router_ok else ():
                ctx.log(f"balancing: {policy} at {level:.0%} ({rate:.1f} req/s)")
                try:
                    rt = await h.start_router(
                        [(f"n{i}", n.url, n.max_num_seqs) for i, n in enumerate(nodes)], policy=policy
                    )
                except Unavailable as exc:
                    res.notes.append(f"router not available: {exc}"[:700])
                    break
                req = ChatRequest(nodes[0].model, MAX_TOKENS, True, PROMPT)
                async with make_session() as session:
                    result = await open_loop(
                        session, rt.url, req, rate, duration, seed=int(level * 100), drain_timeout=ctx.pick(10, 20)
                    )
                await h.stop(rt.service)
                st = result.stats()
                stats[(policy, level)] = st
                share = ", ".join(f"{k} {v * 100 / max(1, st.ok):.0f}%" for k, v in st.per_node.items())
                extra = f"offered {rate:.1f} req/s ({result.offered} reqs); share {share}"
                if st.errors:
                    extra += "; errors " + ", ".join(f"{k}={v}" for k, v in st.errors.items())
                res.rows.append(Row.from_stats("balancing", f"{policy} {level:.0%}", st, extra))
                await h.wait_idle(nodes, interval=0.2)
    res.checks.append(_check(stats))
    res.notes.append(
        f"{duration:g} s of Poisson arrivals per leg, streaming, max_tokens {MAX_TOKENS}; nodes "
        + "; ".join(f"n{i}: max_num_seqs {s.max_num_seqs}, ttft {s.ttft_ms:g} ms, itl {s.itl_ms:g} ms" for i, s in enumerate(NODES))
    )
    res.seconds = time.monotonic() - t0
    return res


def _check(stats: dict[tuple[str, float], RunStats]) -> Check:
    name = "p99 TTFT at 95 %: least-score <= 0.5x round-robin"
    ls, rr = stats.get(("least-score", 0.95)), stats.get(("round-robin", 0.95))
    if ls is None or rr is None:
        return Check(name, "router legs missing", None)
    r = ratio(ls.ttft.p99, rr.ttft.p99)
    return Check(
        name,
        f"least-score {ls.ttft.p99 * 1000:.0f} ms, round-robin {rr.ttft.p99 * 1000:.0f} ms (x{fmt(r, 2)})",
        None if math.isnan(r) else r <= 0.5,
    )
