"""Cold starts seen from outside (issue 17): the load phase read from the engine's log while it
starts, the measured cold start and wake times in /state (kept across an agent restart through its
state_dir), and Retry-After of a request that gave up waiting on a load, from the time left."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from tests.integration.agent_support import TOKEN, Agent, model
from tests.support import wait_until

STARTUP_S = 1.2
CATALOG = model("cs", sim=f"sim = {{ startup_s = {STARTUP_S}, ttft_ms = 5, itl_ms = 2, weights_gib = 2 }}")


def chat(agent: Agent) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": "cs", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(f"{agent.url}/v1/chat/completions", data=body, method="POST")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_phases_timings_and_retry_after_from_the_last_cold_start(tmp_path):
    state_dir = tmp_path / "state"
    agent = Agent(tmp_path, CATALOG, top={"load_timeout": 0.4, "state_dir": str(state_dir)})
    agent.start()
    try:
        # Nothing measured yet: the first request gives up after load_timeout with the H200
        # table's time left (far above this sim's start), and the load goes on.
        code, headers, raw = chat(agent)
        assert code == 503, raw
        assert int(headers["Retry-After"]) >= 19, headers
        phases = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            inst = agent.inst("cs")
            if inst["state"] == "ready":
                break
            load = inst["load"]
            assert load is not None and load["kind"] == "cold", inst
            if not phases or phases[-1] != load["phase"]:
                phases.append(load["phase"])
            time.sleep(0.05)
        inst = agent.inst("cs")
        assert inst["state"] == "ready" and inst["load"] is None
        # The phase moved on in the log's order (sampled: some may fall between two looks).
        order = ["spawned", "imported", "weights", "compile", "kv_cache", "graphs", "ready"]
        assert len(phases) >= 3 and phases == sorted(phases, key=order.index), phases
        t = inst["timings"]
        assert STARTUP_S <= t["cold_start_s"] < STARTUP_S + 5, t
        assert t["cold_start_warm"] is False
        assert set(t["cold_start_phases"]) >= {"spawned", "imported", "kv_cache", "ready"}, t
        assert t["cold_start_phases"]["imported"] < t["cold_start_phases"]["kv_cache"] <= t["cold_start_phases"]["ready"]

        # Measured now: the next cold load's 503 says about what is left of it (~1.2 - 0.4 s).
        assert agent.api("POST", "/models/cs/unload")[0] == 200
        code, headers, raw = chat(agent)
        assert code == 503, raw
        assert 1 <= int(headers["Retry-After"]) <= 4, headers
        wait_until(lambda: agent.inst("cs")["state"] == "ready", 10, "second cold start")

        # Wakes from each level are measured too.
        for level in (1, 2):
            assert agent.api("POST", f"/models/cs/sleep?level={level}")[0] == 200
            assert agent.api("POST", "/models/cs/wake")[0] == 200
        t = agent.inst("cs")["timings"]
        assert t["wake_1_s"] is not None and t["wake_2_s"] is not None and 0 < t["wake_1_s"] < 2, t
        saved = json.loads((state_dir / "timings.json").read_text())["models"]["cs"]
        assert saved["wake_2_s"] == t["wake_2_s"] and saved["cold_start_s"] == t["cold_start_s"]
    finally:
        agent.stop()
    # A new agent on the same state_dir knows them before any load.
    agent.start()
    try:
        t2 = agent.inst("cs")["timings"]
        assert t2 == t, (t2, t)
    finally:
        agent.stop()


def test_unload_timeout_sleeps_at_level_2_with_room_then_stop_idle_timeout_stops(tmp_path):
    catalog = model(
        "deep",
        "idle_timeout = 0.4\nunload_timeout = 1.0\nstop_idle_timeout = 2.2\nsleep_level_on_idle = 1",
    )
    agent = Agent(tmp_path, catalog, sim_gpus=(24,))
    agent.start()
    try:
        assert agent.chat("deep")
        pid = agent.inst("deep")["pid"]
        t0 = time.monotonic()
        wait_until(lambda: agent.inst("deep")["sleep_level"] == 1, 5, "asleep at level 1 after idle_timeout")
        # unload_timeout with the GPU to spare: level 2 (through a wake: vLLM sleeps only an awake
        # engine), the same engine, not stopped.
        deep = wait_until(lambda: (i := agent.inst("deep"))["sleep_level"] == 2 and i, 5, "level 2 at unload_timeout")
        assert deep["state"] == "sleeping" and deep["pid"] == pid and deep["loads"] == 1
        assert time.monotonic() - t0 < 2.2
        _code, raw = agent.api("GET", "/metrics")
        assert 'mvllm_agent_sleeps_total{level="2",model="deep",reason="unload"} 1.0' in raw.decode()
        # Idle timers count from the last request: the deepening wake did not reset them.
        wait_until(lambda: agent.inst("deep")["state"] == "stopped", 5, "stopped at stop_idle_timeout")
        assert 2.0 <= time.monotonic() - t0 <= 5.0
    finally:
        agent.stop()
