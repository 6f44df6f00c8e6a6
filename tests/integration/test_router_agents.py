"""The router in front of node agents: real `mvllm agent` processes (engine = "sim", simulated GPUs)
on 127.0.0.1, the router in this process, the official openai client through the router.

Covers: a stopped model loaded by a request (concurrent ones share the load, the client's key is
replaced by the agent token), a sleeping model woken in preference to a cold load elsewhere, the
lifecycle admin routes, two agents with a model each and one model balanced over both, issue 4's
"three models, room for two", an agent down (failover, 503, re-admission), and a wrong token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from mvllm.router.reload import reload_config
from mvllm.router.stats import load_stats_snapshot
from tests.integration.agent_support import TOKEN, Agent, marked_processes, model
from tests.support import wait_until_async, write_servers

GIB = 1024**3
# The client's own key: never the agent's token, so a request only succeeds if the router swaps it.
CLIENT_KEY = "client-key-not-the-agent-token"
SLOW = "sim = { ttft_ms = 5, itl_ms = 10, weights_gib = 2 }"


def agent_entry(agent: Agent, name: str, **extra: Any) -> dict[str, Any]:
    return {"url": agent.url, "name": name, "token": TOKEN, "load_timeout": 30, **extra}


def write_agents(path: Path, agents: list[dict[str, Any]], **config: Any) -> Path:
    # servers.toml of these tests: agents only, with a longer scrape limit than FAST_ROUTER's.
    return write_servers(path, agents=agents, **{"scrape_timeout": 2.0, **config})


@contextlib.asynccontextmanager
async def router_for(tmp_path: Path, agents: list[dict[str, Any]], **config: Any) -> AsyncIterator[RunningRouter]:
    path = write_agents(tmp_path / "servers.toml", agents, **config)
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
        yield r


@contextlib.contextmanager
def agents(tmp_path: Path, *catalogs: str, **kw: Any) -> Any:
    started: list[Agent] = []
    try:
        for catalog in catalogs:
            started.append(Agent(tmp_path, catalog, **kw).start())
        yield started
    finally:
        for a in started:
            a.stop()


def client(router: RunningRouter) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)


async def chat(c: openai.AsyncOpenAI, model_name: str, max_tokens: int = 4) -> tuple[str, str]:
    """(answer text, x-mvllm-node) of one chat request."""
    raw = await c.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens
    )
    text = raw.parse().choices[0].message.content or ""
    return text, raw.headers.get("x-mvllm-node", "")


def node_entry(router: RunningRouter, name: str) -> dict[str, Any]:
    return next(n for n in load_stats_snapshot(router.state)["nodes"] if n["name"] == name)


def instance(router: RunningRouter, node: str, inst: str) -> dict[str, Any]:
    return next(i for i in node_entry(router, node)["agent"]["instances"] if i["name"] == inst)


async def admin(router: RunningRouter, path: str) -> tuple[int, dict[str, Any], str]:
    async with aiohttp.ClientSession() as s, s.post(router.url + path) as resp:
        return resp.status, await resp.json(), resp.headers.get("x-mvllm-node", "")


# ----------------------------------------------------------------------------------------------- tests


async def test_a_stopped_model_loads_through_the_router_and_concurrent_requests_share_the_load(tmp_path):
    slow_start = "sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 1.0 }"
    catalog = model("cold", 'lora_adapters = { "cold-sql" = "/loras/sql" }', sim=slow_start) + model("other")
    with agents(tmp_path, catalog) as (agent,):
        async with router_for(tmp_path, [agent_entry(agent, "gpu-a")]) as router:
            c = client(router)
            # Every catalog name is listed, loadable ones included, before anything runs.
            listed = {m.id: m for m in (await c.models.list()).data}
            assert set(listed) == {"cold", "cold-sql", "other"}
            assert agent.inst("cold")["state"] == "stopped"

            t0 = time.monotonic()
            answers = await asyncio.gather(*(chat(c, "cold") for _ in range(6)))
            took = time.monotonic() - t0
            assert all(text for text, _ in answers) and {n for _, n in answers} == {"gpu-a"}
            inst = agent.inst("cold")
            assert inst["state"] == "ready" and inst["loads"] == 1, inst  # one load for all six
            assert 1.0 <= took < 30, took  # they waited for the engine's 1 s start
            assert agent.inst("other")["state"] == "stopped"

            # The LoRA adapter routes to its base engine; a stream is relayed through both hops.
            text, node = await chat(c, "cold-sql")
            assert text and node == "gpu-a"
            stream = await c.chat.completions.create(
                model="cold", messages=[{"role": "user", "content": "count"}], max_tokens=12, stream=True
            )
            pieces = [ch.choices[0].delta.content async for ch in stream if ch.choices and ch.choices[0].delta.content]
            assert len(pieces) >= 6

            await wait_until_async(lambda: instance(router, "gpu-a", "cold")["state"] == "ready", 5, what="router sees it awake")
            entry = node_entry(router, "gpu-a")
            assert entry["kind"] == "agent" and entry["error"] is None and entry["healthy"]
            assert entry["agent"]["engine"] == "sim" and entry["agent"]["gpus"][0]["simulated"]
            assert {c["name"] for c in entry["agent"]["catalog"]} == {"cold", "other"}
            cold = instance(router, "gpu-a", "cold")
            assert cold["router"]["rank"] == "awake" and cold["loras"] == ["cold-sql"]
            assert instance(router, "gpu-a", "other")["router"]["rank"] == "fits"
            await c.close()


async def test_a_sleeping_model_is_woken_rather_than_loaded_cold_elsewhere_and_admin_lifecycle(tmp_path):
    with agents(tmp_path, model("m"), model("m")) as (a, b):
        async with router_for(tmp_path, [agent_entry(a, "a"), agent_entry(b, "b")]) as router:
            status, body, node = await admin(router, "/admin/models/m/load?node=a")
            assert (status, body["state"], node) == (200, "ready", "a")
            status, body, node = await admin(router, "/admin/models/m/sleep?node=a&level=1")
            assert (status, body["state"], body["sleep_level"], node) == (200, "sleeping", 1, "a")

            c = client(router)
            for _ in range(4):
                text, node = await chat(c, "m")
                assert text and node == "a"
            assert a.inst("m")["state"] == "ready" and a.inst("m")["loads"] == 1  # woken, not reloaded
            assert b.inst("m")["state"] == "stopped" and b.inst("m")["loads"] == 0

            # Without ?node: sleep and unload act where the model is, wake where it sleeps, and a
            # load goes where a request would.
            assert (await admin(router, "/admin/models/m/sleep?level=2"))[0::2] == (200, "a")
            assert a.inst("m")["sleep_level"] == 2
            status, body, node = await admin(router, "/admin/models/m/wake")
            assert (status, body["state"], node) == (200, "ready", "a")
            status, body, node = await admin(router, "/admin/models/m/load")
            assert (status, body["state"], node) == (200, "ready", "a")  # awake there: nothing to do
            status, body, node = await admin(router, "/admin/models/m/unload")
            assert (status, body["state"], node) == (200, "stopped", "a")

            # Errors, in OpenAI form.
            for path, code in [
                ("/admin/models/m/sleep", 409),  # awake nowhere
                ("/admin/models/m/wake", 409),  # asleep nowhere
                ("/admin/models/m/sleep?level=3", 400),
                ("/admin/models/m/load?level=1", 400),
                ("/admin/models/m/load?node=nope", 404),
                ("/admin/models/nope/load", 404),
            ]:
                status, body, _ = await admin(router, path)
                assert status == code and body["error"]["message"], (path, body)

            # Both stopped, both with room: concurrent requests all go to one of them, one load.
            await wait_until_async(lambda: instance(router, "a", "m")["state"] == "stopped", 5, what="router sees the unload")
            answers = await asyncio.gather(*(chat(c, "m") for _ in range(6)))
            nodes = {node for _, node in answers}
            assert all(text for text, _ in answers) and len(nodes) == 1, answers
            chosen, other = (a, b) if nodes == {"a"} else (b, a)
            assert chosen.inst("m")["state"] == "ready" and other.inst("m")["state"] == "stopped"
            assert a.inst("m")["loads"] + b.inst("m")["loads"] == 2  # the first load on a, and one more
            status, body, node = await admin(router, "/admin/models/m/load")
            assert (status, body["state"]) == (200, "ready") and node in nodes  # where it is awake
            await c.close()


async def test_two_agents_a_model_each_and_a_shared_model_balanced(tmp_path):
    shared = model("shared", "preload = true", sim=SLOW)
    with agents(tmp_path, model("alpha") + shared, model("beta") + shared) as (a, b):
        async with router_for(tmp_path, [agent_entry(a, "a"), agent_entry(b, "b")]) as router:
            c = client(router)
            assert (await chat(c, "alpha"))[1] == "a"
            assert (await chat(c, "beta"))[1] == "b"
            assert a.inst("alpha")["loads"] == 1 and b.inst("beta")["loads"] == 1

            await wait_until_async(
                lambda: all(instance(router, n, "shared")["state"] == "ready" for n in ("a", "b")),
                20, what="the preloaded model awake on both agents, as the router sees it",
            )
            # 24 overlapping requests (~0.2 s each) for the model awake on both agents.
            answers = await asyncio.gather(*(chat(c, "shared", max_tokens=20) for _ in range(24)))
            per_node = Counter(node for _, node in answers)
            assert all(text for text, _ in answers)
            assert set(per_node) == {"a", "b"} and min(per_node.values()) >= 3, per_node
            assert a.inst("shared")["loads"] == b.inst("shared")["loads"] == 1  # no extra loads
            await c.close()


async def test_three_models_room_for_two_one_agent_each_in_turn(tmp_path):
    """Issue 4's "done when", through the router."""
    huge = model("huge").replace("memory_gib = 10", "memory_gib = 30")  # never fits the 24 GiB GPU
    with agents(tmp_path, model("ev-a") + model("ev-b") + model("ev-c") + huge, sim_gpus=(24,)) as (agent,):
        async with router_for(tmp_path, [agent_entry(agent, "gpu")]) as router:
            c = client(router)
            # No room even after evicting everything: the agent says so at once (its /state said
            # "no room", but that is never final), and the router's 503 names the reason.
            with pytest.raises(openai.APIStatusError) as exc:
                await chat(c, "huge")
            assert exc.value.status_code == 503 and exc.value.response.headers.get("retry-after")
            assert exc.value.response.headers.get("x-mvllm-node") == "-"
            assert exc.value.code == "no_room", exc.value.body
            message = exc.value.body["message"]
            assert message.startswith("no room on any agent for model `huge`: gpu: not enough GPU memory"), message
            assert agent.inst("huge")["state"] == "stopped" and agent.inst("huge")["queued"] == 0
            order = ["ev-a", "ev-b", "ev-c", "ev-a", "ev-b", "ev-c"]
            for n, name in enumerate(order):
                text, node = await chat(c, name)
                assert text and node == "gpu", (n, name)
                st = {i["name"]: i for i in agent.state()["instances"]}
                assert st[name]["state"] == "ready"
                assert sum(i["state"] == "ready" for i in st.values()) <= 2
                if n >= 2:  # the least recently used of the three made room
                    lru = order[n - 2]
                    assert st[lru]["state"] in ("sleeping", "stopped"), (n, {k: i["state"] for k, i in st.items()})
            await c.close()
            await wait_until_async(lambda: node_entry(router, "gpu")["agent"]["gpus"][0]["memory_used_bytes"] > 0, 5)
        engines = [i["pid"] for i in agent.state()["instances"] if i["pid"]]
        assert len(engines) == 3 and agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGTERM)
        assert agent.proc.popen.wait(timeout=30) == 0
        assert marked_processes(agent.proc.pid) == []  # nothing left running


