"""The agent with `engine = "sim"`: real agent and engine processes on 127.0.0.1, the openai client via its /v1.

Covers: load on first request (concurrent requests share one load), stream relay, idle → sleep →
stop on timers, a killed engine restarting, SIGTERM leaving no engine behind, stale engines of a
dead agent reported and reaped, bad token 401, unknown model 404, the lifecycle API and LoRA.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from tests.integration.agent_support import (
    TOKEN,
    Agent,
    marked_processes,
    model,
    pid_alive,
    running_agent,
)
from tests.support import wait_until

GIB = 1024**3


# ----------------------------------------------------------------------------- tests


async def test_first_request_loads_and_concurrent_requests_share_one_load(tmp_path):
    catalog = model("m1", sim="sim = { ttft_ms = 5, itl_ms = 20, weights_gib = 2, startup_s = 1.0 }")
    with running_agent(tmp_path, catalog) as agent:
        assert agent.inst("m1")["state"] == "stopped"
        client = agent.aclient()

        async def ask(i: int) -> str:
            r = await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
            )
            return r.choices[0].message.content

        answers = await asyncio.gather(*(ask(i) for i in range(8)))
        assert all(answers), answers
        inst = agent.inst("m1")
        assert inst["state"] == "ready" and inst["loads"] == 1 and pid_alive(inst["pid"])
        assert inst["port"] and inst["memory_bytes"] == 10 * GIB  # measured from the sim engine

        # The stream is relayed as it is produced: the first chunk comes well before the last.
        t0 = time.monotonic()
        stamps = []
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "count"}], max_tokens=40, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.monotonic() - t0)
        assert len(stamps) >= 20
        assert stamps[-1] - stamps[0] > 0.3, stamps  # 40 tokens x 20 ms, not one buffered burst
        await client.close()

        code, raw = agent.api("GET", "/v1/models")
        assert code == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["m1"]


def test_idle_model_sleeps_then_stops_then_loads_again(tmp_path):
    # Stopped at unload_timeout as it was before sleep_on_unload (test_agent_coldstart has that path).
    catalog = model("idle", "idle_timeout = 1\nunload_timeout = 3\nsleep_level_on_idle = 1\nsleep_on_unload = false")
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        assert agent.chat("idle")
        pid = agent.inst("idle")["pid"]
        t0 = time.monotonic()
        asleep = wait_until(lambda: (i := agent.inst("idle"))["state"] == "sleeping" and i, 10, "idle model asleep")
        slept_after = time.monotonic() - t0
        assert asleep["sleep_level"] == 1 and pid_alive(pid)
        st = agent.state()
        assert st["gpus"][0]["memory_used_bytes"] == asleep["memory_bytes"] == GIB // 2  # the sim's residual
        wait_until(lambda: agent.inst("idle")["state"] == "stopped", 10, "sleeping model stopped")
        stopped_after = time.monotonic() - t0
        assert not pid_alive(pid)
        assert agent.state()["gpus"][0]["memory_used_bytes"] == 0
        # Generous bounds both ways: the timers, not something else, moved it.
        assert 0.3 <= slept_after <= 5 and 1.5 <= stopped_after <= 8, (slept_after, stopped_after)
        assert agent.chat("idle")
        assert agent.inst("idle")["loads"] == 2


def test_killed_engine_restarts(tmp_path):
    with running_agent(tmp_path, model("crashy")) as agent:
        assert agent.chat("crashy")
        pid = agent.inst("crashy")["pid"]
        os.killpg(pid, signal.SIGKILL)
        inst = wait_until(
            lambda: (i := agent.inst("crashy"))["state"] == "ready" and i["pid"] != pid and i, 20, "engine restarted"
        )
        assert inst["restarts"] == 1
        assert agent.chat("crashy")
        _code, raw = agent.api("GET", "/metrics")
        assert 'mvllm_agent_engine_crashes_total{model="crashy"} 1.0' in raw.decode()


def test_sigterm_to_agent_leaves_no_engine(tmp_path):
    catalog = model("t1") + model("t2")
    agent = Agent(tmp_path, catalog, sim_gpus=(80,)).start()
    try:
        assert agent.chat("t1") and agent.chat("t2")
        assert agent.api("POST", "/models/t2/sleep?level=2")[0] == 200
        engines = [i["pid"] for i in agent.state()["instances"]]
        assert all(engines) and all(pid_alive(p) for p in engines)
        assert len(marked_processes(agent.proc.pid)) == 2
        os.kill(agent.proc.pid, signal.SIGTERM)  # the agent alone, as systemd's KillMode=mixed does
        assert agent.proc.popen.wait(timeout=30) == 0
        assert not any(pid_alive(p) for p in engines)
        assert marked_processes(agent.proc.pid) == []
        log = agent.proc.log()
        assert "shutdown: stopping t2" in log and "shutdown: stopping t1" in log
        # Most recently started first.
        assert log.index("shutdown: stopping t2") < log.index("shutdown: stopping t1")
    finally:
        agent.stop()


def test_stale_engines_are_reported_then_reaped(tmp_path):
    catalog = model("st")
    first = Agent(tmp_path, catalog).start()
    second = Agent(tmp_path, catalog)
    try:
        assert first.chat("st")
        engine_pid = first.inst("st")["pid"]
        first.proc.popen.send_signal(signal.SIGKILL)  # the agent dies; its engine (own session) lives
        first.proc.popen.wait(timeout=10)
        assert pid_alive(engine_pid)
        # Tests running at the same time on this host may have stale engines too (the agent rightly
        # reports every one): look only at the processes carrying our dead agent's launch marker.
        ours = set(marked_processes(first.pids[0]))
        assert ours == {engine_pid}

        second.start()
        stale = [s for s in second.state()["stale_engines"] if s["pid"] in ours]
        assert [s["pid"] for s in stale] == [engine_pid] and stale[0]["instance"] == "st" and not stale[0]["reaped"]
        assert pid_alive(engine_pid)  # reported, left alone
        second.stop()

        second.start("--reap-stale")
        stale = [s for s in second.state()["stale_engines"] if s["pid"] in ours]
        assert [s["pid"] for s in stale] == [engine_pid] and stale[0]["reaped"]
        assert not pid_alive(engine_pid)
    finally:
        first.stop()
        second.stop()


def test_bad_token_unknown_model_and_bad_requests(tmp_path):
    with running_agent(tmp_path, model("auth")) as agent:
        bad = openai.OpenAI(base_url=f"{agent.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="auth", messages=[{"role": "user", "content": "x"}])
        for path in ("/state", "/metrics", "/models/auth/logs"):
            code, raw = agent.api("GET", path, token="wrong")
            assert code == 401 and json.loads(raw)["error"]["type"] == "authentication_error", path
        assert agent.api("GET", "/state", token=None)[0] == 401
        assert agent.api("GET", "/health", token=None)[0] == 200

        with pytest.raises(openai.NotFoundError) as exc:
            agent.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["code"] == "model_not_found"
        assert agent.inst("auth")["state"] == "stopped"  # an unknown model loads nothing

        code, raw = agent.api("POST", "/models/nope/load")
        assert code == 404 and "nope" in json.loads(raw)["error"]["message"]
        code, raw = agent.api("POST", "/models/auth/sleep?level=1")
        assert code == 409  # a stopped model cannot sleep
        code, raw = agent.api("POST", "/models/auth/sleep?level=7")
        assert code == 400
        req = urllib.request.Request(
            f"{agent.url}/v1/chat/completions", data=b"{not json", method="POST",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as http_exc:
            urllib.request.urlopen(req, timeout=10)
        assert http_exc.value.code == 400
        assert json.loads(http_exc.value.read())["error"]["message"] == "request body is not valid JSON"
        code, raw = agent.api("GET", "/no/such/route")
        assert code == 404 and json.loads(raw)["error"]["code"] == 404


def test_lifecycle_api_sleep_levels_and_lora(tmp_path):
    # Level 2 on a model without LoRA; a LoRA model asked for level 2 sleeps at level 1 (vLLM 0.25
    # cannot reload LoRA-enabled weights after level 2, and the sim reproduces that crash).
    catalog = model("life", 'lora_adapters = { "life-sql" = "/loras/sql" }') + model("plain")
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        for name in ("life", "plain"):
            code, raw = agent.api("POST", f"/models/{name}/load")
            assert code == 200 and json.loads(raw)["state"] == "ready"
        c = agent.client()

        def greedy(m: str) -> str:
            return c.completions.create(model=m, prompt="The capital of France is", max_tokens=8, temperature=0).choices[0].text

        before = {m: greedy(m) for m in ("life", "plain", "life-sql")}
        assert all(before.values())
        pids = {m: agent.inst(m)["pid"] for m in ("life", "plain")}
        for level in (1, 2):
            code, raw = agent.api("POST", f"/models/plain/sleep?level={level}")
            assert code == 200, raw
            inst = json.loads(raw)
            assert inst["state"] == "sleeping" and inst["sleep_level"] == level
            assert inst["memory_bytes"] == GIB // 2  # measured after the sleep
            assert agent.inst("plain")["sleep_level"] == level
            code, raw = agent.api("POST", "/models/plain/wake")
            assert code == 200 and json.loads(raw)["state"] == "ready"
            # After level 2 the sim, like vLLM, answers empty text unless reload_weights ran.
            assert greedy("plain") == before["plain"], level

        # A sleeping model wakes for a request (level from the JSON body this time).
        assert agent.api("POST", "/models/plain/sleep", {"level": 2})[0] == 200
        assert agent.inst("plain")["sleep_level"] == 2
        assert greedy("plain") == before["plain"]
        assert agent.inst("plain")["state"] == "ready"

        # The LoRA model: level 1 as asked; level 2 asked (query, then JSON body) ends at level 1.
        for asked in (1, 2):
            code, raw = agent.api("POST", f"/models/life/sleep?level={asked}")
            assert code == 200, raw
            inst = json.loads(raw)
            assert inst["state"] == "sleeping" and inst["sleep_level"] == 1, (asked, inst)
            assert inst["memory_bytes"] == GIB // 2
            assert agent.inst("life")["sleep_level"] == 1
            # Asking again for what it already is (level 2 meaning 1 here) changes nothing.
            code, raw = agent.api("POST", f"/models/life/sleep?level={asked}")
            assert code == 200 and json.loads(raw)["sleep_level"] == 1
            code, raw = agent.api("POST", "/models/life/wake")
            assert code == 200 and json.loads(raw)["state"] == "ready", raw
            assert greedy("life") == before["life"] and greedy("life-sql") == before["life-sql"], asked
        assert agent.api("POST", "/models/life/sleep", {"level": 2})[0] == 200
        assert agent.inst("life")["sleep_level"] == 1
        assert greedy("life-sql") == before["life-sql"]  # woken by the request, LoRA still there
        life = agent.inst("life")
        assert life["state"] == "ready" and life["pid"] == pids["life"]
        assert life["restarts"] == 0 and life["loads"] == 1 and life["error"] is None
        assert agent.inst("plain")["pid"] == pids["plain"]
        entry = next(e for e in agent.state()["catalog"] if e["name"] == "life")
        assert entry["sleep_level_on_idle"] == 1
        warned = [ln for ln in agent.proc.log().splitlines() if "sleeping at level 1 instead of 2" in ln]
        assert len(warned) == 1 and "life" in warned[0] and "enable-lora" in warned[0], warned

        # The catalog adapter is loaded at start and routable as a model.
        assert agent.inst("life")["loras"] == ["life-sql"]
        r = c.chat.completions.create(model="life-sql", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert r.model == "life-sql"
        ids = [m["id"] for m in json.loads(agent.api("GET", "/v1/models")[1])["data"]]
        assert ids == ["life", "life-sql", "plain"]

        # One loaded by hand, then unloaded: routable in between, 404 after.
        code, raw = agent.api("POST", "/models/life/lora", {"action": "load", "lora_name": "extra", "lora_path": "/l/x"})
        assert code == 200 and "extra" in json.loads(raw)["loras"]
        assert c.chat.completions.create(model="extra", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert agent.api("POST", "/models/life/lora", {"action": "unload", "lora_name": "extra"})[0] == 200
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="extra", messages=[{"role": "user", "content": "x"}], max_tokens=2)

        code, raw = agent.api("GET", "/models/life/logs?tail=3")
        lines = raw.decode().splitlines()
        assert code == 200 and 0 < len(lines) <= 3
        code, raw = agent.api("GET", "/metrics")
        text = raw.decode()
        assert 'mvllm_agent_instance_state{model="life",state="ready"} 1.0' in text
        assert 'vllm:num_requests_running{instance="life",' in text
        assert text.count("# TYPE vllm:num_requests_running gauge") == 1
        assert 'mvllm_agent_wakes_total{level="2",model="plain"} 2.0' in text
        assert 'mvllm_agent_wakes_total{level="1",model="life"} 3.0' in text
        assert 'mvllm_agent_sleeps_total{level="1",model="life",reason="api"} 3.0' in text
        assert 'model="life"' in text and 'level="2",model="life"' not in text
        assert 'mvllm_agent_engine_crashes_total{model="life"}' not in text

        for name in ("life", "plain"):
            code, raw = agent.api("POST", f"/models/{name}/unload")
            assert code == 200 and json.loads(raw)["state"] == "stopped"
        assert agent.state()["gpus"][0]["memory_used_bytes"] == 0
