"""Limits against the real router and simulated engines on 127.0.0.1: a key over its limit gets 429
with Retry-After and the limit named while other keys are unaffected; concurrency slots come back
when a request ends or its client leaves; tokens per minute are settled from the usage the engine
reports (streamed too); global limits with the wait queue; counters in /metrics and /load-stats."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI

from mvllm.common.prom import iter_samples
from tests.integration.security_support import (
    MSG,
    OTHER_KEY,
    USER_KEY,
    auth_router,
    in_process_sims,
    key_entry,
    quick_sim,
)
from tests.support import node, wait_until_async

THIRD_KEY = "sk-test-third-0123456789abcdef"


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in iter_samples(text, [name]) if all(s.labels.get(k) == v for k, v in labels.items()))


async def test_a_key_over_its_limit_gets_429_with_retry_after_and_others_are_unaffected(
    tmp_path: Path, oai: Any
) -> None:
    keys = [
        key_entry("slow", USER_KEY, limits={"requests_per_second": 0.2, "burst": 2}),
        key_entry("free", OTHER_KEY),
        key_entry("capped", THIRD_KEY, quota={"requests_total": 1}),
    ]
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r:
        slow, free, capped = oai(r.url, USER_KEY), oai(r.url, OTHER_KEY), oai(r.url, THIRD_KEY)

        async def call(c: AsyncOpenAI) -> Any:
            try:
                return await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
            except openai.RateLimitError as exc:
                return exc

        results = await asyncio.gather(*(call(slow) for _ in range(5)), *(call(free) for _ in range(5)))
        slow_results, free_results = results[:5], results[5:]
        limited = [x for x in slow_results if isinstance(x, openai.RateLimitError)]
        assert len(limited) == 3  # a burst of 2, then 1 per 5 s
        for exc in limited:
            assert int(exc.response.headers["Retry-After"]) >= 1
            err = exc.body
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "rate_limit_error"
            assert "'requests_per_second' of key 'slow'" in err["message"]
        assert all(not isinstance(x, Exception) for x in free_results)  # the other key is unaffected

        # A used-up total quota: 429 insufficient_quota, without Retry-After (no wait helps).
        assert not isinstance(await call(capped), Exception)
        exc = await call(capped)
        assert isinstance(exc, openai.RateLimitError) and exc.body["code"] == "insufficient_quota"
        assert "Retry-After" not in exc.response.headers

        text = r.state.metrics.render().decode()
        assert metric(text, "mvllm_rate_limited_total", key="slow", limit="requests_per_second", scope="key") == 3
        assert metric(text, "mvllm_rate_limited_total", key="capped", limit="requests_total", scope="key") == 1
        assert metric(text, "mvllm_key_requests_total", key="free") == 5
        # Nothing limited reached the engine: 2 + 5 + 1 answered.
        async with aiohttp.ClientSession() as s, s.get(sim.url + "/metrics") as resp:
            engine = await resp.text()
        assert metric(engine, "http_requests_total", handler="/v1/chat/completions") == 8


async def test_concurrency_slots_come_back_when_a_request_ends_or_its_client_leaves(tmp_path: Path, oai: Any) -> None:
    keys = [key_entry("one", USER_KEY, limits={"max_concurrent": 1})]
    async with (
        in_process_sims(quick_sim(itl_ms=10.0)) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r,
    ):
        c = oai(r.url, USER_KEY)
        in_flight = lambda: r.state.gate.limits.counters().get("one", {}).get("in_flight")  # noqa: E731
        stream = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=60, stream=True)
        assert in_flight() == 1
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
        assert "'max_concurrent' of key 'one'" in info.value.body["message"]
        assert info.value.response.headers["Retry-After"] == "1"
        text = r.state.metrics.render().decode()
        assert metric(text, "mvllm_key_in_flight", key="one") == 1
        chunks = [ch async for ch in stream]
        assert len(chunks) > 30
        await wait_until_async(lambda: in_flight() == 0, timeout=5, what="slot released after the stream")
        assert (await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)).choices

        # A client that leaves mid-stream gives its slot back too.
        stream = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=500, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await wait_until_async(lambda: in_flight() == 0, timeout=5, what="slot released after the client left")
        assert (await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)).choices


async def test_tokens_per_minute_settle_from_the_reported_usage(tmp_path: Path, oai: Any) -> None:
    keys = [
        key_entry("counted", USER_KEY, limits={"tokens_per_minute": 100000}),
        key_entry("tight", OTHER_KEY, limits={"tokens_per_minute": 100}),
    ]
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r:
        window = lambda name: r.state.gate.limits.counters()[name]["tokens_in_window"]  # noqa: E731
        c = oai(r.url, USER_KEY)
        out = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=10)
        assert out.usage is not None
        used = out.usage.total_tokens
        assert window("counted") == used  # settled from the body's usage (the estimate was 2 + 10)

        # A stream whose client asked for usage: settled from the final usage chunk.
        stream = await c.chat.completions.create(
            model="sim-model", messages=MSG, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
        usages = [ch.usage for ch in [ch async for ch in stream] if ch.usage is not None]
        assert len(usages) == 1
        used += usages[0].total_tokens
        await wait_until_async(lambda: window("counted") == used, timeout=5, what="stream settled from its usage")

        # A stream without usage: its up-front estimate (prompt 'hello' ~2 + max_tokens 10) stays charged.
        stream = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=10, stream=True)
        assert [ch async for ch in stream]
        await wait_until_async(lambda: window("counted") == used + 12, timeout=5, what="estimate kept")
        counters = r.state.gate.limits.counters()["counted"]
        assert counters["tokens_reported"] == used  # only what the engine reported

        # The tight key: 2 x ~48 tokens fit in 100, the third does not; 429 names the limit.
        t = oai(r.url, OTHER_KEY)
        for _ in range(2):
            assert (await t.chat.completions.create(model="sim-model", messages=MSG, max_tokens=40)).choices
        with pytest.raises(openai.RateLimitError) as info:
            await t.chat.completions.create(model="sim-model", messages=MSG, max_tokens=40)
        assert "'tokens_per_minute' of key 'tight'" in info.value.body["message"]
        assert 1 <= int(info.value.response.headers["Retry-After"]) <= 61
        text = r.state.metrics.render().decode()
        assert metric(text, "mvllm_key_tokens_total", key="counted") == used
        assert metric(text, "mvllm_key_tokens_in_window", key="tight") == window("tight")
        assert (await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)).choices


async def test_global_limits_with_the_wait_queue(tmp_path: Path, oai: Any) -> None:
    # No keys: the global limits still apply. Two at a time; the others wait up to 5 s.
    auth = {"limits": {"max_concurrent": 2, "queue_timeout": 5.0, "max_queued": 10}}
    async with (
        in_process_sims(quick_sim(itl_ms=5.0)) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], auth=auth) as r,
        aiohttp.ClientSession() as s,
    ):
        c = oai(r.url)
        peak = 0
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                async with s.get(sim.url + "/sim/state") as resp:
                    peak = max(peak, (await resp.json())["running"])
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        t0 = time.monotonic()
        outs = await asyncio.gather(
            *(c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20) for _ in range(6))
        )
        elapsed = time.monotonic() - t0
        done.set()
        await watcher
        assert all(o.choices for o in outs)  # all waited their turn, none got 429
        assert 1 <= peak <= 2
        assert elapsed > 0.25  # three waves of ~100 ms, not one
        text = r.state.metrics.render().decode()
        assert metric(text, "mvllm_rate_limited_total") == 0
        assert metric(text, "mvllm_limit_in_flight") == 0

    # Without a queue the overflow is answered at once: 429 naming the global limit, key "-".
    auth = {"limits": {"requests_per_second": 0.5, "burst": 1}}
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")], auth=auth) as r:
        c = oai(r.url)
        assert (await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)).choices
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=2)
        assert "of the router (global)" in info.value.body["message"]
        text = r.state.metrics.render().decode()
        assert metric(text, "mvllm_rate_limited_total", key="-", limit="requests_per_second", scope="global") == 1