async def test_a_model_switch_waits_for_the_busy_model_then_evicts_it_once_idle(tmp_path):
    """Two models that do not fit together. While `big-a` answers a long request, the router's
    /state says "no room" for `big-b` (a busy model is not evictable); a request for `big-b` then
    goes to the agent anyway, waits there for `big-a` to finish and gets its answer, with no 503
    and no retry, and `big-a` is evicted only once idle."""
    slow = "sim = { ttft_ms = 5, itl_ms = 10, weights_gib = 2 }"  # 300 tokens: ~3 s
    catalog = (model("big-a", sim=slow) + model("big-b")).replace("memory_gib = 10", "memory_gib = 20")
    with agents(tmp_path, catalog, sim_gpus=(24,)) as (agent,):
        async with router_for(tmp_path, [agent_entry(agent, "gpu")]) as router:
            c = client(router)
            assert (await chat(c, "big-a"))[0]
            finished: dict[str, float] = {}

            async def ask(name: str, max_tokens: int) -> Any:
                r = await c.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "long"}], max_tokens=max_tokens
                )
                finished[name] = time.monotonic()
                return r

            long = asyncio.ensure_future(ask("big-a", 300))
            await wait_until_async(
                lambda: instance(router, "gpu", "big-a")["in_flight"] == 1
                and instance(router, "gpu", "big-b")["router"]["rank"] == "no_room",
                10, what="the router's /state: big-a busy, no room for big-b",
            )
            switch = asyncio.ensure_future(ask("big-b", 4))
            await wait_until_async(lambda: agent.inst("big-b")["queued"] == 1, 10, what="big-b's request waits at the agent")
            assert not long.done(), "big-a's request ended too early to prove anything"
            assert agent.inst("big-a")["state"] == "ready" and agent.inst("big-a")["in_flight"] == 1
            assert not switch.done()

            a_answer, b_answer = await asyncio.gather(long, switch)
            # big-a's answer is whole (never cut by an eviction), and big-b's came after it.
            assert a_answer.choices[0].finish_reason == "length" and a_answer.usage.completion_tokens == 300
            assert b_answer.choices[0].message.content
            assert finished["big-b"] > finished["big-a"]
            assert agent.inst("big-a")["state"] == "sleeping" and agent.inst("big-b")["state"] == "ready"
            log = (tmp_path / f"agent-{agent.port}.log").read_text()
            waited = log.index("big-b: waiting (up to")
            assert "for big-a to finish answering requests" in log[waited:].splitlines()[0]
            assert log.index("evicting big-a (sleep level 1) to make room for big-b") > waited
            retries = [ln for ln in (await router_metrics(router)).splitlines() if ln.startswith("mvllm_retries_total{")]
            assert not any('model="big-b"' in ln for ln in retries), retries  # one attempt, no 503 on the way
            await c.close()


