"""What the Python parts of scripts/gpu_*_check.sh share: the agent.toml they run (vLLM on the
lent machine, or the sim with one simulated 80 GiB GPU), the agent's API with its token, and
stopping an agent or engine started in its own session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request


def agent_toml(engine: str, port: int, token: str, port_range: tuple[int, int], log_dir: str, settings: str,
               models: str) -> str:
    """An agent.toml: address, token, engine (`engine`: "sim" or "vllm"), engine ports, log dir,
    then `settings` (more top-level keys, one a line) and `models` (the [models.*] tables)."""
    if engine == "sim":
        engine_keys, tables = 'engine = "sim"\n', "[[sim_gpus]]\nmemory_gib = 80\n"
    else:
        engine_keys, tables = 'engine = "vllm"\nengine_binary = "vllm"\n', ""
    return (f'host = "127.0.0.1"\nport = {port}\ntoken = "{token}"\n{engine_keys}'
            f"engine_port_range = [{port_range[0]}, {port_range[1]}]\n"
            f'log_dir = "{log_dir}"\n{settings}\n{tables}\n{models}')


def engine_keys(engine: str, sim: str, eager: bool = True) -> str:
    """A catalog entry's engine lines: the sim's timings (`sim`, an inline table's content), or
    vLLM's --enforce-eager where `eager` (a quick start; the cold-start check wants vLLM's defaults)."""
    if engine == "sim":
        return f"sim = {{ {sim} }}\n"
    return 'extra_args = ["--enforce-eager"]\n' if eager else ""


def call(base: str, token: str, method: str, path: str, body: object = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One call to the agent with its token: the status, the headers and the body, errors included."""
    req = urllib.request.Request(base + path, method=method, headers={"Authorization": f"Bearer {token}"})
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def api(base: str, token: str, method: str, path: str, body: object = None,
        timeout: float = 30.0) -> tuple[int, bytes]:
    """`call` without the headers."""
    status, _, raw = call(base, token, method, path, body, timeout)
    return status, raw


def start_agent(py: str, config_path: str, log, base: str, token: str, limit_s: float = 60.0) -> subprocess.Popen:
    """`mvllm agent` in a session of its own (its engines join it), once its /health answers."""
    agent = subprocess.Popen([py, "-m", "mvllm", "agent", "--config", config_path], stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if api(base, token, "GET", "/health", timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
    return agent


def stop(proc: subprocess.Popen, wait_s: float = 60.0) -> None:
    """SIGTERM, then SIGKILL to its process group if it is not gone within `wait_s`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
