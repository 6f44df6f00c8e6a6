"""Failures of real `mvllm sim` engines behind the router: killed before answering, killed
mid-stream, hanging, answering 500 while /health says 200, and coming back."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from mvllm.router.app import RunningRouter
from tests.integration.router_support import MODEL, QUICK_SIM, client, engines, node_state, router_for, sims
from tests.procs import free_port, run_sim
from tests.support import node, wait_until_async

MSG = [{"role": "user", "content": "hello"}]


def failures(r: RunningRouter, name: str) -> float:
    """Failures the router held against node `name` (any kind), from its own /metrics."""
    total = 0.0
    for line in r.state.metrics.render().decode().splitlines():
        if line.startswith('mvllm_node_failures_total{kind="') and f'node="{name}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def set_fault(url: str, kind: str, rate: float) -> None:
    async with aiohttp.ClientSession() as s, s.post(url + "/sim/fault", json={"kind": kind, "rate": rate}) as resp:
        assert resp.status == 200, await resp.text()


async def test_node_killed_before_answering_costs_the_client_nothing(tmp_path: Path) -> None:
    with sims(tmp_path, [], []) as (a, b):
        # Health checks far apart: only the requests themselves can find out that a died.
        async with router_for(tmp_path, [node(a.url, "a"), node(b.url, "b")], health_check_interval=60) as r:
            c = client(r)
            await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
            a.proc.kill()
            nodes = []
            for _ in range(20):
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
                nodes.append(raw.headers["x-mvllm-node"])
            assert set(nodes) == {"b"}
            assert 1 <= failures(r, "a") <= 2  # ejected after at most two failed attempts
            assert node_state(r, "a")["breaker"] == "open"


async def test_node_killed_mid_stream_ends_with_a_clean_sse_error(tmp_path: Path) -> None:
    with sims(tmp_path, ["--sim-itl-ms", "50"]) as (a,):
        async with router_for(tmp_path, [node(a.url, "a")]) as r:
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=200, stream=True)
            received = 0

            async def consume() -> None:
                nonlocal received
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        received += 1
                        if received == 3:
                            a.proc.kill()

            t0 = time.monotonic()
            with pytest.raises(openai.APIError) as info:
                await asyncio.wait_for(consume(), timeout=10)  # a hang would fail here, not pass
            assert time.monotonic() - t0 < 5
            assert "failed mid-stream" in str(info.value.message)
            assert received >= 3
            assert failures(r, "a") >= 1


async def test_stream_whose_node_dies_before_its_first_chunk_moves_on(tmp_path: Path) -> None:
    # The engine sends its SSE headers at once and the first chunk only with the first token
    # (3 s here): the router holds the headers back, so the client never learns of the dead node.
    with sims(tmp_path, ["--sim-ttft-ms", "3000"], []) as (slow, ok):
        nodes = [node(slow.url, "slow", weight=1000.0), node(ok.url, "ok")]
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            c = client(r)
            pending = asyncio.ensure_future(
                c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=5, stream=True)
            )
            await wait_until_async(lambda: node_state(r, "slow")["in_flight"] == 1, what="stream waiting on slow")
            await asyncio.sleep(0.2)  # its headers are in; its first token is seconds away
            slow.proc.kill()
            raw = await asyncio.wait_for(pending, timeout=10)
            assert raw.headers["x-mvllm-node"] == "ok"
            text = "".join([ch.choices[0].delta.content or "" async for ch in raw.parse() if ch.choices])
            assert text
            assert failures(r, "slow") == 1


async def test_midstream_fault_fails_over_when_nothing_was_sent(tmp_path: Path) -> None:
    async with engines(["--sim-fail-kind", "midstream", "--sim-fail-rate", "1"], []) as (bad, good):
        # The bad node's weight makes it the first choice of almost every request.
        nodes = [node(bad.url, "bad", weight=100.0), node(good.url, "good")]
        async with router_for(tmp_path, nodes, failure_threshold=100) as r:
            c = client(r)
            # Non-streamed: the cut body never reached the client, so it is retried elsewhere.
            for _ in range(6):
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=8)
                assert raw.headers["x-mvllm-node"] == "good"
            assert failures(r, "bad") >= 1
        async with router_for(tmp_path, nodes[:1], failure_threshold=100) as r:
            # Streamed: the client already has chunks, so it gets a clean error event, not a hang.
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, stream=True)
            chunks = 0

            async def consume() -> None:
                nonlocal chunks
                async for _chunk in stream:
                    chunks += 1

            with pytest.raises(openai.APIError) as info:
                await asyncio.wait_for(consume(), timeout=10)
            assert chunks >= 1
            assert "failed mid-stream" in info.value.message


async def test_hung_node_times_out_and_fails_over(tmp_path: Path) -> None:
    async with engines(["--sim-fail-kind", "hang", "--sim-fail-rate", "1"], []) as (hung, ok):
        async with (
            router_for(
                tmp_path,
                # Capacity 1 for "ok": one request running on it (sent straight to the engine, below)
                # scores it 1.0, not idle, so the idle hung node is chosen first, not at random.
                [node(hung.url, "hung"), node(ok.url, "ok", max_concurrent_requests=1)],
                first_byte_timeout=1.0,
                health_check_interval=60,
            ) as r,
            aiohttp.ClientSession() as session,
            session.post(
                ok.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 4000, "stream": True}
            ) as busy,
        ):
            assert busy.status == 200
            await wait_until_async(lambda: node_state(r, "ok")["running"] >= 1, timeout=10, what="ok node looks busy")
            c = client(r)
            took: list[float] = []
            for stream in (False, True, False, True, False, False):
                t0 = time.monotonic()
                if stream:
                    s = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, stream=True)
                    assert [ch async for ch in s]
                else:
                    out = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3)
                    assert out.choices[0].message.content
                took.append(time.monotonic() - t0)
            assert all(t < 5 for t in took), took
            # The first two went to the hung node, waited out first_byte_timeout and failed over to
            # "ok"; two failures (failure_threshold) opened its breaker, so no later request waited.
            assert took[0] >= 1.0 and took[1] >= 1.0, took
            assert failures(r, "hung") == 2
            assert node_state(r, "hung")["breaker"] == "open"


async def test_node_answering_500_is_ejected_within_two_requests_then_readmitted(tmp_path: Path) -> None:
    async with engines([], []) as (sick, well):
        async with router_for(
            tmp_path, [node(sick.url, "sick"), node(well.url, "well")], breaker_cooldown=1.0, health_check_interval=0.2
        ) as r:
            await set_fault(sick.url, "500", 1.0)
            c = client(r)
            for _ in range(12):
                out = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
                assert out.choices[0].message.content
            # /health of the sick node says 200 all along; the breaker alone took it out.
            st = node_state(r, "sick")
            assert st["health"] == "up"
            assert failures(r, "sick") <= 2
            assert st["breaker"] in ("open", "half-open")

            await set_fault(sick.url, "500", 0.0)  # healed: a probe after the cool-down re-admits it

            async def readmitted() -> bool:
                await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
                return node_state(r, "sick")["breaker"] == "closed"

            await wait_until_async(readmitted, timeout=10, interval=0.1, what="sick node re-admitted")
            seen = set()
            for _ in range(20):
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=1)
                seen.add(raw.headers["x-mvllm-node"])
            assert seen == {"sick", "well"}


async def test_503_and_reset_faults_are_retried(tmp_path: Path) -> None:
    async with engines(["--sim-fail-kind", "503", "--sim-fail-rate", "1"],
                       ["--sim-fail-kind", "reset", "--sim-fail-rate", "1"], []) as (busy, reset, ok):
        nodes = [node(busy.url, "busy"), node(reset.url, "reset"), node(ok.url, "ok")]
        async with router_for(tmp_path, nodes, failure_threshold=1000) as r:
            c = client(r)
            for _ in range(10):
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=2)
                assert raw.headers["x-mvllm-node"] == "ok"
            assert failures(r, "busy") >= 1 and failures(r, "reset") >= 1
            # With only the failing nodes left, the last node answer comes back as is.
        async with router_for(tmp_path, nodes[:1]) as r:
            with pytest.raises(openai.InternalServerError) as info:
                await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2)
            assert info.value.status_code == 503
            assert info.value.response.headers["x-mvllm-node"] == "busy"


async def test_node_down_at_start_joins_when_it_comes_up(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Discovery is slow on purpose: the node must be picked up by its recovery, not by the timer.
    async with router_for(tmp_path, [node(url, "late")], models_refresh_interval=600,
                          health_check_consecutive_failures=1) as r:
        await wait_until_async(lambda: node_state(r, "late")["health"] == "down", what="late seen down")
        with pytest.raises(openai.NotFoundError):  # no model known yet
            await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
        with run_sim(tmp_path, MODEL, QUICK_SIM, port=port):
            await wait_until_async(lambda: r.state.registry.nodes_for(MODEL), timeout=10, what="late's models discovered")
            out = await client(r).chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
            assert out.choices[0].message.content
            assert node_state(r, "late")["health"] == "up"
