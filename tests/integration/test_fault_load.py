"""Fault and load suite: a few hundred concurrent streams through the real router (a `mvllm run`
subprocess, so its pid and memory can be watched) over four simulated engines on 127.0.0.1, while
one engine is killed, one answers 500s and one hangs, and servers.toml and the keys file are
reloaded in the middle.

Asserted: no request that failed before its first byte reached the client (all were retried on
another node and succeeded); every failure is clean (a final SSE error event after the first bytes,
or an OpenAI-form JSON error); the router never restarted (same pid, /health OK); its memory after
the load is back near where it started.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai

from mvllm.common.prom import iter_samples
from tests.integration.security_support import MSG, OTHER_KEY, USER_KEY, key_entry, router_process, write_keys
from tests.procs import Proc, free_port, wait_http_ok
from tests.support import node, write_servers

MODEL = "sim-model"
STREAMS = 300
MAX_TOKENS = 60
MIB = 1024 * 1024
# Timeouts short enough that the hung engine costs each request it holds about a second.
CONFIG = {
    "first_byte_timeout": 1.0,
    "request_timeout": 30.0,
    "failure_threshold": 2,
    "breaker_cooldown": 60.0,
    "max_retries": 3,
    "health_check_interval": 0.5,
    "health_check_timeout": 1.0,
}


@dataclass
class Outcome:
    status: int
    node: str
    got_bytes: bool = False  # did the client receive any of the body?
    done: bool = False  # the stream ended with data: [DONE]
    sse_error: bool = False  # ... right after a data: {"error": ...} event
    json_error: bool = False  # a non-200 answer whose body is OpenAI-form JSON
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.sse_error

    @property
    def clean_failure(self) -> bool:
        return (self.status == 200 and self.sse_error and self.done) or (self.status != 200 and self.json_error)


async def one_stream(session: aiohttp.ClientSession, url: str, key: str, i: int) -> Outcome:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": MAX_TOKENS, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
            out = Outcome(resp.status, resp.headers.get("x-mvllm-node", "?"))
            if resp.status != 200:
                raw = await resp.read()
                try:
                    err = json.loads(raw)["error"]
                    out.json_error = bool(err["message"]) and "type" in err and "code" in err
                except (ValueError, KeyError, TypeError):
                    pass
                out.detail = raw[:200].decode(errors="replace")
                return out
            data = b""
            async for chunk in resp.content.iter_any():
                data += chunk
                out.got_bytes = True
            events = [e for e in data.split(b"\n\n") if e.strip()]
            out.done = bool(events) and events[-1].strip() == b"data: [DONE]"
            out.sse_error = len(events) >= 2 and events[-2].startswith(b'data: {"error"')
            return out
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Outcome(-1, "?", detail=repr(exc))


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for s in iter_samples(text, [name]) if all(s.labels.get(k) == v for k, v in labels.items()))


async def test_streams_through_a_killed_a_500ing_and_a_hung_engine_with_reloads(tmp_path: Path) -> None:
    t_start = time.monotonic()
    names = ["killed", "errors", "hangs", "good"]
    sims: list[Proc] = []
    ports: list[int] = []
    try:
        for name in names:
            port = free_port()
            args = ["sim", "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), "--sim-ttft-ms", "5",
                    "--sim-itl-ms", "10", "--max-num-seqs", "256"]
            sims.append(Proc(args, tmp_path / f"sim-{name}.log").start())
            ports.append(port)
        for proc, port in zip(sims, ports, strict=True):
            wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc.popen)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        nodes = [node(u, n) for u, n in zip(urls, names, strict=True)]
        write_keys(tmp_path / "keys.toml", [key_entry("load", USER_KEY)])
        config_path = write_servers(tmp_path / "servers.toml", nodes, auth={"keys_file": "keys.toml"}, **CONFIG)

        async with (
            router_process(tmp_path, config_path) as router,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as s,
        ):
            pid = router.pid
            # Warm up (first-use allocations), then take the memory baseline.
            warm = await asyncio.gather(*(one_stream(s, router.url, USER_KEY, i) for i in range(40)))
            assert all(o.ok for o in warm)
            rss0 = router.rss()

            tasks = [asyncio.create_task(one_stream(s, router.url, USER_KEY, i)) for i in range(STREAMS)]
            await asyncio.sleep(0.4)  # streams are on every node, some mid-answer

            # The faults, at once: one engine killed, one answering 500s, one hanging.
            sims[0].kill()
            for url, kind in ((urls[1], "500"), (urls[2], "hang")):
                async with s.post(url + "/sim/fault", json={"kind": kind, "rate": 1.0}) as resp:
                    assert resp.status == 200
            # A config reload (a node's weight changes) and a keys reload (a second key joins).
            write_servers(
                config_path, [*nodes[:3], node(urls[3], "good", weight=2.0)], auth={"keys_file": "keys.toml"}, **CONFIG
            )
            write_keys(tmp_path / "keys.toml", [key_entry("load", USER_KEY), key_entry("late", OTHER_KEY)])

            # The new key works once its reload is applied (bounded wait), while the load runs.
            client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=OTHER_KEY, max_retries=0, timeout=30)
            deadline = time.monotonic() + 10
            while True:
                try:
                    out = await client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4)
                    break
                except openai.AuthenticationError:
                    assert time.monotonic() < deadline, "the keys reload was not applied within 10 s"
                    await asyncio.sleep(0.1)
            assert out.choices[0].message.content
            late = [asyncio.create_task(one_stream(s, router.url, OTHER_KEY, STREAMS + i)) for i in range(60)]
            outcomes = await asyncio.gather(*tasks, *late)
            await client.close()

            kinds = Counter(
                "ok" if o.ok else "clean failure" if o.clean_failure else f"unclean {o.status} {o.detail[:60]}"
                for o in outcomes
            )
            # Nothing failed before its first byte: those were all retried on another node.
            assert not [o for o in outcomes if o.status != 200], kinds
            assert all(o.ok or o.clean_failure for o in outcomes), kinds
            # The only failures allowed: streams already running on the killed engine when it died.
            assert {o.node for o in outcomes if not o.ok} <= {"killed"}, kinds
            assert kinds["ok"] >= len(outcomes) * 0.6, kinds
            assert all(o.ok for o in outcomes[STREAMS:])  # the second key's wave, after the faults

            async with s.get(router.url + "/metrics", headers={"x-api-key": USER_KEY}) as resp:
                text = await resp.text()
            # Requests met the faults and were carried on elsewhere: before their first byte (a retry)
            # or, since streams resume (issue 14), after it. Which of the two a run shows depends on
            # timing: once resumed continuations and the stall rule have ejected the bad nodes, the
            # later requests never reach them, so a run may retry none.
            recovered = metric(text, "mvllm_retries_total") + metric(
                text, "mvllm_stream_resumes_total", outcome="resumed"
            )
            assert recovered > 0
            for name in ("killed", "errors", "hangs"):  # every fault was met, and held against its node
                assert metric(text, "mvllm_node_failures_total", node=name) > 0, name
            assert metric(text, "mvllm_config_reloads_total", result="applied") >= 1
            assert metric(text, "mvllm_config_reloads_total", result="rejected") == 0
            async with s.get(router.url + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["healthy_nodes"] >= 1
            assert router.pid == pid and router.alive()  # never restarted
            await asyncio.sleep(0.5)
            rss1 = router.rss()
            assert rss1 < rss0 + 60 * MIB, (rss0 / MIB, rss1 / MIB)
            print(f"\nfault/load: {dict(kinds)}; router RSS {rss0 / MIB:.1f} -> {rss1 / MIB:.1f} MiB; "
                  f"retries {metric(text, 'mvllm_retries_total'):.0f} (with resumes {recovered:.0f}); "
                  f"{time.monotonic() - t_start:.1f}s")
    finally:
        for proc in sims:
            proc.stop()
