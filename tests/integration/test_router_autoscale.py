"""Autoscale through the router: real `mvllm agent` processes (engine = "sim", simulated GPUs), the
router in this process with `[autoscale]` on and short timers.

Covers: a load spike on a model awake on one agent brings a second replica (a cold load on
another agent) that then takes traffic, never more than max_replicas; the lull releases one
again (back to min_replicas), the decisions are events with their reason, /admin/models and
mvllm_model_replicas show the replicas; a released replica gets no new request while its
in-flight stream finishes, and the agent's idle timer then sleeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai

from mvllm.client.fleet import build_fleet
from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from tests.integration.agent_support import TOKEN, Agent, model
from tests.support import wait_until_async, write_servers

# A replica takes 4 requests at a time (max_num_seqs); a request of 20 tokens takes ~0.5 s.
HOT_SIM = "sim = { ttft_ms = 5, itl_ms = 25, weights_gib = 2 }"
AUTOSCALE = {
    "enabled": True,
    "min_replicas": 1,
    "max_replicas": 2,
    "scale_up_score": 0.8,
    "scale_up_after": 1.0,
    "scale_down_score": 0.3,
    "scale_down_after": 1.5,
}


def hot(extra: str = "") -> str:
    return model("hot", f"max_num_seqs = 4\n{extra}", sim=HOT_SIM)


@contextlib.contextmanager
def agents(tmp_path: Path, *catalogs: str) -> Any:
    started: list[Agent] = []
    try:
        for catalog in catalogs:
            started.append(Agent(tmp_path, catalog, sim_gpus=(24,)).start())
        yield started
    finally:
        for a in started:
            a.stop()


@contextlib.asynccontextmanager
async def router_for(tmp_path: Path, named: list[tuple[str, Agent]], **autoscale: Any) -> AsyncIterator[RunningRouter]:
    entries = [{"url": a.url, "name": n, "token": TOKEN, "load_timeout": 30} for n, a in named]
    path = write_servers(tmp_path / "servers.toml", agents=entries, autoscale={**AUTOSCALE, **autoscale}, scrape_timeout=2.0)
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
        yield r


async def get_json(router: RunningRouter, path: str, method: str = "GET") -> Any:
    async with aiohttp.ClientSession() as s, s.request(method, router.url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def replicas(router: RunningRouter, name: str) -> dict[str, Any]:
    doc = await get_json(router, "/admin/models")
    return next(m for m in doc["models"] if m["model"] == name)


async def events(router: RunningRouter) -> list[str]:
    return [e["message"] for e in (await get_json(router, "/admin/events"))["events"]]


def client(router: RunningRouter) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="client-key", max_retries=0, timeout=60)


async def chat(c: openai.AsyncOpenAI, max_tokens: int = 20) -> str:
    raw = await c.chat.completions.with_raw_response.create(
        model="hot", messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens
    )
    assert raw.parse().choices[0].message.content
    return raw.headers.get("x-mvllm-node", "")


async def test_a_spike_adds_a_second_replica_that_takes_traffic_and_the_lull_releases_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mvllm")  # as `mvllm router` logs: the events include INFO
    with agents(tmp_path, hot("preload = true\nidle_timeout = 30"), hot("idle_timeout = 30"), hot("idle_timeout = 30")) as (a, b, cc):
        async with router_for(tmp_path, [("a", a), ("b", b), ("c", cc)]) as router:
            await wait_until_async(lambda: a.inst("hot")["state"] == "ready", 20, what="hot preloaded on a")
            c = client(router)
            nodes: list[tuple[float, str]] = []
            failures: list[BaseException] = []
            active_seen: list[int] = []
            stop = asyncio.Event()

            async def user() -> None:
                while not stop.is_set():
                    try:
                        nodes.append((time.monotonic(), await chat(c)))
                    except Exception as exc:  # every failure is counted and asserted on
                        failures.append(exc)

            # 10 users on a 4-slot replica: 2.5 times its capacity.
            users = [asyncio.create_task(user()) for _ in range(10)]
            t0 = time.monotonic()
            ready_at = None
            try:
                deadline = t0 + 30
                while time.monotonic() < deadline:
                    m = await replicas(router, "hot")
                    active_seen.append(m["counts"]["awake"] + m["counts"]["loading"])
                    if m["counts"]["awake"] == 2 and ready_at is None:
                        ready_at = time.monotonic()
                    if ready_at is not None and time.monotonic() - ready_at > 3:
                        break
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.gather(*users)
            assert ready_at is not None, f"no second replica within 30 s: {m}"
            assert not failures, failures[:3]
            assert max(active_seen) == 2, active_seen  # max_replicas = 2, with a third agent idle
            second = {r["agent"] for r in m["replicas"] if r["state"] == "awake"} - {"a"}
            assert len(second) == 1, m
            (other,) = second
            after = Counter(n for t, n in nodes if t > ready_at + 0.5)
            assert after["a"] >= 5 and after[other] >= 5, after  # both replicas serve once ready
            assert ready_at - t0 < 15, ready_at - t0
            log = await events(router)
            ups = [e for e in log if e.startswith("autoscale: scale up hot")]
            assert len(ups) == 1 and f"load on {other}" in ups[0] and "mean score" in ups[0], ups

            # The lull: one replica released after scale_down_after, back to min_replicas.
            m = await wait_until_async(
                lambda: _counts_are(router, awake=1, draining=1), 10, what="one replica released after the lull"
            )
            downs = [e for e in await events(router) if e.startswith("autoscale: scale down hot")]
            assert len(downs) == 1 and "released replica" in downs[0] and "< 0.3" in downs[0], downs
            released = [r for r in m["replicas"] if r["released"]]
            assert len(released) == 1 and released[0]["state"] == "draining", m
            # Nothing further: min_replicas = 1 holds the last replica.
            await asyncio.sleep(2.0)
            m = await replicas(router, "hot")
            assert m["counts"]["awake"] == 1 and m["counts"]["draining"] == 1, m
            text = (await _get_text(router, "/metrics"))
            assert 'mvllm_model_replicas{model="hot",state="awake"} 1.0' in text, text[-2000:]
            assert 'mvllm_model_replicas{model="hot",state="draining"} 1.0' in text
            # `mvllm ps` and the dashboard (client/fleet.py over /admin/nodes) count one replica, one released.
            view = build_fleet(await get_json(router, "/admin/nodes")).model("hot")
            assert view is not None and view.replicas == 1 and len(view.released) == 1, view
            # New requests go to the replica kept.
            kept = next(r["agent"] for r in m["replicas"] if r["state"] == "awake")
            assert {await chat(c, 4) for _ in range(6)} == {kept}
            await c.close()


async def _counts_are(router: RunningRouter, **want: int) -> dict[str, Any] | None:
    m = await replicas(router, "hot")
    return m if all(m["counts"][k] == v for k, v in want.items()) else None


async def _get_text(router: RunningRouter, path: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(router.url + path) as resp:
        return await resp.text()


async def test_a_released_replica_finishes_its_stream_gets_no_new_request_and_then_sleeps(tmp_path):
    both = hot("idle_timeout = 5")
    with agents(tmp_path, both, both) as (a, b):
        # scale_down_after 3 s: time to put one long stream on each replica before the release.
        async with router_for(tmp_path, [("a", a), ("b", b)], scale_down_after=3.0) as router:
            # Loaded together, so that neither agent's idle timer sleeps one before the other is up.
            await asyncio.gather(*(get_json(router, f"/admin/models/hot/load?node={n}", "POST") for n in ("a", "b")))
            await wait_until_async(
                lambda: _counts_are(router, awake=2), 10, what="hot awake on both agents, as the router sees it"
            )
            c = client(router)

            async def stream_on(node: str, other: str) -> tuple[Any, asyncio.Task[int]]:
                # The other agent drained for a moment: the stream can only go to `node`.
                await get_json(router, f"/admin/nodes/{other}/drain", "POST")
                try:
                    raw = await c.chat.completions.with_raw_response.create(
                        model="hot", messages=[{"role": "user", "content": "hi"}], max_tokens=240, stream=True
                    )
                finally:
                    await get_json(router, f"/admin/nodes/{other}/undrain", "POST")
                assert raw.headers.get("x-mvllm-node") == node
                stream = raw.parse()

                async def read() -> int:
                    chunks = 0
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            chunks += 1
                    return chunks

                return raw, asyncio.create_task(read())

            _, on_a = await stream_on("a", "b")
            _, on_b = await stream_on("b", "a")
            # Each replica at 1/4: the mean (0.25) is below 0.3, and ties release by agent name: a.
            m = await wait_until_async(
                lambda: _counts_are(router, awake=1, draining=1), 12, what="one replica released"
            )
            released = next(r for r in m["replicas"] if r["released"])
            assert released["agent"] == "a" and released["in_flight"] == 1, m
            assert not on_a.done(), "the stream on a ended before its release: lengthen it"
            assert {await chat(c, 4) for _ in range(6)} == {"b"}  # no new request to the released one
            assert await on_a == 240 and await on_b == 240  # the released replica's stream finished whole
            # Its agent's idle timer then sleeps it: an ordinary sleeping copy again, not released.
            async def a_asleep() -> dict[str, Any] | None:
                m = await replicas(router, "hot")
                on_a = next((r for r in m["replicas"] if r["agent"] == "a"), None)
                return m if on_a is not None and on_a["state"] == "sleeping" else None

            m = await wait_until_async(a_asleep, 20, what="the released replica asleep")
            assert m["counts"]["draining"] == 0 and not any(r["released"] for r in m["replicas"]), m
            await c.close()
