"""Engines that accept and never answer (`--sim-fail-kind hang`) behind the real router: a request
that times out is retried once, not on every node (the second timeout is the request's fault), and
a hanging node under concurrent load costs a bounded number of timed-out requests before ejection."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.integration.router_support import MODEL, engines, node_state, router_for
from tests.integration.test_router_failover import failures, set_fault
from tests.support import node

MSG = [{"role": "user", "content": "hello"}]
HANG = ["--sim-fail-kind", "hang", "--sim-fail-rate", "1"]


async def test_a_timeout_is_retried_once_and_the_second_one_spares_its_node(tmp_path: Path) -> None:
    async with engines(HANG, HANG, HANG) as (h1, h2, h3):
        nodes = [node(h1.url, "h1"), node(h2.url, "h2"), node(h3.url, "h3")]
        async with (
            router_for(tmp_path, nodes, first_byte_timeout=1.0, health_check_interval=60, max_retries=3) as r,
            aiohttp.ClientSession() as s,
        ):
            t0 = time.monotonic()
            async with s.post(r.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG}) as resp:
                took = time.monotonic() - t0
                assert resp.status == 504, await resp.text()
                err = (await resp.json())["error"]
            # Two nodes tried (one retry after the first timeout), not all three.
            assert 2.0 <= took < 2.9, took
            tried = err["message"].split("tried ")[1].split(";")[0].split(", ")
            assert len(tried) == 2, err
            counted = {n: failures(r, n) for n in ("h1", "h2", "h3")}
            # The first node's timeout counts; the one that followed the request to a second node does not.
            assert sorted(counted.values()) == [0, 0, 1], counted
            assert all(node_state(r, n)["breaker"] == "closed" for n in ("h1", "h2", "h3"))


async def test_a_node_that_starts_hanging_under_load_costs_at_most_three_requests(tmp_path: Path) -> None:
    async with engines([], []) as (sick, ok):
        async with (
            router_for(
                tmp_path,
                [node(sick.url, "sick"), node(ok.url, "ok")],
                first_byte_timeout=1.0,
                health_check_interval=60,
                scrape_interval=0.1,
                breaker_cooldown=60,
            ) as r,
            aiohttp.ClientSession() as s,
        ):
            slow: list[float] = []
            served: dict[str, int] = {}

            async def one() -> None:
                t0 = time.monotonic()
                async with s.post(r.url + "/v1/chat/completions", json={"model": MODEL, "messages": MSG, "max_tokens": 2}) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                    served[resp.headers["x-mvllm-node"]] = served.get(resp.headers["x-mvllm-node"], 0) + 1
                took = time.monotonic() - t0
                if took >= 0.9:
                    slow.append(took)

            async def client(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    await one()
                    await asyncio.sleep(0.01)

            load = asyncio.gather(*(client(3.5) for _ in range(4)))
            await asyncio.sleep(0.5)
            assert served.get("sick") and served.get("ok")  # both nodes served at first
            await set_fault(sick.url, "hang", 1.0)  # from now on it accepts and never answers
            await load
            assert node_state(r, "sick")["breaker"] == "open"
            # Every request was served; the ones that met the hanging node waited out the timeout.
            # failure_threshold (2) of those open the breaker, and at most one more was sent to it.
            assert 2 <= len(slow) <= 3, (len(slow), slow)
            assert failures(r, "sick") <= 3
