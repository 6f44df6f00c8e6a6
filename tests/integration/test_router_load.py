"""Routing under load with real `mvllm sim` engines: the scraped load steers requests, a burst
between scrapes spreads, and a node killed during a few hundred requests costs no client an error
unless its stream had already started."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import openai
from openai import AsyncOpenAI

from tests.integration.router_support import MODEL, client, engines, node_state, router_for, sims
from tests.support import node, wait_until_async

MSG = [{"role": "user", "content": "hello"}]


async def test_routing_follows_the_scraped_load(tmp_path: Path) -> None:
    slow = ["--sim-itl-ms", "100", "--max-num-seqs", "4"]
    async with engines(slow, slow) as (a, b):
        nodes = [node(a.url, "a", max_concurrent_requests=4), node(b.url, "b", max_concurrent_requests=4)]
        async with router_for(tmp_path, nodes) as r:
            # Load a directly, behind the router's back: only its /metrics can tell.
            direct = AsyncOpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0)
            busy = [
                asyncio.ensure_future(direct.chat.completions.create(model=MODEL, messages=MSG, max_tokens=60))
                for _ in range(4)
            ]
            try:
                await wait_until_async(lambda: node_state(r, "a")["running"] >= 3, timeout=10, what="a's load scraped")
                c = client(r)
                seen = Counter()
                for _ in range(10):
                    raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=1)
                    seen[raw.headers["x-mvllm-node"]] += 1
                assert seen == {"b": 10}
            finally:
                for t in busy:
                    t.cancel()
                await asyncio.gather(*busy, return_exceptions=True)
                await direct.close()


async def test_a_burst_between_scrapes_spreads(tmp_path: Path) -> None:
    slow = ["--sim-itl-ms", "100", "--max-num-seqs", "8"]
    async with engines(slow, slow) as (a, b):
        nodes = [node(a.url, "a", max_concurrent_requests=4), node(b.url, "b", max_concurrent_requests=4)]
        # No scrape during the burst: only the router's own in-flight count can spread it. Eight
        # requests over two nodes of capacity 4 end up exactly 4 + 4 when each one sent raises its
        # node's score at once (a blind random choice would give 4 + 4 only 27% of the time).
        async with router_for(tmp_path, nodes, scrape_interval=600) as r:
            c = client(r)
            for _burst in range(2):
                streams = await asyncio.gather(
                    *(c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=20, stream=True)
                      for _ in range(8))
                )
                placed = Counter(s.headers["x-mvllm-node"] for s in streams)
                for s in streams:
                    await s.parse().close()
                assert placed == {"a": 4, "b": 4}
                await wait_until_async(lambda: node_state(r, "a")["in_flight"] + node_state(r, "b")["in_flight"] == 0,
                                 timeout=10, what="burst drained")


async def test_node_killed_during_load_fails_no_request_that_had_not_started_streaming(tmp_path: Path) -> None:
    with sims(tmp_path, [], [], []) as (a, b, victim):
        nodes = [node(a.url, "a"), node(b.url, "b"), node(victim.url, "victim")]
        async with router_for(tmp_path, nodes, health_check_interval=0.5) as r:
            c = client(r)
            total, concurrency = 300, 24
            done = 0
            outcomes: Counter[str] = Counter()
            broken_after_chunks: list[int] = []
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(total):
                queue.put_nowait(i)

            async def one(i: int) -> None:
                nonlocal done
                if i % 3 == 0:  # a third streamed
                    chunks = 0
                    stream = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, stream=True)
                    try:
                        async for _ in stream:
                            chunks += 1
                        outcomes["stream ok"] += 1
                    except openai.APIError:
                        # Allowed only for a stream that had already begun when its node died.
                        broken_after_chunks.append(chunks)
                        outcomes["stream broken"] += 1
                else:
                    out = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16)
                    assert out.choices[0].message.content
                    outcomes["ok"] += 1
                done += 1

            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await one(i)

            async def killer() -> None:
                await wait_until_async(lambda: done >= total // 3, timeout=60, interval=0.01)
                await wait_until_async(lambda: node_state(r, "victim")["in_flight"] > 0, timeout=10, interval=0.002)
                victim.proc.kill()

            kill = asyncio.ensure_future(killer())
            try:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                await kill
            finally:
                kill.cancel()
                with contextlib.suppress(asyncio.CancelledError, AssertionError):
                    await kill
            assert victim.proc.popen is not None and victim.proc.popen.poll() is not None  # it did die mid-load
            assert outcomes["ok"] == total - total // 3  # every non-streamed request answered
            assert outcomes["stream ok"] + outcomes["stream broken"] == total // 3
            assert all(n >= 1 for n in broken_after_chunks)  # errors only after the stream began
            assert node_state(r, "victim")["healthy"] is False
