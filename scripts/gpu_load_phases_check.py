"""Load phases, measured timings, Retry-After and sleep before stop on real vLLM (issue 17).

One agent (warm launcher on, a state_dir, load_timeout short enough that a cold request gives up),
the tiny model, and these legs, each printed as `PASS|FAIL leg detail`:
  cold-1     a request while nothing is measured: 503 + Retry-After (H200 table), the phases seen
             in /state while it loads, then the measured cold start
  cold-2     unloaded, asked again: Retry-After from the last cold start, and the predicted time
             left against what the load still took
  wakes      sleep 1 + wake, sleep 2 + wake: wake_1_s and wake_2_s measured
  unload     idle timers: level 1 at idle_timeout, level 2 at unload_timeout (the same engine,
             through a wake), then a request wakes it from level 2 with the same greedy output
  restart    a new agent on the same state_dir reports the same timings before any load

  GPU machine:  bash .gpu/bin/install.sh && source /root/vllm-env.sh && python3 scripts/gpu_load_phases_check.py
  here (sim):   PHASES_CHECK_ENGINE=sim .venv/bin/python scripts/gpu_load_phases_check.py
Files under $OUT: phases.log, summary.json, agent.log, tiny.log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

from gpu_lib import call, stop
from gpu_lib import start_agent as gpu_lib_start_agent

ENGINE = os.environ.get("PHASES_CHECK_ENGINE", "vllm")
OUT = os.environ.get("OUT", "/tmp/gpu_phases_out")
MODEL = os.environ.get("PHASES_CHECK_MODEL", "/root/tiny/tiny-llama")
WORK = os.environ.get("PHASES_CHECK_WORK", "/tmp/mvllm-phases-check")
TOKEN = "phases-check-token"
PORT = 17474
BASE = f"http://127.0.0.1:{PORT}"
LOAD_TIMEOUT = 4.0 if ENGINE == "vllm" else 0.5
IDLE, UNLOAD, STOP = (8, 14, 40) if ENGINE == "vllm" else (1, 2, 10)
summary: dict = {"engine": ENGINE, "legs": {}}
ok_all = True
logf = None


def say(line: str) -> None:
    print(line, flush=True)
    if logf is not None:
        logf.write(line + "\n")
        logf.flush()


def verdict(leg: str, ok: bool, detail: object) -> None:
    global ok_all
    ok_all = ok_all and ok
    summary["legs"][leg] = {"ok": ok, "detail": detail}
    say(f"{'PASS' if ok else 'FAIL'} {leg} {json.dumps(detail)}")


def api(method: str, path: str, body: dict | None = None, timeout: float = 300.0) -> tuple[int, dict, bytes]:
    return call(BASE, TOKEN, method, path, body, timeout)


def inst() -> dict:
    return next(i for i in json.loads(api("GET", "/state")[2])["instances"] if i["name"] == "tiny")


def complete() -> tuple[int, dict, str]:
    code, headers, raw = api("POST", "/v1/completions", {"model": "tiny", "prompt": "The capital of France is",
                                                          "max_tokens": 12, "temperature": 0})
    text = json.loads(raw)["choices"][0]["text"] if code == 200 else raw.decode()[:300]
    return code, headers, text


NO_TIMERS = "idle_timeout = 0\nunload_timeout = 0\n"


def config(timers: str = NO_TIMERS) -> str:
    if ENGINE == "sim":
        engine, tables, sim = 'engine = "sim"\n', "[[sim_gpus]]\nmemory_gib = 80\n", "sim = { startup_s = 3 }\n"
    else:
        engine, tables, sim = 'engine = "vllm"\nengine_binary = "vllm"\n', "", ""
    path = os.path.join(WORK, "agent.toml")
    with open(path, "w") as f:
        f.write(f'''host = "127.0.0.1"
port = {PORT}
token = "{TOKEN}"
{engine}engine_port_range = [18270, 18280]
log_dir = "{WORK}/logs"
engine_cache_dir = "{WORK}/engine-cache"
state_dir = "{WORK}/state"
load_timeout = {LOAD_TIMEOUT}
ready_timeout = 400
{timers}{tables}
[models.tiny]
model = "{MODEL}"
gpu_memory_utilization = 0.3
max_model_len = 512
{sim}''')
    return path


def start_agent(timers: str = NO_TIMERS) -> subprocess.Popen:
    return gpu_lib_start_agent(sys.executable, config(timers), open(os.path.join(OUT, "agent.log"), "a"), BASE, TOKEN)


def stop_agent(agent: subprocess.Popen) -> None:
    stop(agent)


def standby_ready(count: int, limit: float = 180) -> bool:
    if ENGINE == "sim":
        return True  # no warm launcher for the simulator
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with open(os.path.join(OUT, "agent.log"), errors="replace") as f:
            if f.read().count("ready (imports") >= count:
                return True
        time.sleep(0.5)
    return False


def watch_load(limit: float = 400) -> list[dict]:
    """/state's `load` every 0.2 s until the model is ready: (t, phase, elapsed, remaining)."""
    seen: list[dict] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        i = inst()
        load = i.get("load")
        if load:
            row = {"t": round(time.monotonic() - t0, 2), "phase": load["phase"], "elapsed_s": round(load["elapsed_s"], 2),
                   "remaining_s": None if load["remaining_s"] is None else round(load["remaining_s"], 1)}
            if not seen or seen[-1]["phase"] != row["phase"]:
                seen.append(row)
        if i["state"] == "ready":
            break
        time.sleep(0.2)
    return seen