async def router_metrics(router: RunningRouter) -> str:
    async with aiohttp.ClientSession() as s, s.get(router.url + "/metrics") as resp:
        return await resp.text()


async def test_agent_down_fails_over_then_503_then_readmitted(tmp_path):
    with agents(tmp_path, model("m", "preload = true"), model("m")) as (a, b):
        async with router_for(tmp_path, [agent_entry(a, "a"), agent_entry(b, "b")]) as router:
            await wait_until_async(lambda: instance(router, "a", "m")["state"] == "ready", 20, what="m awake on a")
            c = client(router)
            assert (await chat(c, "m"))[1] == "a"

            a.stop()  # agent and its engine gone
            text, node = await chat(c, "m")  # retried on b, which loads it
            assert text and node == "b"
            await wait_until_async(lambda: node_entry(router, "a")["health"] == "down", 10, what="a down")
            assert not node_entry(router, "a")["healthy"] and node_entry(router, "a")["error"]
            assert (await chat(c, "m"))[1] == "b"

            b.stop()
            await wait_until_async(lambda: node_entry(router, "b")["health"] == "down", 10, what="b down")
            with pytest.raises(openai.APIStatusError) as exc:
                await chat(c, "m")
            assert exc.value.status_code == 503 and exc.value.response.headers.get("retry-after")
            assert "m" in [m.id for m in (await c.models.list()).data]  # known, just unavailable

            a.start()  # same port and config: it comes back with m stopped
            await wait_until_async(lambda: node_entry(router, "a")["healthy"], 10, what="a re-admitted")
            text, node = await chat(c, "m")
            assert text and node == "a"
            await c.close()


