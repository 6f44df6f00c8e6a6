#!/usr/bin/env bash
# Cold starts on real vLLM (issue 17): time from a request for a model no engine holds to its answer,
# with vLLM's defaults (torch.compile and CUDA graphs, no --enforce-eager), for
#   plain-1  a plain spawn, empty cache root            (today's first cold start)
#   plain-2  a plain spawn, the cache root of plain-1    (compile and graph caches reused)
#   warm-1   the warm launcher's standby, cached          (imports done ahead, caches reused)
#   warm-2   the standby that replaced it, cached         (the next cold start)
# Each answer is compared with the first leg's greedy output (COLD_CHECK_LEGS=plain,warm picks legs). Between legs the model is unloaded; the
# warm legs wait for the standby to be ready first (as an agent that has been up a minute would be).
#
#   GPU machine:  bash .gpu/bin/install.sh && source /root/vllm-env.sh && bash scripts/gpu_coldstart_check.sh
#   here (sim):   COLD_CHECK_ENGINE=sim PYTHON=.venv/bin/python OUT=/tmp/cs bash scripts/gpu_coldstart_check.sh
# Files under $OUT: coldstart.log, summary.json, agent-plain.log, agent-warm.log, engine.log.
set -u
source "$(dirname "$0")/gpu_lib.sh"
gpu_setup COLD_CHECK /tmp/gpu_cold_out /tmp/mvllm-cold-check
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/coldstart.log"
import json, os, shutil, subprocess, time

from scripts.gpu_lib import agent_toml, engine_keys, start_agent, stop
from scripts.gpu_lib import api as agent_api

ENGINE = os.environ["COLD_CHECK_ENGINE"]
OUT = os.environ["COLD_CHECK_OUT"]
PY = os.environ["COLD_CHECK_PY"]
MODEL = os.environ["COLD_CHECK_MODEL"]
WORK = os.environ["COLD_CHECK_WORK"]
TOKEN = "cold-check-token"
PORT = 17373
BASE = f"http://127.0.0.1:{PORT}"
CACHE = os.path.join(WORK, "engine-cache")
results = []


def api(method, path, body=None, timeout=300.0):
    return agent_api(BASE, TOKEN, method, path, body, timeout)


def config(warm):
    path = os.path.join(WORK, f"agent-{'warm' if warm else 'plain'}.toml")
    with open(path, "w") as f:
        f.write(agent_toml(ENGINE, PORT, TOKEN, (18170, 18180), f"{WORK}/logs", f'''engine_cache_dir = "{CACHE}"
warm_launcher = {"true" if warm else "false"}
load_timeout = 400
ready_timeout = 400
idle_timeout = 0
unload_timeout = 0''', f'''[models.tiny]
model = "{MODEL}"
gpu_memory_utilization = 0.3
max_model_len = 512
{engine_keys(ENGINE, "startup_s = 3", eager=False)}'''))
    return path


def cold_start(label):
    t = time.monotonic()
    code, raw = api("POST", "/v1/completions", {"model": "tiny", "prompt": "The capital of France is",
                                                 "max_tokens": 12, "temperature": 0})
    dt = time.monotonic() - t
    text = json.loads(raw)["choices"][0]["text"] if code == 200 else raw.decode()[:200]
    results.append({"leg": label, "status": code, "seconds": round(dt, 2), "text": text})
    print(f"INFO {label}: {code} in {dt:.1f} s: {text!r}", flush=True)
    code, _ = api("POST", "/models/tiny/unload")
    return dt


def standby_ready(log_path, count, limit=180):
    """Wait until the agent has said `count` times that a standby is ready."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with open(log_path, errors="replace") as f:
            if f.read().count("ready (imports") >= count:
                return True
        time.sleep(0.5)
    return False


def run_agent(warm):
    name = "warm" if warm else "plain"
    log_path = os.path.join(OUT, f"agent-{name}.log")
    log = open(log_path, "w")
    t0 = time.monotonic()
    agent = start_agent(PY, config(warm), log, BASE, TOKEN)
    try:
        if warm:
            print(f"INFO standby ready: {standby_ready(log_path, 1)} after {time.monotonic() - t0:.1f} s", flush=True)
            cold_start("warm-1")
            print(f"INFO next standby ready: {standby_ready(log_path, 2)}", flush=True)
            cold_start("warm-2")
        else:
            cold_start("plain-1")
            cold_start("plain-2")
    finally:
        stop(agent)


LEGS = os.environ.get("COLD_CHECK_LEGS", "plain,warm").split(",")
try:
    if "plain" in LEGS:
        run_agent(False)
    if "warm" in LEGS:
        run_agent(True)
finally:
    ref = results[0]["text"] if results else None
    for r in results:
        r["same_output"] = r["text"] == ref
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CACHE) for f in fs) if os.path.isdir(CACHE) else 0
    summary = {"engine": ENGINE, "legs": results, "cache_bytes": size}
    with open(os.path.join(OUT, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("RESULT " + json.dumps(summary))
    ok = all(r["status"] == 200 and r["same_output"] for r in results) and len(results) == 2 * len(LEGS)
    print(f"{'PASS' if ok else 'FAIL'} coldstart {[(r['leg'], r['seconds']) for r in results]}")
    logs = os.path.join(WORK, "logs")
    if os.path.isdir(logs):
        for n in sorted(os.listdir(logs)):
            if n.startswith("tiny"):
                shutil.copy(os.path.join(logs, n), os.path.join(OUT, "engine.log"))
PYEOF
