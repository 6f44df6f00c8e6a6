"""Cache-aware routing through the real router and in-process sims (real sockets): multi-turn
conversations stick to the node that holds their prefix, one hot prefix above a node's capacity
still spreads, every answer (streamed or not, any policy) says why in x-mvllm-route, the
decisions are counted, and a node drained or removed loses its index entries."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path

import aiohttp

from mvllm.common.prom import iter_samples
from mvllm.router.prefix_index import prompt_text
from tests.integration.router_support import router_for
from tests.support import node, wait_until_async, write_servers

MODEL = "sim-model"
ROUTE = re.compile(
    r"^policy=(?P<policy>least-score|round-robin|cache-aware); reason=(?P<reason>[a-z_]+); "
    r"score=(\d+\.\d{3}|inf); runner_up=(-|[\w.-]+:(\d+\.\d{3}|inf)); action=(none|wake|load|evict)$"
)


def system(c: int) -> str:
    return f"You are assistant number {c}. " + " ".join(f"rule{c}-{i}" for i in range(300))


def turn_messages(c: int, k: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system(c)}]
    for i in range(k + 1):
        msgs.append({"role": "user", "content": f"question {i} of conversation {c}"})
        if i < k:
            msgs.append({"role": "assistant", "content": f"answer {i}"})
    return msgs


async def chat(s: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], *, stream: bool = False,
               max_tokens: int = 4) -> tuple[str, str]:
    """(x-mvllm-node, x-mvllm-route) of one answered chat request."""
    doc = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    async with s.post(url + "/v1/chat/completions", json=doc) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
        if stream:
            assert b"data: [DONE]" in body
        else:
            assert json.loads(body)["choices"]
        route = resp.headers["x-mvllm-route"]
        assert ROUTE.match(route), route
        return resp.headers["x-mvllm-node"], route


def reason(route: str) -> str:
    m = ROUTE.match(route)
    assert m is not None
    return m["reason"]


async def decisions(s: aiohttp.ClientSession, url: str) -> dict[tuple[str, str], float]:
    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    return {
        (x.labels["policy"], x.labels["reason"]): x.value
        for x in iter_samples(text, ["mvllm_route_decisions_total"])
    }


async def gauge(s: aiohttp.ClientSession, url: str, name: str) -> float:
    async with s.get(url + "/metrics") as resp:
        text = await resp.text()
    return next(x.value for x in iter_samples(text, [name]))


async def test_conversations_stick_to_their_node_and_every_answer_explains_itself(tmp_path: Path, sim_factory) -> None:
    # Room for all six at once on any node (score 6/32 < balance_abs_threshold): affinity always holds.
    sims = [await sim_factory(max_num_seqs=32) for _ in range(3)]
    nodes = [node(s.url, f"n{i}", max_concurrent_requests=32) for i, s in enumerate(sims)]
    async with router_for(tmp_path, nodes, policy={"type": "cache-aware"}) as r, aiohttp.ClientSession() as s:
        homes: dict[int, set[str]] = {c: set() for c in range(6)}
        reasons: Counter[str] = Counter()
        for k in range(4):
            # Turn k of every conversation, alternately streamed and not, the conversations interleaved.
            answers = await asyncio.gather(
                *(chat(s, r.url, turn_messages(c, k), stream=(c + k) % 2 == 0) for c in range(6))
            )
            for c, (name, route) in enumerate(answers):
                homes[c].add(name)
                reasons[reason(route)] += 1
                if k > 0:
                    assert reason(route) == "prefix_hit", (c, k, route)
        assert all(len(h) == 1 for h in homes.values()), homes  # each conversation stayed on one node
        assert len(set().union(*homes.values())) >= 2  # and new conversations spread over the idle nodes
        assert reasons == {"prefix_miss": 6, "prefix_hit": 18}
        counted = await decisions(s, r.url)
        assert counted[("cache-aware", "prefix_hit")] == 18 and counted[("cache-aware", "prefix_miss")] == 6
        assert await gauge(s, r.url, "mvllm_prefix_index_bytes") == r.state.prefix_index.size_bytes > 0
        # The sims' own prefix-cache counters, scraped: most prompt tokens were hits (turns 1-3).
        await wait_until_async(
            lambda: all((n.prefix_hit_ratio or 0) > 0.5 for n in r.state.registry.nodes() if n.prefix_queries),
            5, what="prefix hits scraped",
        )
        async with s.get(r.url + "/load-stats") as resp:
            stats = await resp.json()
        assert stats["router"]["policy"] == "cache-aware" and stats["router"]["prefix_index_bytes"] > 0
        for entry in stats["nodes"]:  # the sims' own KV-cache numbers, per node
            assert 0.0 <= entry["kv_cache_usage"] <= 1.0, entry
        assert any((e["prefix_hit_ratio"] or 0) > 0.5 for e in stats["nodes"]), [
            (e["name"], e["prefix_hit_ratio"]) for e in stats["nodes"]
        ]
        # A prompt with no text (token ids) is routed by load, and says so.
        async with s.post(r.url + "/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}) as resp:
            assert resp.status == 200 and reason(resp.headers["x-mvllm-route"]) == "no_prompt"


async def test_a_hot_prefix_above_one_nodes_capacity_spreads(tmp_path: Path, sim_factory) -> None:
    sims = [await sim_factory(max_num_seqs=4, itl_ms=20.0) for _ in range(3)]
    nodes = [node(sm.url, f"n{i}", max_concurrent_requests=4) for i, sm in enumerate(sims)]
    async with router_for(tmp_path, nodes, policy={"type": "cache-aware"}) as r, aiohttp.ClientSession() as s:
        await chat(s, r.url, turn_messages(0, 0))  # the prefix is on one node now
        answers = await asyncio.gather(
            *(chat(s, r.url, [*turn_messages(0, 0), {"role": "user", "content": f"more {i}"}], max_tokens=20, stream=True)
              for i in range(12))
        )
        share = Counter(name for name, _ in answers)
        reasons = Counter(reason(route) for _, route in answers)
        assert len(share) == 3 and max(share.values()) <= 6, share  # 12 at once: no node takes them all
        # Diverted once per extra node; from then on the prefix is on that node too and sticks there.
        assert reasons["imbalanced"] >= 2 and reasons["prefix_hit"] >= 1, reasons
        assert set(r.state.prefix_index.match(MODEL, prompt_of(0))) == {"n0", "n1", "n2"}


async def test_least_score_and_round_robin_explain_their_choices(tmp_path: Path, sim_factory) -> None:
    sims = [await sim_factory() for _ in range(2)]
    nodes = [node(sm.url, f"n{i}") for i, sm in enumerate(sims)]
    async with router_for(tmp_path, nodes) as r, aiohttp.ClientSession() as s:
        for stream in (False, True):
            name, route = await chat(s, r.url, turn_messages(0, 0), stream=stream)
            assert route.startswith("policy=least-score; reason=idle; score=0.000; runner_up=n")
            assert route.endswith("action=none") and f"runner_up={name}:" not in route
        assert (await decisions(s, r.url))[("least-score", "idle")] == 2
    async with router_for(tmp_path, nodes, policy={"type": "round-robin"}) as r, aiohttp.ClientSession() as s:
        got = [await chat(s, r.url, turn_messages(0, 0), stream=i % 2 == 1) for i in range(4)]
        assert [n for n, _ in got] in (["n0", "n1", "n0", "n1"], ["n1", "n0", "n1", "n0"])
        assert all(reason(route) == "rotation" for _, route in got)
        assert (await decisions(s, r.url))[("round-robin", "rotation")] == 4
    async with router_for(tmp_path, nodes[:1]) as r, aiohttp.ClientSession() as s:
        _, route = await chat(s, r.url, turn_messages(0, 0))
        assert reason(route) == "only_candidate" and "runner_up=-;" in route


async def test_drained_and_removed_nodes_lose_their_entries(tmp_path: Path, sim_factory) -> None:
    sims = [await sim_factory() for _ in range(3)]
    nodes = [node(sm.url, f"n{i}") for i, sm in enumerate(sims)]
    async with router_for(tmp_path, nodes, watch=True, policy={"type": "cache-aware"}) as r, aiohttp.ClientSession() as s:
        index = r.state.prefix_index
        held: dict[str, int] = {}
        c = 0
        while len(held) < 3 and c < 30:  # conversations until every node holds one
            name, _ = await chat(s, r.url, turn_messages(c, 0))
            held.setdefault(name, c)
            c += 1
        assert len(held) == 3, held

        def holders(conv: int) -> set[str]:
            return set(index.match(MODEL, prompt_of(conv)))

        assert all(holders(conv) == {name} for name, conv in held.items())
        async with s.post(r.url + "/admin/nodes/n0/drain") as resp:
            assert resp.status == 200, await resp.text()
        assert holders(held["n0"]) == set()  # drained: its prefixes are forgotten at once
        _, route = await chat(s, r.url, turn_messages(held["n0"], 1))
        assert reason(route) == "prefix_miss"  # nowhere to stick to now
        write_servers(tmp_path / "servers.toml", [nodes[0], nodes[2]], policy={"type": "cache-aware"})  # n1 leaves
        await wait_until_async(lambda: r.state.registry.get("n1") is None, 10, what="n1 removed by the reload")
        assert holders(held["n1"]) == set() and holders(held["n2"]) == {"n2"}


def prompt_of(c: int) -> str:
    """The text the router indexes for turn 0 of conversation c (prefix_index.prompt_text)."""
    text = prompt_text({"messages": turn_messages(c, 0)}, "/v1/chat/completions")
    assert text is not None
    return text


async def test_a_retry_chooses_again_and_the_answer_explains_the_attempt_that_answered(tmp_path: Path, sim_factory) -> None:
    bad, good = await sim_factory(fail_rate=1.0, fail_kind="500"), await sim_factory()
    nodes = [node(bad.url, "bad"), node(good.url, "good")]
    async with router_for(tmp_path, nodes, policy={"type": "cache-aware"}, failure_threshold=100) as r, \
            aiohttp.ClientSession() as s:
        # Give the failing node the prefix, so affinity sends the first attempt there.
        r.state.prefix_index.insert(MODEL, "bad", prompt_of(0), time.monotonic())
        name, route = await chat(s, r.url, turn_messages(0, 0))
        assert name == "good" and reason(route) in ("prefix_miss", "idle", "only_candidate"), route
        assert "runner_up=-" in route  # the retry's only candidate left: the failed node is excluded
        counted = await decisions(s, r.url)
        assert counted[("cache-aware", "prefix_hit")] == 1  # the first attempt, on "bad"
        assert sum(counted.values()) == 2