async def test_wrong_agent_token_is_reported_once_and_never_passed_to_the_client(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mvllm.router")
    with agents(tmp_path, model("m", "preload = true")) as (agent,):
        entry = agent_entry(agent, "a", token="wrong-token")
        async with router_for(tmp_path, [entry]) as router:
            await wait_until_async(lambda: node_entry(router, "a")["error"], 5, what="the error shown")
            await asyncio.sleep(1.0)  # ~10 scrape cycles with the same answer
            err = node_entry(router, "a")["error"]
            assert "rejected the router's token" in err and "401" in err
            assert not node_entry(router, "a")["healthy"]
            logged = [r for r in caplog.records if "rejected the router's token" in r.getMessage()]
            assert len(logged) == 1, [r.getMessage() for r in logged]  # once, not once per scrape
            c = client(router)
            with pytest.raises(openai.NotFoundError) as exc:
                await chat(c, "m")  # its catalog is unknown, and the 404 says why
            assert "rejected the router's token" in exc.value.message

            # Fixed by a config reload: the agent is read and serves.
            path = tmp_path / "servers.toml"
            write_agents(path, [agent_entry(agent, "a")])
            assert await reload_config(router.state, path)
            await wait_until_async(lambda: node_entry(router, "a")["healthy"], 5, what="token accepted")
            assert (await chat(c, "m"))[1] == "a"

            # The agent's token changes under the router (no scrape in between): the router must
            # not hand the agent's 401 to its client as if the client's key were wrong.
            write_agents(path, [agent_entry(agent, "a")], scrape_interval=60, health_check_interval=60)
            assert await reload_config(router.state, path)
            agent.stop()
            agent.config.write_text(agent.config.read_text().replace(f'token = "{TOKEN}"', 'token = "rotated"'))
            agent.start()
            with pytest.raises(openai.APIStatusError) as exc:
                await chat(c, "m")
            assert exc.value.status_code == 502 and "rejected the router's token" in exc.value.message
            await c.close()
