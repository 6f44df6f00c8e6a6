"""failover: under steady streaming load on three nodes, one node is SIGKILLed and, later, another
starts answering every request with a 500 (`POST /sim/fault`). What does the client see?

Run through the router (default retry and breaker settings) and, for reference, through nginx
with `proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent` and its
default passive checks (max_fails=1, fail_timeout=10s). Streams cut by the kill cannot be retried
by anyone (their first bytes already reached the client), so some errors at the kill are expected;
what matters is how many more follow, and whether the 500s ever reach the client.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from benchmarks.harness import Endpoint, Harness, SimSpec, Unavailable
from benchmarks.loadgen import ChatRequest, closed_loop, make_session
from benchmarks.report import Check, Row, ScenarioResult
from benchmarks.scenarios import Context
from benchmarks.stats import RequestRecord, records_between, run_stats

SPEC = SimSpec(max_num_seqs=64, ttft_ms=10, itl_ms=10)
CONCURRENCY = 16
MAX_TOKENS = 16
KILL_AT, FAULT_AT = 0.3, 0.55  # fractions of the leg's duration


def _router_counters(text: str) -> dict[str, float]:
    from mvllm.common.prom import iter_samples

    want = (
        "mvllm_retries_total",
        "mvllm_node_failures_total",
        "mvllm_stream_errors_total",
        "mvllm_node_sent_after_failure_total",
    )
    out: Counter[str] = Counter()
    for s in iter_samples(text, want):
        key = s.name.removesuffix("_total").removeprefix("mvllm_")
        if s.name == "mvllm_node_failures_total":
            key += f"[{s.labels.get('node', '?')}:{s.labels.get('kind', '?')}]"
        elif s.name == "mvllm_node_sent_after_failure_total":
            if not s.value:
                continue
            key += f"[{s.labels.get('node', '?')}]"
        out[key] += s.value
    return dict(out)


def _ejection_check(counters: dict[str, float], cost: str | None) -> Check:
    target = "node answering 500s (health 200) ejected after at most two requests (DESIGN §3)"
    if cost is None:
        return Check(target, "n1 gave no 500 (fault not reached?)", None)
    after = counters.get("node_sent_after_failure[n1]", 0.0)
    return Check(target, cost, after <= 1)


def ejection_cost(counters: dict[str, float], node: str = "n1") -> str | None:
    """How many requests reached the node answering 500s: the 500s it gave (node_failures[n1:500]),
    split into the first, those already in flight when the router saw the first (sent before it),
    and those sent after it, before its breaker opened (node_sent_after_failure[n1]). DESIGN §3:
    at most two requests, i.e. at most one sent after the first failure."""
    failed = counters.get(f"node_failures[{node}:500]")
    if not failed:
        return None
    after = counters.get(f"node_sent_after_failure[{node}]", 0.0)
    in_flight = max(0.0, failed - 1 - after)
    return (
        f"{node} gave {failed:g} 500s: the first, {in_flight:g} already in flight then, "
        f"{after:g} sent after it before its breaker opened"
    )


async def _leg(ctx: Context, h: Harness, proxy: str, duration: float) -> tuple[list[RequestRecord], dict[str, float], float, float]:
    nodes = await h.start_sims([SPEC, SPEC, SPEC])
    ep: Endpoint
    if proxy == "router":
        ep = await h.start_router([(f"n{i}", n.url, n.max_num_seqs) for i, n in enumerate(nodes)])
    else:
        ep = await h.start_nginx([n.url for n in nodes], next_upstream=True)
    req = ChatRequest(nodes[0].model, MAX_TOKENS, True)
    async with make_session() as session:
        await closed_loop(session, ep.url, req, 4, duration=0.5)  # warm-up, not counted
        start = time.monotonic()
        load = asyncio.ensure_future(closed_loop(session, ep.url, req, CONCURRENCY, duration=duration))
        await asyncio.sleep(duration * KILL_AT)
        t_kill = time.monotonic()
        ctx.log(f"failover/{proxy}: SIGKILL n0")
        await nodes[0].service.kill()
        await asyncio.sleep(duration * (FAULT_AT - KILL_AT))
        t_fault = time.monotonic()
        ctx.log(f"failover/{proxy}: n1 answers 500")
        await h.set_fault(nodes[1], "500", 1.0)
        result = await load
    counters: dict[str, float] = {}
    if proxy == "router":
        try:
            _, body = await h.get(f"{ep.url}/metrics")
            counters = _router_counters(body.decode(errors="replace"))
        except Exception as exc:  # observability only: the leg's numbers stand without it
            counters = {f"/metrics failed: {type(exc).__name__}": 0}
    await h.stop_all()
    return result.records, counters, t_kill - start, t_fault - start


async def run(ctx: Context) -> ScenarioResult:
    res = ScenarioResult("failover")
    t0 = time.monotonic()
    duration = ctx.pick(6.0, 15.0)
    proxies = ["router"] if ctx.router_ok else []
    if not ctx.router_ok:
        res.notes.append(f"router not available: {ctx.router_reason}")
    proxies.append("nginx")
    async with ctx.harness("failover") as h:
        for proxy in proxies:
            ctx.log(f"failover: {proxy}")
            try:
                records, counters, kill_s, fault_s = await _leg(ctx, h, proxy, duration)
            except Unavailable as exc:
                await h.stop_all()
                res.notes.append(f"{proxy} leg skipped: {exc}"[:700])
                continue
            st = run_stats(records)
            first = min((r.start for r in records), default=0.0)
            windows = (
                ("before kill", first, first + kill_s),
                ("kill→500s", first + kill_s, first + fault_s),
                ("after 500s", first + fault_s, float("inf")),
            )
            parts = []
            for label, a, b in windows:
                # By end time: an error counts in the window where the client saw it.
                w = run_stats(records_between(records, a, b, by_end=True))
                kinds = ",".join(f"{k}={v}" for k, v in w.errors.items()) or "0"
                parts.append(f"{label}: {w.requests} ended, errors {kinds}")
            late = run_stats(records_between(records, first + fault_s, float("inf")))
            if set(late.per_node) - {"?"}:
                parts.append("served after 500s: " + ", ".join(f"{k} {v}" for k, v in late.per_node.items()))
            if counters:
                cost = ejection_cost(counters)
                if cost:
                    parts.append(cost)
                if proxy == "router":
                    res.checks.append(_ejection_check(counters, cost))
                parts.append("router " + ", ".join(f"{k}={v:g}" for k, v in sorted(counters.items())))
            res.rows.append(Row.from_stats("failover", f"{proxy} kill+500", st, "; ".join(parts)))
    res.notes.append(
        f"{duration:g} s closed loop, {CONCURRENCY} streams at a time, max_tokens {MAX_TOKENS}, three nodes "
        f"(max_num_seqs {SPEC.max_num_seqs}, ttft {SPEC.ttft_ms:g} ms, itl {SPEC.itl_ms:g} ms); "
        f"n0 SIGKILLed at {KILL_AT:.0%}, n1 set to 500s at {FAULT_AT:.0%} of the leg"
    )
    res.seconds = time.monotonic() - t0
    return res
