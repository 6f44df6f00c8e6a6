"""Hot reload of servers.toml (watchfiles) with real `mvllm sim` engines: nodes added, removed
while a stream runs on them, changed, an invalid file rejected, and edits under load."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import pytest

from mvllm.router.app import RunningRouter
from tests.integration.router_support import MODEL, client, engines, node_state, router_for
from tests.support import node, wait_until_async, write_servers

MSG = [{"role": "user", "content": "hello"}]


def names(r: RunningRouter) -> list[str]:
    return [n.name for n in r.state.registry.nodes()]


async def test_reload_adds_removes_and_rejects(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mvllm")
    async with engines(["--sim-itl-ms", "40"], []) as (a, b):
        path = tmp_path / "servers.toml"
        async with router_for(tmp_path, [node(a.url, "a")], watch=True) as r:
            c = client(r)
            assert names(r) == ["a"]

            # add b
            write_servers(path, [node(a.url, "a"), node(b.url, "b")])
            await wait_until_async(lambda: r.state.registry.nodes_for(MODEL) and len(r.state.registry.nodes_for(MODEL)) == 2,
                             timeout=10, what="b joined with its models discovered")
            seen = Counter()
            for _ in range(64):  # idle nodes are picked at random: until both answered (misses: 2**-63)
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=1)
                seen[raw.headers["x-mvllm-node"]] += 1
                if set(seen) == {"a", "b"}:
                    break
            assert set(seen) == {"a", "b"}

            # remove a while a stream runs on it: the stream finishes, new requests go to b
            write_servers(path, [node(a.url, "a"), node(b.url, "b", drain=True)])
            await wait_until_async(lambda: node_state(r, "b")["draining"], what="b drained")
            stream = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=40, stream=True)
            first = await stream.__anext__()
            assert first is not None
            write_servers(path, [node(b.url, "b")])
            await wait_until_async(lambda: names(r) == ["b"], what="a removed")
            assert node_state(r, "a")["removed"] and node_state(r, "a")["in_flight"] == 1
            raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MSG, max_tokens=1)
            assert raw.headers["x-mvllm-node"] == "b"
            rest = [ch async for ch in stream]
            finish = [ch.choices[0].finish_reason for ch in rest if ch.choices and ch.choices[0].finish_reason]
            assert finish == ["length"]  # the in-flight stream ran to its end on the removed node
            await wait_until_async(lambda: all(n.name != "a" for n in r.state.registry.iter_all()), what="a forgotten")

            # an invalid file is rejected whole; the running config stays
            caplog.clear()
            path.write_text('[servers]\nservers = [{ url = "http://127.0.0.1:1", max_concurrent_requests = "lots" }]\n')
            await wait_until_async(lambda: r.state.last_reload is not None and not r.state.last_reload.ok, what="rejected")
            assert "max_concurrent_requests" in r.state.last_reload.message
            assert any("reload rejected" in rec.getMessage() and rec.levelno == logging.ERROR for rec in caplog.records)
            assert names(r) == ["b"]
            out = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=1)
            assert out.choices[0].message.content

            # and a valid file afterwards applies again
            write_servers(path, [node(b.url, "b", max_concurrent_requests=3), node(a.url, "a")])
            await wait_until_async(lambda: names(r) == ["b", "a"] and node_state(r, "b")["capacity"] == 3, what="valid again")
            assert r.state.last_reload is not None and r.state.last_reload.ok


async def test_editing_the_config_under_load_fails_no_request(tmp_path: Path) -> None:
    async with engines([], [], []) as (a, b, c3):
        path = tmp_path / "servers.toml"
        every = [node(a.url, "a"), node(b.url, "b"), node(c3.url, "c")]
        async with router_for(tmp_path, every[:2], watch=True) as r:
            c = client(r)
            stop = asyncio.Event()
            results: Counter[str] = Counter()
            errors: list[str] = []

            async def load() -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        if i % 4 == 0:
                            stream = await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8, stream=True)
                            async for _ in stream:
                                pass
                        else:
                            await c.chat.completions.create(model=MODEL, messages=MSG, max_tokens=8)
                        results["ok"] += 1
                    except Exception as exc:  # every failure is the test's finding
                        errors.append(repr(exc))

            workers = [asyncio.ensure_future(load()) for _ in range(8)]
            try:
                edits = [
                    every,  # add c
                    [every[0], every[2]],  # remove b
                    [node(a.url, "a", weight=3.0), every[2]],  # change a
                    [node(a.url, "a", drain=True), every[1], every[2]],  # drain a, b back
                    every[1:],  # remove a
                    every,
                ]
                for nodes in edits:
                    write_servers(path, nodes)
                    want = [n["name"] for n in nodes]
                    await wait_until_async(lambda want=want: names(r) == want, timeout=10, what=f"reloaded to {want}")
                    await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.gather(*workers)
            assert errors == []
            assert results["ok"] > 50
            applied = r.state.metrics.registry.get_sample_value("mvllm_config_reloads_total", {"result": "applied"})
            assert applied is not None and applied >= len(edits)
            assert node_state(r, "c")["healthy"] is True