def cold_leg(leg: str) -> None:
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(zip(("code", "headers", "text"), complete(), strict=True)))
    t0 = time.monotonic()
    t.start()
    phases = watch_load()
    ready_after = time.monotonic() - t0
    t.join()
    i = inst()
    retry = result["headers"].get("Retry-After")
    detail = {"status": result["code"], "retry_after": retry, "phases": phases, "ready_after_s": round(ready_after, 1),
              "timings": i["timings"]}
    order = ["spawned", "imported", "weights", "compile", "kv_cache", "graphs", "ready"]
    names = [p["phase"] for p in phases]
    ok = (result["code"] == 503 and retry is not None and int(retry) >= 1 and i["state"] == "ready"
          and len(names) >= 3 and names == sorted(names, key=order.index) and i["timings"]["cold_start_s"] is not None)
    verdict(leg, ok, detail)


def main() -> None:
    global logf
    os.makedirs(OUT, exist_ok=True)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    logf = open(os.path.join(OUT, "phases.log"), "w")
    agent = start_agent()
    try:
        say(f"INFO standby ready: {standby_ready(1)}")
        cold_leg("cold-1")
        api("POST", "/models/tiny/unload")
        standby_ready(2)
        cold_leg("cold-2")
        code, _, reference = complete()
        for level in (1, 2):
            api("POST", f"/models/tiny/sleep?level={level}")
            api("POST", "/models/tiny/wake")
        code2, _, after = complete()
        t = inst()["timings"]
        verdict("wakes", code == code2 == 200 and after == reference and t["wake_1_s"] is not None
                and t["wake_2_s"] is not None, {"timings": t, "same_output": after == reference})
    finally:
        stop_agent(agent)
    # The idle timers with sleep before stop, on a fresh agent (the same state_dir).
    agent = None
    try:
        t0 = time.monotonic()
        agent = start_agent(f"idle_timeout = {IDLE}\nunload_timeout = {UNLOAD}\nstop_idle_timeout = {STOP}\n")
        before = inst()["timings"]
        verdict("restart", before.get("cold_start_s") is not None and before == t, {"timings": before})
        standby_ready(3)
        api("POST", "/models/tiny/load?wait=false")  # (a request would give up after load_timeout)
        end = time.monotonic() + 400
        while inst()["state"] != "ready" and time.monotonic() < end:
            time.sleep(0.2)
        code, _, text1 = complete()
        pid = inst()["pid"]
        track = []
        end = time.monotonic() + UNLOAD + 15
        while time.monotonic() < end:
            i = inst()
            row = (i["state"], i["sleep_level"])
            if not track or track[-1]["at"] != row:
                track.append({"t": round(time.monotonic() - t0, 1), "at": row, "pid": i["pid"]})
            if row == ("sleeping", 2):
                break
            time.sleep(0.2)
        i = inst()
        code2, _, text2 = complete()
        verdict("unload", code == code2 == 200 and i["state"] == "sleeping" and i["sleep_level"] == 2 and i["pid"] == pid
                and text2 == text1, {"track": track, "same_output": text2 == text1, "codes": [code, code2], "texts": [text1, text2], "timings": inst()["timings"]})
    finally:
        if agent is not None:
            stop_agent(agent)
        log_src = os.path.join(WORK, "logs", "tiny.log")
        if os.path.exists(log_src):
            shutil.copy(log_src, os.path.join(OUT, "tiny.log"))
        with open(os.path.join(OUT, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        say(f"{'PASS' if ok_all else 'FAIL'} all")


if __name__ == "__main__":
    main()
