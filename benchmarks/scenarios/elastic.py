"""elastic: the fleet follows demand (issue 12). Three `mvllm agent`s (engine = "sim"), one simulated
24 GiB GPU each, three models of 15 GiB (one copy per GPU: the spike's second copy of a model
needs a GPU that another model holds), the router with `[autoscale]` on.

Legs, one after the other on the same fleet:
  spike   ≈ 2.5x one replica's capacity on m-a (closed loop, 2.5 * max_num_seqs streams); the other
          two models idle, so an agent can evict one for the second replica of m-a.
  lull    one stream on m-a: the autoscaler releases the extra replica (back to min_replicas).
  switch  steady traffic on m-a and m-c, then requests for m-b, whose GPU another model may hold
          now; what today's agent does (the fair max_switch_wait is another change) is reported.
Reported: goodput and error rate per leg, TTFT p50/p99 before and after the second replica was
ready, time to the second replica, time back to one, and the GPU serving fraction (share of
GPU-seconds with a request in flight on that GPU, rather than loading or idle), sampled from the
router's /admin/models every 0.25 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness import Endpoint, Harness, Unavailable
from benchmarks.loadgen import ChatRequest, closed_loop, make_session
from benchmarks.report import Check, Row, ScenarioResult
from benchmarks.scenarios import Context
from benchmarks.stats import RequestRecord, records_between, run_stats

TOKEN = "bench-elastic-token"
MODELS = ("m-a", "m-b", "m-c")
MAX_NUM_SEQS = 8
SPIKE_STREAMS = 20  # 2.5 x max_num_seqs
MAX_TOKENS = 32
LOAD_S = 2.0  # sim startup: what a cold load costs
IDLE_S = 5.0  # the agents' idle_timeout (sleep); unload after twice that
SIM = f"sim = {{ ttft_ms = 20, itl_ms = 15, weights_gib = 2, startup_s = {LOAD_S:g} }}"
AUTOSCALE = {
    "enabled": True,
    "min_replicas": 1,
    "max_replicas": 3,
    "scale_up_score": 0.8,
    "scale_up_after": 2.0,
    "scale_down_score": 0.3,
    "scale_down_after": 4.0,
}


def catalog(preload: str) -> str:
    out = []
    for m in MODELS:
        out.append(
            f'[models.{m}]\nmodel = "org/{m}"\nmemory_gib = 15\nmax_num_seqs = {MAX_NUM_SEQS}\n'
            f"idle_timeout = {IDLE_S:g}\nunload_timeout = {2 * IDLE_S:g}\n{SIM}\n" + ("preload = true\n" if m == preload else "")
        )
    return "\n".join(out)


AGENT = {
    "token": TOKEN,
    "engine": "sim",
    "poll_interval": 0.2,
    "restart_backoff": 0.2,
    "stop_timeout": 5,
    "gpu_memory_reserve_gib": 1.0,
    "load_timeout": 30,
    "sim_gpus": [{"memory_gib": 24}],
}


@dataclass
class Sampler:
    """/admin/models every `interval` s: per agent serving / loading / idle, replicas of m-a."""

    url: str
    interval: float = 0.25
    samples: list[tuple[float, dict[str, str], int]] = field(default_factory=list)  # (t, agent -> state, m-a replicas)

    async def run(self, h: Harness, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                _, raw = await h.get(f"{self.url}/admin/models", timeout=1.0)
                doc = json.loads(raw)
            except Exception:  # a missed sample is only a missed sample
                doc = None
            if doc is not None:
                per_agent: dict[str, str] = {}
                replicas = 0
                for m in doc.get("models", []):
                    for r in m.get("replicas", []):
                        st = r.get("state")
                        rank = "serving" if st in ("awake", "draining") and r.get("in_flight") else "loading" if st == "loading" else "idle"
                        prev = per_agent.get(r["agent"], "idle")
                        per_agent[r["agent"]] = min(prev, rank, key=("serving", "loading", "idle").index)
                    if m.get("model") == "m-a":
                        replicas = m["counts"]["awake"]
                self.samples.append((t, per_agent, replicas))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t)))

    def first(self, t0: float, pred: Any) -> float | None:
        return next((t for t, _, n in self.samples if t >= t0 and pred(n)), None)

    def fractions(self, t0: float, t1: float, agents: list[str]) -> Counter[str]:
        c: Counter[str] = Counter()
        for t, per_agent, _ in self.samples:
            if t0 <= t < t1:
                for a in agents:
                    c[per_agent.get(a, "idle")] += 1
        return c


def _ttft(records: list[RequestRecord]) -> str:
    st = run_stats(records)
    if not st.ok:
        return "no successful request"
    return f"{st.ttft.p50 * 1000:.0f}/{st.ttft.p99 * 1000:.0f} ms"


async def _fleet(ctx: Context, h: Harness) -> tuple[Endpoint, list[str]]:
    names = ["a", "b", "c"]
    agents = await asyncio.gather(*(h.start_agent(n, AGENT, catalog(m)) for n, m in zip(names, MODELS, strict=True)))
    doc = {
        "config": {"scrape_interval": 0.25, "health_check_interval": 0.5, "request_timeout": 120.0},
        "agents": [{"name": n, "url": e.url, "token": TOKEN, "load_timeout": 30} for n, e in zip(names, agents, strict=True)],
        "autoscale": AUTOSCALE,
    }
    router = await h.start_router_doc(doc)
    # Every preload done (a model still starting cannot be evicted) and m-a awake, as the router
    # sees it; the idle others may be asleep already.
    deadline = time.monotonic() + 30
    counts: dict[str, dict[str, int]] = {}
    while time.monotonic() < deadline:
        _, raw = await h.get(f"{router.url}/admin/models")
        counts = {m["model"]: m["counts"] for m in json.loads(raw)["models"]}
        done = all(m in counts and counts[m]["loading"] == 0 and counts[m]["awake"] + counts[m]["sleeping"] for m in MODELS)
        if done and counts["m-a"]["awake"] == 1:
            return router, names
        await asyncio.sleep(0.2)
    raise Unavailable(f"m-a (preloaded) did not come up within 30 s: {counts}")


async def run(ctx: Context) -> ScenarioResult:
    res = ScenarioResult("elastic")
    t_start = time.monotonic()
    if not ctx.router_ok:
        res.notes.append(f"router not available: {ctx.router_reason}")
        return res
    spike_s, lull_s, switch_s = ctx.pick(20.0, 40.0), ctx.pick(12.0, 20.0), ctx.pick(12.0, 25.0)
    async with ctx.harness("elastic") as h:
        router, agents = await _fleet(ctx, h)
        sampler = Sampler(router.url)
        stop = asyncio.Event()
        sampling = asyncio.ensure_future(sampler.run(h, stop))
        req = {m: ChatRequest(m, MAX_TOKENS, True) for m in MODELS}
        async with make_session() as session:
            ctx.log(f"elastic: spike, {SPIKE_STREAMS} streams on m-a for {spike_s:g} s")
            t_spike = time.monotonic()
            wall_spike = time.time()  # the events carry wall-clock times
            spike = await closed_loop(session, router.url, req["m-a"], SPIKE_STREAMS, duration=spike_s)
            t_lull = time.monotonic()
            ctx.log(f"elastic: lull, 1 stream on m-a for {lull_s:g} s")
            lull = await closed_loop(session, router.url, req["m-a"], 1, duration=lull_s)
            t_switch = time.monotonic()
            ctx.log(f"elastic: switch, m-a and m-c steady (4 streams each), then m-b for {switch_s:g} s")
            steady = [
                asyncio.ensure_future(closed_loop(session, router.url, req[m], 4, duration=switch_s)) for m in ("m-a", "m-c")
            ]
            await asyncio.sleep(1.0)
            t_b = time.monotonic()
            switch_b = await closed_loop(session, router.url, req["m-b"], 2, duration=switch_s - 1.0, timeout=60.0)
            steady_done = await asyncio.gather(*steady)
            t_end = time.monotonic()
        stop.set()
        await sampling
        _, raw = await h.get(f"{router.url}/admin/events?limit=1000")
        scale_events = [e for e in json.loads(raw)["events"] if e["message"].startswith("autoscale:")]
        events = [e["message"] for e in scale_events]
        first_up = next((e["time"] - wall_spike for e in scale_events if e["message"].startswith("autoscale: scale up m-a:")), None)

    # -- spike: TTFT before and after the second replica -------------------------------------------
    ready = sampler.first(t_spike, lambda n: n >= 2)
    back = sampler.first(t_lull, lambda n: n <= 1) if ready is not None else None
    st = run_stats(spike.records)
    if ready is not None:
        before = records_between(spike.records, t_spike, ready)
        after = records_between(spike.records, ready + 1.0, t_lull)
        decided = f"decided at {first_up:.1f} s, " if first_up is not None else ""
        extra = (
            f"second replica ready {ready - t_spike:.1f} s after the spike began ({decided}scale_up_after "
            f"{AUTOSCALE['scale_up_after']:g} s; sim startup {LOAD_S:g} s + process start); ttft p50/p99 before {_ttft(before)}, "
            f"after {_ttft(after)}; most replicas {max(n for _, _, n in sampler.samples)}"
        )
        b, a = run_stats(before), run_stats(after)
        if b.ok and a.ok:
            res.checks.append(
                Check("median TTFT after scale-up <= half of before (issue 12)",
                      f"{a.ttft.p50 * 1000:.0f} ms vs {b.ttft.p50 * 1000:.0f} ms", a.ttft.p50 <= b.ttft.p50 / 2)
            )
        if first_up is not None:
            # The policy's part: the load itself (engine process start + sim startup) is the agent's.
            res.checks.append(
                Check("scale-up decided within scale_up_after (+ 1 s of scrapes and ticks)",
                      f"decided {first_up:.1f} s into the spike, ready {ready - t_spike - first_up:.1f} s later (the load)",
                      first_up <= AUTOSCALE["scale_up_after"] + 1.0)
            )
    else:
        extra = "no second replica during the spike"
    res.checks.append(Check("0 failed requests in the spike", f"{st.error_count} of {st.requests}", st.error_count == 0))
    res.rows.append(Row.from_stats("elastic", "spike m-a x2.5", st, f"{extra}; served by {st.per_node}"))

    lst = run_stats(lull.records)
    lull_note = f"back to 1 replica {back - t_lull:.1f} s into the lull" if back is not None else "still >1 replica at the end of the lull"
    res.rows.append(Row.from_stats("elastic", "lull m-a x1", lst, f"{lull_note}; served by {lst.per_node}"))
    res.checks.append(Check("after the lull, replicas fall back to min_replicas", lull_note, back is not None))

    # -- switch ---------------------------------------------------------------------------------------
    bst = run_stats(switch_b.records)
    first_ok = min((r.end for r in switch_b.records if r.ok), default=None)
    first_note = f"first m-b answer {first_ok - t_b:.1f} s after its first request" if first_ok else "no m-b answer"
    errs = ",".join(f"{k}={v}" for k, v in bst.errors.items()) or "0"
    res.rows.append(Row.from_stats("elastic", "switch m-b", bst, f"{first_note}; errors {errs}; served by {bst.per_node}"))
    for m, result in zip(("m-a", "m-c"), steady_done, strict=True):
        s = run_stats(result.records)
        errs = ",".join(f"{k}={v}" for k, v in s.errors.items()) or "0"
        res.rows.append(Row.from_stats("elastic", f"switch steady {m}", s, f"errors {errs}; served by {s.per_node}"))

    # -- GPU serving fraction ---------------------------------------------------------------------------
    parts = []
    for label, a, b in (("spike", t_spike, t_lull), ("lull", t_lull, t_switch), ("switch", t_switch, t_end), ("all", t_spike, t_end)):
        c = sampler.fractions(a, b, agents)
        total = sum(c.values()) or 1
        parts.append(f"{label} {c['serving'] / total:.0%} serving, {c['loading'] / total:.0%} loading")
    res.rows.append(Row("elastic", "GPU serving fraction", extra="; ".join(parts)))
    all_records = [*spike.records, *lull.records, *switch_b.records, *(r for x in steady_done for r in x.records)]
    total = run_stats(all_records)
    res.notes.append(
        f"goodput {total.ok} of {total.requests} requests ({total.error_count / max(1, total.requests):.1%} errors); "
        f"3 agents x one 24 GiB sim GPU, 3 models of 15 GiB (max_num_seqs {MAX_NUM_SEQS}, load {LOAD_S:g} s, "
        f"idle_timeout {IDLE_S:g} s), [autoscale] {AUTOSCALE}; autoscale events: " + " | ".join(events)[:1500]
    )
    res.seconds = time.monotonic() - t_start
    return res
