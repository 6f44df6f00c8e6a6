"""`mvllm.client` (sync `Client` and `AsyncClient`) against a real router subprocess with API keys,
two `mvllm sim` nodes, a flaky sim node and an `mvllm agent` running simulated engines: every
method, streaming, the error classes, and each file of examples/ run as a subprocess (against
`mvllm run --demo`, and admin.py also against the agent)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from mvllm.client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    ModelFailedError,
    MvllmError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
)
from tests.integration.agent_support import TOKEN, model, running_agent
from tests.integration.router_support import MODEL, sims
from tests.integration.test_cli_admin import start_router
from tests.procs import REPO, Proc, free_port, wait_http_ok
from tests.support import FAST_ROUTER, node

ADMIN_KEY = "sk-admin-client-0123456789abcdef"
USER_KEY = "sk-user-client-0123456789abcdefgh"
SLOW_KEY = "sk-slow-client-0123456789abcdefgh"
HI = [{"role": "user", "content": "hi"}]
CATALOG = (
    model("m1", sim="sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 0.2 }")
    # Starts for longer than the agent's load_timeout: the agent answers 202, the client keeps watching.
    + model("m2", sim="sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 1.5 }")
    + model("broken", 'extra_args = ["--sim-fail-kind", "not-a-kind"]')
)


@dataclass
class Fleet:
    url: str
    flaky_url: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("client")
    top = {"load_timeout": 0.8, "restart_max": 1, "restart_backoff": 0.1}
    with (
        sims(tmp, [], [], ["--served-model-name", "flaky"]) as (a, b, flaky),
        running_agent(tmp, CATALOG, sim_gpus=(40,), top=top) as agent,
    ):
        doc = {
            "servers": {
                "servers": [
                    node(a.url, "n-a"),
                    node(b.url, "n-b"),
                    node(flaky.url, "n-flaky"),
                    node(f"http://127.0.0.1:{free_port()}", "n-off", drain=True),  # drained in the file
                ]
            },
            "config": {**FAST_ROUTER, "breaker_cooldown": 0.5},
            "agents": [{"name": "gpu-a", "url": agent.url, "token": TOKEN}],
            "auth": {
                "keys": [
                    {"name": "ops", "role": "admin", "key": ADMIN_KEY},
                    {"name": "user", "key": USER_KEY},
                    {"name": "slow", "key": SLOW_KEY, "limits": {"requests_per_second": 0.1, "burst": 1}},
                ]
            },
        }
        config = tmp / "servers.toml"
        config.write_text(tomli_w.dumps(doc))
        router = start_router(tmp, config)
        try:
            url = router.url  # type: ignore[attr-defined]
            with Client(url, api_key=USER_KEY, timeout=10) as c:  # the agent's catalog is read
                deadline = time.monotonic() + 20
                while "m1" not in {m.id for m in c.models()}:
                    assert time.monotonic() < deadline, "the router never listed the agent's models"
                    time.sleep(0.1)
            yield Fleet(url, flaky.url)
        finally:
            router.stop()


def client(fleet: Fleet, **kw: object) -> Client:
    return Client(fleet.url, api_key=USER_KEY, admin_key=ADMIN_KEY, timeout=30, **kw)  # type: ignore[arg-type]


def set_fault(url: str, kind: str, rate: float) -> None:
    req = urllib.request.Request(url + "/sim/fault", data=json.dumps({"kind": kind, "rate": rate}).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


# -- OpenAI API -------------------------------------------------------------------------------------


def test_chat_completion_embeddings_models_health(fleet: Fleet) -> None:
    with client(fleet) as c:
        answer = c.chat(MODEL, HI, max_tokens=6)
        assert answer.text and answer.choices[0].message.role == "assistant"
        assert answer.choices[0].finish_reason == "length" and answer.model == MODEL
        assert answer.usage is not None and answer.usage.completion_tokens == 6
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6
        assert answer.node in ("n-a", "n-b") and answer.request_id and answer.id.startswith("chatcmpl-")
        assert answer.raw["choices"][0]["message"]["content"] == answer.text

        done = c.complete(MODEL, "Once upon a time", max_tokens=5)
        assert done.text and done.usage is not None and done.usage.completion_tokens == 5 and done.node in ("n-a", "n-b")

        vectors = c.embed(MODEL, ["one text", "another text"])
        assert len(vectors) == 2 and len(vectors[0]) == 256 and vectors[0] != vectors[1]
        assert c.embed(MODEL, "one text") == [vectors[0]]  # deterministic; a string gives a list of one
        b64 = c.embed(MODEL, ["one text"], encoding_format="base64")[0]
        assert max(abs(x - y) for x, y in zip(b64, vectors[0], strict=True)) < 1e-6  # float32 decoded

        ids = {m.id for m in c.models()}
        assert {MODEL, "flaky", "m1", "m2"} <= ids

        health = c.health()
        assert health.status == "ok" and health.nodes == 5 and health.ok


def test_streams_yield_deltas_then_usage_and_close_early(fleet: Fleet) -> None:
    with client(fleet) as c:
        stream = c.chat_stream(MODEL, HI, max_tokens=12)
        deltas = list(stream)
        assert len(deltas) >= 6 and "".join(deltas) == stream.text  # one delta per token or so
        assert stream.finish_reason == "length" and stream.node in ("n-a", "n-b") and stream.request_id
        assert stream.usage is not None and stream.usage.completion_tokens == 12

        with c.complete_stream(MODEL, "Once", max_tokens=8) as cs:
            text = "".join(cs)
        assert text == cs.text and cs.usage is not None and cs.usage.completion_tokens == 8

        # Leaving a stream early closes it; the client goes on working.
        with c.chat_stream(MODEL, HI, max_tokens=400) as long:
            first = next(iter(long))
        assert first and long.finish_reason is None
        assert c.chat(MODEL, HI, max_tokens=2).usage.completion_tokens == 2  # type: ignore[union-attr]

        # Several threads share one client.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda i: "".join(c.chat_stream(MODEL, HI, max_tokens=4)), range(8)))
        assert len(texts) == 8 and all(texts)


async def test_async_client_concurrent_calls_streams_and_errors(fleet: Fleet) -> None:
    async with AsyncClient(fleet.url + "/v1", api_key=USER_KEY, admin_key=ADMIN_KEY, timeout=30) as c:
        assert c.base_url == fleet.url

        async def streamed() -> tuple[str, int]:
            s = c.chat_stream(MODEL, HI, max_tokens=10)
            text = "".join([d async for d in s])
            assert s.usage is not None
            return text, s.usage.completion_tokens

        results = await asyncio.gather(
            *(c.chat(MODEL, HI, max_tokens=3) for _ in range(8)), *(streamed() for _ in range(3)), c.embed(MODEL, "x")
        )
        chats, streams = results[:8], results[8:11]
        assert all(a.node in ("n-a", "n-b") and a.usage.completion_tokens == 3 for a in chats)

        # The router spreads load. Short requests may not overlap (idle nodes are picked at random),
        # so hold 8 long streams open at once: a node with 4 of them in flight scores 4/8 = 0.5 (not
        # idle, capacity 8 = the sims' max_num_seqs) while the other is idle, so both must get some.
        held = [c.chat_stream(MODEL, HI, max_tokens=2000) for _ in range(8)]
        try:
            firsts = await asyncio.gather(*(s.__anext__() for s in held))
            assert all(firsts)
            assert {s.node for s in held} == {"n-a", "n-b"}, [s.node for s in held]
        finally:
            for s in held:
                await s.aclose()
        assert all(text and n == 10 for text, n in streams)
        assert len(results[11][0]) == 256
        assert (await c.complete(MODEL, "x", max_tokens=2)).usage.completion_tokens == 2
        cs = c.complete_stream(MODEL, "x", max_tokens=3)
        assert len([d async for d in cs]) >= 1 and cs.usage.completion_tokens == 3

        with pytest.raises(NotFoundError) as err:
            await c.chat("no-such-model", HI)
        assert err.value.code == "model_not_found"
        with pytest.raises(NotFoundError):
            async for _ in c.chat_stream("no-such-model", HI):
                pass
        nodes = {n.name: n for n in await c.nodes()}
        assert nodes["gpu-a"].is_agent and nodes["n-a"].kind == "static"
        page = await c.events(since=0, limit=5)
        assert len(page.events) == 5 and page.last >= page.events[-1].seq

    with pytest.raises(APIConnectionError, match="unreachable"):
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=5) as dead:
            await dead.health()


# -- errors -----------------------------------------------------------------------------------------


def test_error_classes(fleet: Fleet) -> None:
    with client(fleet) as c:
        with pytest.raises(NotFoundError) as nf:
            c.chat("no-such-model", HI)
        e = nf.value
        assert (e.status, e.type, e.code) == (404, "not_found_error", "model_not_found") and "no-such-model" in e.message
        assert e.request_id and isinstance(e, MvllmError)
        with pytest.raises(BadRequestError):
            c.chat(MODEL, "not a list of messages")  # type: ignore[arg-type]

    with Client(fleet.url, api_key="sk-wrong-0123456789abcdefgh", timeout=10) as bad:
        with pytest.raises(AuthenticationError) as auth:
            bad.chat(MODEL, HI)
        assert auth.value.status == 401 and auth.value.code == "invalid_api_key"
        assert bad.health().status == "ok"  # /health is open
    with Client(fleet.url, timeout=10) as nokey, pytest.raises(AuthenticationError) as missing:
        nokey.models()
    assert missing.value.code == "missing_api_key"
    with Client(fleet.url, api_key=USER_KEY, timeout=10) as user:
        with pytest.raises(PermissionDeniedError) as denied:
            user.nodes()
        assert denied.value.status == 403 and denied.value.code == "admin_required"
        with pytest.raises(PermissionDeniedError):
            user.drain("n-a")

    with Client(fleet.url, api_key=SLOW_KEY, timeout=10) as slow:
        slow.chat(MODEL, HI, max_tokens=1)  # the burst of one
        with pytest.raises(RateLimitError) as limited:
            slow.chat(MODEL, HI, max_tokens=1)
        assert limited.value.status == 429 and limited.value.code == "rate_limit_exceeded"
        assert limited.value.retry_after is not None and 1 <= limited.value.retry_after <= 10

    with Client(fleet.url, api_key=USER_KEY, timeout=0.3) as hurried, pytest.raises(APITimeoutError):
        hurried.chat(MODEL, HI, max_tokens=2000)  # ~4 s of tokens

    port = free_port()
    with Client(f"http://127.0.0.1:{port}", timeout=5) as dead, pytest.raises(APIConnectionError) as gone:
        dead.chat(MODEL, HI)
    assert gone.value.status is None and f"router http://127.0.0.1:{port} unreachable" in str(gone.value)


def test_broken_stream_and_an_unavailable_model(fleet: Fleet) -> None:
    with client(fleet) as c:
        set_fault(fleet.flaky_url, "midstream", 1.0)
        try:
            stream = c.chat_stream("flaky", HI, max_tokens=50)
            with pytest.raises(InternalServerError) as broke:
                for _ in stream:
                    pass
            assert broke.value.status == 502  # the router's error event after the first bytes
            assert stream.text  # what came before the break is kept

            set_fault(fleet.flaky_url, "503", 1.0)
            with pytest.raises(ServiceUnavailableError) as busy:
                c.chat("flaky", HI, max_tokens=2)
            assert busy.value.status == 503
        finally:
            set_fault(fleet.flaky_url, "503", 0.0)


# -- admin API --------------------------------------------------------------------------------------


def test_nodes_drain_undrain_reload_events(fleet: Fleet) -> None:
    with client(fleet) as c:
        nodes = {n.name: n for n in c.nodes()}
        assert set(nodes) == {"n-a", "n-b", "n-flaky", "n-off", "gpu-a"}
        assert nodes["n-a"].up and nodes["n-a"].models == [MODEL] and nodes["n-off"].drained_by == "config"
        assert nodes["gpu-a"].gpus and nodes["gpu-a"].gpus[0].memory_total == 40 * 2**30
        fleet_view = c.fleet()
        assert fleet_view.model(MODEL).awake == ["n-a", "n-b"]  # type: ignore[union-attr]
        assert "m1" in [m.name for m in fleet_view.models]

        since = c.events(limit=1).last
        drained = c.drain("n-b")
        try:
            assert drained.name == "n-b" and drained.draining and drained.drained_by == "admin"
            assert {c.chat(MODEL, HI, max_tokens=1).node for _ in range(6)} == {"n-a"}
        finally:
            undrained = c.undrain("n-b")
        assert not undrained.draining and undrained.drained_by is None
        messages = [e.message for e in c.events(since=since).events]
        assert any("n-b drained by admin" in m for m in messages) and any("n-b undrained" in m for m in messages)

        with pytest.raises(NotFoundError) as nf:
            c.drain("nope")
        assert nf.value.code == "node_not_found"
        with pytest.raises(ConflictError) as conflict:
            c.undrain("n-off")
        assert conflict.value.code == "drained_by_config"

        reloaded = c.reload()
        assert reloaded.ok and set(reloaded.nodes) == {"n-a", "n-b", "n-flaky", "n-off", "gpu-a"}
        assert reloaded.config and reloaded.config.endswith("servers.toml")
        assert c.load_stats()["nodes"] and "mvllm_" in c.metrics_text()


def test_model_lifecycle_on_the_agent(fleet: Fleet) -> None:
    with client(fleet) as c:
        inst = c.load("m1", node="gpu-a")
        assert (inst.node, inst.name, inst.state) == ("gpu-a", "m1", "ready")
        assert c.chat("m1", HI, max_tokens=3).node == "gpu-a"
        inst = c.sleep("m1", level=2)  # the router finds where it is awake
        assert (inst.node, inst.state, inst.sleep_level, inst.state_text) == ("gpu-a", "sleeping", 2, "sleeping(2)")
        assert c.wake("m1").state == "ready"
        assert c.unload("m1", node="gpu-a").state == "stopped"

        # The agent answers 202 (starting) after its load_timeout; load() keeps watching until ready.
        t0 = time.monotonic()
        inst = c.load("m2")
        assert inst.state == "ready" and inst.node == "gpu-a" and time.monotonic() - t0 >= 1.0
        c.unload("m2")
        t0 = time.monotonic()
        started = c.load("m2", wait=False)  # answers before the engine is up (1.5 s)
        assert time.monotonic() - t0 < 1.0 and started.state in ("stopped", "starting")
        assert c.load("m2").state == "ready"  # joins the load under way
        c.unload("m2")

        with pytest.raises(ServiceUnavailableError) as failed:
            c.load("broken")
        assert "broken" in failed.value.message and failed.value.status == 503
        if isinstance(failed.value, ModelFailedError):  # failed after the agent's 202: seen by polling
            assert failed.value.instance.state == "failed" and failed.value.instance.node == "gpu-a"
        with pytest.raises(NotFoundError):
            c.load("nope")
        with pytest.raises(NotFoundError):
            c.sleep("m1", node="nowhere")
        with pytest.raises(ValueError):
            c.model_action("explode", "m1")


async def test_async_model_lifecycle(fleet: Fleet) -> None:
    async with AsyncClient(fleet.url, admin_key=ADMIN_KEY, timeout=30) as c:
        assert (await c.load("m1", node="gpu-a")).state == "ready"
        raw = await c.model_action("sleep", "m1", node="gpu-a", level=1)
        assert raw["state"] == "sleeping" and raw["sleep_level"] == 1 and raw["node"] == "gpu-a"
        assert (await c.wake("m1")).state == "ready"
        assert (await c.unload("m1")).state == "stopped"


# -- examples/ --------------------------------------------------------------------------------------


def run_example(name: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MVLLM_")}
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, f"{name}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_examples_against_the_demo(tmp_path: Path) -> None:
    port = free_port()
    demo = Proc(["run", "--demo", "--port", str(port), "--console"], tmp_path / "demo.log").start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 40, demo.popen)
        env = {"MVLLM_ROUTER": f"http://127.0.0.1:{port}"}
        out = run_example("plain_client.py", env)
        assert "chat, answered by sim-" in out and "stream done: finish_reason=length" in out
        assert "embeddings: 2 vectors of 256 dimensions" in out and out.count("node sim-") == 4  # three engines and the agent
        out = run_example("async_client.py", env)
        assert "12 chats at once" in out and out.count("stream from sim-") == 4 and "unknown model: NotFoundError (HTTP 404)" in out
        out = run_example("openai_sdk.py", env)
        assert "chat, answered by sim-" in out and "stream usage: " in out and "unknown model: HTTP 404" in out
        out = run_example("admin.py", env)
        assert "drained sim-" in out and "undrained sim-" in out and "router log: INFO node sim-" in out
        # The demo's agent: the lifecycle part runs against it.
        assert re.search(r"load \S+ on sim-agent: ready in \d+\.\ds", out) and "sleep: sleeping(1)" in out, out
        assert "wake: ready" in out and "unload: stopped" in out, out
    finally:
        demo.stop()
        print(demo.log()[-2000:])


def test_admin_example_with_an_agent(fleet: Fleet) -> None:
    env = {"MVLLM_ROUTER": fleet.url, "MVLLM_MODEL": MODEL, "MVLLM_ADMIN_KEY": ADMIN_KEY, "MVLLM_AGENT_MODEL": "m1"}
    out = run_example("admin.py", env)
    assert "load m1 on gpu-a: ready" in out and "sleep: sleeping(1)" in out
    assert "wake: ready" in out and "unload: stopped" in out
