"""Streams that survive a dying node: real `mvllm sim` processes with one --sim-seed, the serving
one SIGKILLed mid-stream; the client's stream goes on from another sim with nothing lost or repeated."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from mvllm.router.stats import load_stats_snapshot
from tests.integration.agent_support import TOKEN, marked_processes, model, running_agent
from tests.integration.router_support import MODEL, client, node_state, router_for, sims
from tests.support import node, wait_until_async, write_servers

SLOW = ["--sim-itl-ms", "40", "--sim-seed", "11"]
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about rivers."}]


def resumes(r: RunningRouter) -> dict[str, float]:
    out = {}
    for line in r.state.metrics.render().decode().splitlines():
        if line.startswith("mvllm_stream_resumes_total{"):
            label, value = line.rsplit(" ", 1)
            out[label.split('"')[1]] = float(value)
    return out


async def raw_stream(
    url: str, path: str, body: dict[str, Any], kill_after: int, victim: Any, on_text: Callable[[int], None] | None = None
) -> tuple[list[dict], int, str]:
    """POST a stream; SIGKILL `victim` once `kill_after` text chunks arrived (None: never), and
    tell `on_text` of each. The parsed chunks, the number of [DONE] events and the x-mvllm-node header."""
    chunks: list[dict] = []
    done = 0
    texts = 0
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        node_name = resp.headers.get("x-mvllm-node", "")
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                assert ev.startswith(b"data: "), ev
                payload = ev[6:]
                if payload == b"[DONE]":
                    done += 1
                    continue
                obj = json.loads(payload)
                chunks.append(obj)
                choice = obj["choices"][0] if obj.get("choices") else {}
                if choice.get("text") or choice.get("delta", {}).get("content"):
                    texts += 1
                    if texts == kill_after and victim is not None:
                        victim.proc.kill()
                    if on_text is not None:
                        on_text(texts)
        assert buf == b""
    return chunks, done, node_name


async def test_chat_stream_survives_its_node_being_killed(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW) as (a, b):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b")]
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            c = client(r)
            kw = dict(model=MODEL, messages=MSGS, max_tokens=40, temperature=0, stream=True,
                      stream_options={"include_usage": True})
            # The uninterrupted answer, straight from b (same seed, so the same text).
            direct = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0, timeout=30)
            want, want_usage = [], None
            async for ch in await direct.chat.completions.create(**kw):
                want += [ch.choices[0].delta.content] if ch.choices and ch.choices[0].delta.content else []
                want_usage = ch.usage or want_usage
            assert len(want) == 40

            raw = await c.chat.completions.with_raw_response.create(**kw)
            assert raw.headers["x-mvllm-node"] == "a"
            got, usages, ids, finish, roles = [], [], set(), None, 0
            async for ch in raw.parse():
                ids.add(ch.id)
                if ch.usage is not None:
                    usages.append(ch.usage)
                for choice in ch.choices:
                    roles += choice.delta.role is not None
                    if choice.delta.content:
                        got.append(choice.delta.content)
                        if len(got) == 8:
                            a.proc.kill()
                    finish = choice.finish_reason or finish
            assert "".join(got) == "".join(want) and len(got) == 40
            assert finish == "length" and len(ids) == 1 and roles == 1
            assert len(usages) == 1
            assert usages[0].completion_tokens == 40
            assert usages[0].prompt_tokens == want_usage.prompt_tokens
            assert usages[0].total_tokens == want_usage.total_tokens
            assert resumes(r) == {"resumed": 1.0}  # a died mid-stream: b gave the rest


async def test_completion_stream_survives_its_node_being_killed(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW) as (a, b):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b")]
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            body = {"model": MODEL, "prompt": "The river flows", "max_tokens": 30, "temperature": 0, "stream": True}
            want, done, _ = await raw_stream(b.url, "/v1/completions", body, 0, None)
            want_text = "".join(ch["choices"][0]["text"] for ch in want if ch["choices"])
            assert done == 1

            got, done, served = await raw_stream(r.url, "/v1/completions", body, 12, a)
            assert served == "a" and a.proc.popen.poll() is not None
            texts = [ch["choices"][0]["text"] for ch in got if ch["choices"] and ch["choices"][0]["text"]]
            assert "".join(texts) == want_text and len(texts) == 30
            assert done == 1
            assert all("error" not in ch for ch in got)
            assert {ch["id"] for ch in got} == {got[0]["id"]} and {ch["created"] for ch in got} == {got[0]["created"]}
            assert got[-1]["choices"][0]["finish_reason"] == "length"
            assert resumes(r) == {"resumed": 1.0}



async def test_a_stream_resumed_twice_when_its_second_node_dies_too(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW, SLOW) as (a, b, c):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b"), node(c.url, "c")]
        by_name = {"b": b, "c": c}
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            body = {"model": MODEL, "messages": MSGS, "max_tokens": 36, "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
            want, _, _ = await raw_stream(c.url, "/v1/chat/completions", body, 0, None)
            second: list[str] = []

            def kill_second(count: int) -> None:
                if count == 20:  # a died at 6: whichever node took over dies now
                    second.extend(n for n in by_name if node_state(r, n)["in_flight"] == 1)
                    assert len(second) == 1
                    by_name[second[0]].proc.kill()

            got, done, served = await raw_stream(r.url, "/v1/chat/completions", body, 6, a, kill_second)
            assert served == "a" and len(second) == 1 and by_name[second[0]].proc.popen.poll() is not None

            def text(chunks: list[dict]) -> list[str]:
                return [ch["choices"][0]["delta"]["content"] for ch in chunks
                        if ch["choices"] and ch["choices"][0]["delta"].get("content")]

            assert text(got) == text(want) and len(text(got)) == 36
            assert done == 1 and all("error" not in ch for ch in got)
            # Per-chunk usage (continuous_usage_stats) counts on across both resumes, as uninterrupted.
            assert [ch["usage"] for ch in got] == [ch["usage"] for ch in want]
            assert resumes(r) == {"resumed": 2.0}


async def test_resume_streams_false_keeps_the_sse_error(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW) as (a, b):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b")]
        async with router_for(tmp_path, nodes, health_check_interval=60, resume_streams=False) as r:
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, stream=True)
            received = 0
            with pytest.raises(openai.APIError) as info:
                async with asyncio.timeout(10):
                    async for ch in stream:
                        if ch.choices and ch.choices[0].delta.content:
                            received += 1
                            if received == 5:
                                a.proc.kill()
            assert "failed mid-stream" in str(info.value.message)
            assert received < 40
            assert resumes(r) == {}


async def test_unresumable_stream_ends_with_the_sse_error(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW) as (a, b):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b")]
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            body = {"model": MODEL, "prompt": "The river flows", "max_tokens": 30, "stream": True, "echo": True}
            got, done, _ = await raw_stream(r.url, "/v1/completions", body, 5, a)
            assert done == 1  # the SSE error's own [DONE]
            assert "failed mid-stream" in got[-1]["error"]["message"]
            assert resumes(r) == {"unresumable": 1.0}
            # n = 2, through the official client: b serves it now (a is dead), and dies too.
            stream = await client(r).chat.completions.create(model=MODEL, messages=MSGS, max_tokens=40, n=2, stream=True)
            received = 0
            with pytest.raises(openai.APIError) as info:
                async with asyncio.timeout(10):
                    async for ch in stream:
                        if ch.choices and ch.choices[0].delta.content:
                            received += 1
                            if received == 5:
                                b.proc.kill()
            assert "failed mid-stream" in str(info.value.message)
            assert resumes(r) == {"unresumable": 2.0}


async def test_stream_cut_by_a_live_node_goes_on_elsewhere(tmp_path: Path) -> None:
    with sims(tmp_path, SLOW, SLOW) as (a, b):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b")]
        async with router_for(tmp_path, nodes, health_check_interval=60, failure_threshold=100) as r:
            async with aiohttp.ClientSession() as s, s.post(a.url + "/sim/fault", json={"kind": "midstream", "rate": 1}) as f:
                assert f.status == 200
            body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "stream": True,
                    "stream_options": {"include_usage": True}}
            want, _, _ = await raw_stream(b.url, "/v1/completions", body, 0, None)
            got, done, served = await raw_stream(r.url, "/v1/completions", body, 0, None)
            assert served == "a" and done == 1
            assert [ch["choices"][0]["text"] for ch in got if ch["choices"]] == \
                [ch["choices"][0]["text"] for ch in want if ch["choices"]]
            assert [ch["usage"] for ch in got if ch.get("usage")] == [want[-1]["usage"]]
            assert resumes(r) == {"resumed": 1.0}


async def test_stream_cut_by_an_agents_dying_engine_goes_on_at_another_agent(tmp_path: Path) -> None:
    # An agent whose engine dies ends its answer cleanly, without [DONE]: the router resumes that too.
    catalog = model("m", "preload = true", sim="sim = { ttft_ms = 5, itl_ms = 40, weights_gib = 2, seed = 11 }")
    with running_agent(tmp_path, catalog) as a, running_agent(tmp_path, catalog) as b:
        entries = [{"url": x.url, "name": n, "token": TOKEN, "load_timeout": 30} for x, n in ((a, "a"), (b, "b"))]
        path = write_servers(tmp_path / "servers.toml", agents=entries, scrape_timeout=2.0)
        async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
            for x in (a, b):
                await wait_until_async(lambda x=x: x.inst("m")["state"] == "ready", 30, what="m ready")
            await wait_until_async(lambda: all(n["healthy"] for n in load_stats_snapshot(r.state)["nodes"]), 10)
            body = {"model": "m", "messages": MSGS, "max_tokens": 30, "stream": True,
                    "stream_options": {"include_usage": True}}
            want, done, _ = await raw_stream(r.url, "/v1/chat/completions", body, 0, None)
            assert done == 1
            agents = {"a": a, "b": b}

            def kill_engine(count: int) -> None:
                if count == 6:
                    serving = [n for n in agents if node_state(r, n)["in_flight"] == 1]
                    assert len(serving) == 1
                    for pid in marked_processes(agents[serving[0]].proc.pid):
                        os.kill(pid, signal.SIGKILL)

            got, done, _ = await raw_stream(r.url, "/v1/chat/completions", body, 0, None, kill_engine)
            text = [ch["choices"][0]["delta"].get("content") for ch in got if ch["choices"]]
            assert [t for t in text if t] == [t for t in (ch["choices"][0]["delta"].get("content") for ch in want
                                                          if ch["choices"]) if t]
            assert done == 1 and all("error" not in ch for ch in got)
            assert [ch["usage"] for ch in got if ch.get("usage")] == [want[-1]["usage"]]
            assert resumes(r) == {"resumed": 1.0}


async def test_a_resume_skips_a_stalled_node_as_a_request_would(tmp_path: Path) -> None:
    # b weighs as much as a: without the proxy's stall filter a continuation would go there
    # (1000 to 1 against c); stalled, b must be passed over for c, as a new request passes it over.
    with sims(tmp_path, SLOW, SLOW, SLOW) as (a, b, c):
        nodes = [node(a.url, "a", weight=1000.0), node(b.url, "b", weight=1000.0), node(c.url, "c")]
        async with router_for(tmp_path, nodes, health_check_interval=60) as r:
            stalled = r.state.registry.get("b")
            assert stalled is not None
            # Requests sent to b that it never answered: what a hanging node holds (breaker.stalled).
            for _ in range(stalled.breaker.failure_threshold + 1):
                stalled.breaker.on_dispatch(time.monotonic())
            assert stalled.breaker.stalled()
            body = {"model": MODEL, "prompt": "The river flows", "max_tokens": 24, "temperature": 0, "stream": True}
            serving: list[str] = []

            def who_resumed(count: int) -> None:
                if count == 16:  # a died at 6
                    serving.extend(n for n in ("b", "c") if node_state(r, n)["in_flight"] == 1)

            got, done, served = await raw_stream(r.url, "/v1/completions", body, 6, a, who_resumed)
            assert served == "a" and done == 1 and all("error" not in ch for ch in got)
            assert serving == ["c"]
            assert resumes(r) == {"resumed": 1.0}
