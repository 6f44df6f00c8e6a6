"""The memory estimate and the engine-log cap against real vLLM on a lent GPU machine (issue 8,
items 5 and 7); see ../shared/gpu/README.md for the two commands that install vLLM there.

    GPU machine: bash .gpu/bin/install.sh && source /root/vllm-env.sh && python3 scripts/gpu_estimate_logs.py

One agent (engine = "vllm"), one catalog entry for the tiny model with no budget: the agent
estimates it from the model's config.json and starts vLLM with --gpu-memory-utilization =
estimate / total. Checked: the estimate in /state, that vLLM starts and answers with that budget,
the memory NVML then measures for it, that engine_log_max_bytes (16 KiB here; vLLM writes more
while it starts) rotates the log while vLLM writes it and leaves no hole, the log read by tail and
by cursor, and that SIGTERM to the agent leaves no GPU memory. Results in $OUT/summary.json (plus
the agent's and the engine's logs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

MODEL = os.environ.get("GPU_CHECK_MODEL", "/root/tiny/tiny-llama")
ENGINE = os.environ.get("GPU_CHECK_ENGINE", "vllm")  # "sim": a dry run of the script here
OUT = Path(os.environ.get("OUT", "/tmp/gpu_estimate_out"))
WORK = Path("/tmp/mvllm-gpu-estimate")
PORT = 7391
TOKEN = "gpu-estimate-token"
results: dict[str, Any] = {"steps": []}


def step(name: str, ok: bool, detail: Any = "") -> None:
    results["steps"].append({"step": name, "ok": ok, "detail": detail})
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def call(method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def gpu_used_mib() -> int:
    if ENGINE == "sim":
        return 0
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    )
    return int(out.stdout.split()[0])


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "logs").mkdir(parents=True)
    OUT.mkdir(parents=True, exist_ok=True)
    cfg = WORK / "agent.toml"
    cfg.write_text(
        f'port = {PORT}\ntoken = "{TOKEN}"\nengine = "{ENGINE}"\nlog_dir = "{WORK / "logs"}"\n'
        "ready_timeout = 400\nload_timeout = 400\nengine_log_max_bytes = 16384\nengine_log_backups = 3\n"
        "log_check_interval = 0.5\nidle_timeout = 0\nunload_timeout = 0\n"
        f'[models.tiny]\nmodel = "{MODEL}"\n'
    )
    results["gpu_used_mib_before"] = gpu_used_mib()
    agent_log = open(WORK / "agent.log", "wb")
    agent = subprocess.Popen(
        [sys.executable, "-m", "mvllm", "agent", "--config", str(cfg)],
        stdout=agent_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(200):
            try:
                if call("GET", "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        status, raw, _ = call("GET", "/state")
        state = json.loads(raw)
        entry = state["catalog"][0]
        gpu = state["gpus"][0]
        est = entry["memory_estimate"]
        results["estimate"] = est
        results["gpu"] = {"name": gpu["name"], "total_bytes": gpu["memory_total_bytes"]}
        step("estimate in /state", bool(est and est["bytes"]) and entry["memory_bytes"] == est["bytes"], est)

        t0 = time.monotonic()
        status, raw, _ = call("POST", "/models/tiny/load", timeout=420)
        results["load_s"] = round(time.monotonic() - t0, 1)
        step("vLLM starts with the estimated budget", status == 200, f"HTTP {status} in {results['load_s']} s {raw[:300]!r}")
        if status != 200:
            return 1
        status, raw, _ = call(
            "POST", "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}, timeout=60,
        )  # fmt: skip
        step("chat", status == 200, raw[:200].decode(errors="replace"))

        inst = json.loads(call("GET", "/state")[1])["instances"][0]
        argv = Path(f"/proc/{inst['pid']}/cmdline").read_bytes().split(b"\0")
        util = argv[argv.index(b"--gpu-memory-utilization") + 1].decode()
        results["launch_utilization"] = util
        results["measured_memory_bytes"] = inst["memory_bytes"]
        results["gpu_used_mib_loaded"] = gpu_used_mib()
        measured = inst["memory_bytes"] or 0
        step(
            "measured vs estimate",
            measured > 0,
            f"util {util}; estimate {est['bytes'] / 2**30:.2f} GiB; NVML {measured / 2**30:.2f} GiB for the engine",
        )

        time.sleep(1.5)  # one more log check
        files = {p.name: p.stat().st_size for p in sorted((WORK / "logs").iterdir())}
        results["log_files"] = files
        live = (WORK / "logs" / "tiny.log").read_bytes()
        step("engine log rotated while vLLM wrote it", "tiny.log.1" in files and files["tiny.log"] < 16384 + 65536, files)
        nul = live.count(b"\0")
        step("no hole after truncation", nul == 0, f"{len(live)} bytes, NUL bytes: {nul}")
        status, tail, headers = call("GET", "/models/tiny/logs?tail=5")
        cursor = headers.get("X-Log-Cursor")
        step("tail", status == 200 and bool(tail.strip()), tail.decode(errors="replace")[-300:])
        call("POST", "/v1/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": "again"}], "max_tokens": 4})  # fmt: skip
        status, more, headers = call("GET", f"/models/tiny/logs?cursor={cursor}")
        step("cursor read", status == 200, f"{len(more)} new bytes; next cursor {headers.get('X-Log-Cursor')}")
        status, stats, _ = call("GET", "/logs/stats")
        results["logs_stats"] = json.loads(stats)
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
        agent_log.close()
        time.sleep(1)
        results["gpu_used_mib_after"] = gpu_used_mib()
        step("no GPU memory left", results["gpu_used_mib_after"] <= results["gpu_used_mib_before"] + 16,
             f"{results['gpu_used_mib_before']} MiB before, {results['gpu_used_mib_after']} MiB after")  # fmt: skip
        (OUT / "summary.json").write_text(json.dumps(results, indent=2))
        shutil.copy(WORK / "agent.log", OUT / "agent.log")
        for p in sorted((WORK / "logs").iterdir())[:5]:
            shutil.copy(p, OUT / p.name)
    return 0 if all(s["ok"] for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
