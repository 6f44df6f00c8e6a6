"""prefix: routing policies on a workload where a prefix-cache miss costs real prefill time.

Four identical sim nodes with prefix caching on and a prefill cost of PREFILL_MS_PER_TOKEN per
prompt token not found in a node's cache (docs/simulator.md: a prompt's blocks become hits only
once its prefill is done, counted as vLLM counts them). Each node's KV pool (and so its prefix
cache, LRU) holds KV_TOKENS: the conversations' prefixes fit in the fleet once, not on every node.

Main leg: 24 multi-turn conversations, each with its own ~2,000-token system prompt, interleaved.
Conversation c starts at a seeded offset and sends its turn k at start_c + k * gap_c (seeded), or
when its previous answer is in, whichever is later; turn k's prompt is the system prompt, the k
earlier user questions with made-up assistant answers, and a new question, so each turn extends
the previous one's prefix. A node that served the conversation before answers from its cache;
any other node prefills ~2,000 tokens (about a second at 0.5 ms a token).

Skewed leg: single-turn requests, SKEW_HOT of them on one hot system prompt and the rest on 8
others, Poisson arrivals at a rate that puts the hot prefix above one node's capacity: a policy
that only follows the prefix would pile it on one node; it must still spread.

Memory leg (with cache-aware): MEMORY_PROMPTS distinct ~1,000-character prompts (100k; 10k
quick), each its own chain of index keys, through a cache-aware router over two fast sims; the
router's RSS after them must stay within its RSS after a warm-up plus max_tree_bytes.

Every policy sees the same seeded arrivals; each node's prefix cache is reset before each leg.
Reported per leg: TTFT mean/p99, the fleet's prefix-cache hit ratio (sum of the sims'
vllm:prefix_cache_hits_total deltas over the sum of their vllm:prefix_cache_queries_total
deltas), and the share of requests per node (from x-mvllm-node).

Run alone: `python -m benchmarks.scenarios.prefix [--quick] [--policies least-score,round-robin]`.
A policy the router refuses (e.g. cache-aware before `[policy] type = "cache-aware"` exists) is
reported as not available and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.harness import (
    Harness,
    SimNode,
    SimSpec,
    Unavailable,
    raise_nofile_limit,
    router_cli_available,
    rss_bytes,
)
from benchmarks.loadgen import make_session, one_request
from benchmarks.report import Check, Row, ScenarioResult, fmt, render_checks, render_table
from benchmarks.scenarios import Context
from benchmarks.stats import RequestRecord, RunStats, poisson_arrivals, ratio, run_stats
from mvllm.common.prom import iter_samples

POLICIES = ("least-score", "round-robin", "cache-aware")
PREFILL_MS_PER_TOKEN = 0.5
# A node's KV pool holds KV_TOKENS: the 24 conversations' prefixes (~55k tokens) fit in the fleet
# once, not on every node, as a real fleet's working set does (a sim's default pool never evicts).
KV_TOKENS = 32768
KV_BYTES_PER_TOKEN = 131072  # the sim's default
NODE = SimSpec(
    max_num_seqs=8, ttft_ms=20, itl_ms=10, prefill_ms_per_token=PREFILL_MS_PER_TOKEN,
    extra=("--kv-cache-memory-bytes", str(KV_TOKENS * KV_BYTES_PER_TOKEN)),
)
NODES = 4
CONVERSATIONS = 24
SYSTEM_WORDS = 2000  # the sim's tokenizer: about one token per short word
MAX_TOKENS = 16
SKEW_MAX_TOKENS = 32
SKEW_HOT = 0.8
SKEW_OTHERS = 8
COUNTERS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
MEMORY_PROMPTS = 100_000
MEMORY_WARMUP = 1_000
MEMORY_TREE_BYTES = 32 * 1024 * 1024  # the default max_tree_bytes
MEMORY_CONCURRENCY = 32
MIB = 1024 * 1024


def words(rng: random.Random, n: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(n))


def system_prompt(key: str) -> str:
    return f"You are assistant {key}. " + words(random.Random(f"system-{key}"), SYSTEM_WORDS)


def conversation_messages(c: int, turn: int) -> list[dict[str, str]]:
    """Turn `turn` (0-based) of conversation `c`: each turn's messages extend the previous turn's."""
    rng = random.Random(f"conv-{c}")
    msgs = [{"role": "system", "content": system_prompt(f"c{c}")}]
    for k in range(turn + 1):
        msgs.append({"role": "user", "content": f"Question {k}: " + words(rng, 30)})
        if k < turn:
            msgs.append({"role": "assistant", "content": words(rng, MAX_TOKENS)})
    return msgs


def chat_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> bytes:
    doc = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
    return json.dumps(doc).encode()


def service_seconds(uncached_tokens: int, max_tokens: int, spec: SimSpec = NODE, batch_slowdown: float = 1.0) -> float:
    """One request's time on a full node, from the sim's timing model (docs/simulator.md)."""
    step = spec.itl_ms * (1 + batch_slowdown * (spec.max_num_seqs - 1) / spec.max_num_seqs)
    return (spec.ttft_ms + spec.prefill_ms_per_token * uncached_tokens + (max_tokens - 1) * step) / 1000.0


@dataclass
class Schedule:
    turns: int
    starts: list[float]
    gaps: list[float]

    @classmethod
    def seeded(cls, turns: int, spread: float, gap: float, seed: int = 13) -> Schedule:
        rng = random.Random(seed)
        return cls(
            turns,
            [rng.uniform(0.0, spread) for _ in range(CONVERSATIONS)],
            [gap * rng.uniform(0.7, 1.3) for _ in range(CONVERSATIONS)],
        )


async def _counters(h: Harness, nodes: Sequence[SimNode]) -> tuple[float, float]:
    hits = queries = 0.0
    for n in nodes:
        _, body = await h.get(f"{n.url}/metrics")
        for s in iter_samples(body.decode(), COUNTERS):
            if s.name == COUNTERS[0]:
                hits += s.value
            else:
                queries += s.value
    return hits, queries


async def _reset_caches(h: Harness, nodes: Sequence[SimNode]) -> None:
    for n in nodes:
        status, body = await h.post_json(f"{n.url}/reset_prefix_cache", {})
        if status != 200:
            raise RuntimeError(f"POST /reset_prefix_cache on {n.url} answered {status}: {body[:200]!r}")


async def conversations(url: str, model: str, sched: Schedule, timeout: float) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    t0 = time.monotonic()

    async def one(c: int) -> None:
        for k in range(sched.turns):
            delay = t0 + sched.starts[c] + k * sched.gaps[c] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            body = chat_body(model, conversation_messages(c, k), MAX_TOKENS)
            await one_request(session, url + "/v1/chat/completions", body, True, records, timeout=timeout)

    async with make_session() as session:
        await asyncio.gather(*(one(c) for c in range(CONVERSATIONS)))
    return records


async def skewed(url: str, model: str, rate: float, duration: float, timeout: float, seed: int = 7) -> list[RequestRecord]:
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rate, duration, iter(rng.random, None))
    hot = system_prompt("hot")
    others = [system_prompt(f"other{i}") for i in range(SKEW_OTHERS)]
    bodies = []
    for i in range(len(arrivals)):
        system = hot if rng.random() < SKEW_HOT else rng.choice(others)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"Request {i}: " + words(rng, 30)}]
        bodies.append(chat_body(model, msgs, SKEW_MAX_TOKENS))
    records: list[RequestRecord] = []
    t0 = time.monotonic()
    async with make_session() as session:
        tasks = []
        for at, body in zip(arrivals, bodies, strict=True):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(
                one_request(session, url + "/v1/chat/completions", body, True, records, timeout=timeout)))
        await asyncio.gather(*tasks)
    return records


@dataclass
class Memory:
    prompts: int
    baseline: int  # router RSS after the warm-up (bytes)
    final: int  # ... and after every prompt
    index_bytes: float  # mvllm_prefix_index_bytes at the end
    failures: int
    seconds: float

    @property
    def growth(self) -> int:
        return self.final - self.baseline


async def _distinct_prompts(url: str, model: str, first: int, count: int, timeout: float) -> int:
    """`count` completions, each prompt distinct from its first characters on; returns failures."""
    filler = words(random.Random("memory"), 160)  # ~1,000 characters after the distinct head
    failures = 0
    it = iter(range(first, first + count))

    async def worker() -> None:
        nonlocal failures
        for i in it:
            body = json.dumps({"model": model, "prompt": f"distinct prompt {i}: {filler}", "max_tokens": 1}).encode()
            records: list[RequestRecord] = []
            await one_request(session, url + "/v1/completions", body, False, records, timeout=timeout)
            failures += sum(1 for r in records if r.error)

    async with make_session() as session:
        await asyncio.gather(*(worker() for _ in range(MEMORY_CONCURRENCY)))
    return failures


async def memory_leg(ctx: Context, h: Harness, prompts: int) -> Memory:
    fast = await h.start_sims([SimSpec(max_num_seqs=256)] * 2)
    rt = await h.start_router([(f"m{i}", n.url, 256) for i, n in enumerate(fast)], policy="cache-aware",
                              policy_keys={"max_tree_bytes": MEMORY_TREE_BYTES})
    t0 = time.monotonic()
    try:
        failures = await _distinct_prompts(rt.url, fast[0].model, 0, MEMORY_WARMUP, 30.0)
        baseline = rss_bytes(rt.pid)
        ctx.log(f"prefix: memory, {prompts} distinct prompts (router RSS {baseline / MIB:.0f} MiB after warm-up)")
        failures += await _distinct_prompts(rt.url, fast[0].model, MEMORY_WARMUP, prompts, 30.0)
        final = rss_bytes(rt.pid)
        _, body = await h.get(f"{rt.url}/metrics")
        index_bytes = next((x.value for x in iter_samples(body.decode(), ["mvllm_prefix_index_bytes"])), math.nan)
    finally:
        await h.stop(rt.service)
    return Memory(prompts, baseline, final, index_bytes, failures, time.monotonic() - t0)


@dataclass
class Leg:
    stats: RunStats
    hit_ratio: float

    def max_share(self) -> float:
        return max(self.stats.per_node.values(), default=0) / max(1, self.stats.ok)


def _row(case: str, leg: Leg) -> Row:
    st = leg.stats
    share = ", ".join(f"{k} {v * 100 / max(1, st.ok):.0f}%" for k, v in st.per_node.items())
    extra = f"TTFT mean {fmt(st.ttft.mean * 1000, 0)} ms; prefix hit ratio {leg.hit_ratio:.2f}; share {share}"
    if st.errors:
        extra += "; errors " + ", ".join(f"{k}={v}" for k, v in st.errors.items())
    return Row.from_stats("prefix", case, st, extra)


async def run(ctx: Context, policies: Sequence[str] = POLICIES) -> ScenarioResult:
    res = ScenarioResult("prefix")
    t0 = time.monotonic()
    sched = Schedule.seeded(turns=int(ctx.pick(3, 6)), spread=ctx.pick(2.0, 4.0), gap=ctx.pick(1.5, 2.5))
    hot_service = service_seconds(64, SKEW_MAX_TOKENS)
    node_rps = NODE.max_num_seqs / hot_service
    skew_rate = 1.5 * node_rps / SKEW_HOT  # the hot prefix alone at 1.5x one node's capacity
    skew_s = ctx.pick(5.0, 15.0)
    timeout = ctx.pick(30.0, 60.0)
    legs: dict[tuple[str, str], Leg] = {}
    if not ctx.router_ok:
        res.notes.append(f"router not available: {ctx.router_reason}")
    async with ctx.harness("prefix") as h:
        nodes = await h.start_sims([NODE] * NODES, env={"VLLM_SERVER_DEV_MODE": "1"})
        targets = [(f"n{i}", n.url, n.max_num_seqs) for i, n in enumerate(nodes)]
        for policy in policies if ctx.router_ok else ():
            try:
                rt = await h.start_router(targets, policy=policy)
            except Unavailable as exc:
                res.notes.append(f"{policy}: router refused it ({exc})"[:400])
                continue
            for leg_name in ("conversations", "skewed"):
                await h.wait_idle(nodes)
                await _reset_caches(h, nodes)
                before = await _counters(h, nodes)
                ctx.log(f"prefix: {policy} {leg_name}")
                if leg_name == "conversations":
                    records = await conversations(rt.url, nodes[0].model, sched, timeout)
                else:
                    records = await skewed(rt.url, nodes[0].model, skew_rate, skew_s, timeout)
                await h.wait_idle(nodes)
                after = await _counters(h, nodes)
                hits, queries = after[0] - before[0], after[1] - before[1]
                leg = Leg(run_stats(records), hits / queries if queries else math.nan)
                legs[(policy, leg_name)] = leg
                res.rows.append(_row(f"{policy} {leg_name}", leg))
            await h.stop(rt.service)
        memory = None
        if ctx.router_ok and "cache-aware" in policies and not any("cache-aware: router refused" in n for n in res.notes):
            memory = await memory_leg(ctx, h, int(ctx.pick(MEMORY_PROMPTS / 10, MEMORY_PROMPTS)))
            res.rows.append(Row("prefix", f"cache-aware memory, {memory.prompts} distinct prompts",
                                reqs=memory.prompts + MEMORY_WARMUP, errors=memory.failures, extra=(
                f"router RSS {memory.baseline / MIB:.1f} MiB after {MEMORY_WARMUP} warm-up prompts, "
                f"{memory.final / MIB:.1f} MiB after (+{memory.growth / MIB:.1f} MiB); "
                f"prefix index {memory.index_bytes / MIB:.1f} MiB counted; max_tree_bytes {MEMORY_TREE_BYTES / MIB:.0f} MiB; "
                f"{memory.failures} failures; {memory.seconds:.0f} s")))
    res.checks.extend(_checks(legs))
    if memory is not None:
        res.checks.append(Check(
            f"memory: router RSS after {memory.prompts} distinct prompts <= warm-up RSS + max_tree_bytes, 0 failures",
            f"+{memory.growth / MIB:.1f} MiB of {MEMORY_TREE_BYTES / MIB:.0f} MiB, {memory.failures} failures",
            memory.growth <= MEMORY_TREE_BYTES and memory.failures == 0,
        ))
    res.notes.append(
        f"{NODES} sim nodes: max_num_seqs {NODE.max_num_seqs}, ttft {NODE.ttft_ms:g} ms, itl {NODE.itl_ms:g} ms, "
        f"KV pool {KV_TOKENS} tokens, "
        f"{PREFILL_MS_PER_TOKEN:g} ms per uncached prompt token, prefix caching on; conversations: "
        f"{CONVERSATIONS} x {sched.turns} turns, ~{SYSTEM_WORDS}-token system prompts, max_tokens {MAX_TOKENS}; "
        f"skewed: {skew_rate:.1f} req/s for {skew_s:g} s, {SKEW_HOT:.0%} on one prefix (one node serves "
        f"~{node_rps:.1f} req/s of it), max_tokens {SKEW_MAX_TOKENS}"
    )
    res.seconds = time.monotonic() - t0
    return res


def _checks(legs: dict[tuple[str, str], Leg]) -> list[Check]:
    checks: list[Check] = []
    ca, ls = legs.get(("cache-aware", "conversations")), legs.get(("least-score", "conversations"))
    name = "conversations: cache-aware TTFT mean <= 0.6x least-score, hit ratio >= 1.5x, no node > 40 %"
    if ca is None or ls is None:
        checks.append(Check(name, "cache-aware or least-score leg missing", None))
    else:
        t, hr = ratio(ca.stats.ttft.mean, ls.stats.ttft.mean), ratio(ca.hit_ratio, ls.hit_ratio)
        checks.append(Check(
            name,
            f"TTFT x{fmt(t, 2)}, hit ratio x{fmt(hr, 2)}, busiest node {ca.max_share():.0%}",
            None if math.isnan(t) or math.isnan(hr) else t <= 0.6 and hr >= 1.5 and ca.max_share() <= 0.4,
        ))
    sk = legs.get(("cache-aware", "skewed"))
    name = "skewed: cache-aware no node > 60 %, 0 failures"
    if sk is None:
        checks.append(Check(name, "cache-aware leg missing", None))
    else:
        checks.append(Check(name, f"busiest node {sk.max_share():.0%}, {sk.stats.error_count} failures",
                            sk.max_share() <= 0.6 and sk.stats.error_count == 0))
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scenarios.prefix", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short legs (under a minute for two policies)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated router policy types")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args(argv)
    raise_nofile_limit()
    ok, reason = router_cli_available()
    ctx = Context(quick=args.quick, keep_logs=args.keep_logs, router_ok=ok, router_reason=reason)
    policies = [s.strip() for s in args.policies.split(",") if s.strip()]
    res = asyncio.run(run(ctx, policies))
    print(render_table(res.rows))
    print(render_checks(res.checks))
    for note in res.notes:
        print(f"- {note}")
    print(f"({res.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
