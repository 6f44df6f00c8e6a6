"""`mvllm run` as a real process: the demo starts, answers through the openai client and leaves no
engine behind on Ctrl-C; a config file is used as given; a bad one is refused with its key named."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from urllib.parse import urlparse

import openai

from tests.integration.test_cli_admin import mvllm
from tests.procs import Proc, free_port, http_get, wait_http_ok


def sim_pids(ports: list[int]) -> dict[int, int]:
    """{port: pid} of live `mvllm sim serve ... --port P` processes."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or b"sim" not in args or b"serve" not in args or b"--port" not in args:
            continue
        port = int(args[args.index(b"--port") + 1])
        if port in ports:
            found[port] = int(entry)
    return found


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_starts_answers_and_stops_clean_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    router = Proc(["run", "--demo", "--port", str(port)], tmp_path / "router.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(base + "/health", 60, router.popen)
        deadline = time.monotonic() + 20
        while True:
            stats = json.loads(http_get(base + "/load-stats")[1])
            # Three simulated engines and the node agent with its simulated GPUs.
            if len(stats["nodes"]) == 4 and all(n["models"] and n["healthy"] for n in stats["nodes"]):
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.1)
        model = stats["nodes"][0]["models"][0]
        engines = [n for n in stats["nodes"] if n["name"] != "sim-agent"]
        agent = next(n for n in stats["nodes"] if n["name"] == "sim-agent")

        c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert sorted(m.id for m in c.models.list().data) == sorted([model, "llama-8b", "mistral-7b", "qwen-7b"])
        out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
        assert out.choices[0].message.content
        chunks = [
            ch
            for ch in c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, stream=True
            )
            if ch.choices and ch.choices[0].delta.content
        ]
        assert len(chunks) >= 4

        ports = [urlparse(n["url"]).port for n in engines]
        assert len(sim_pids(ports)) == 3  # the demo's engines, found by their ports

        # The agent's model loads on first request; the CLI's sleep and wake act on it.
        raw = c.chat.completions.with_raw_response.create(
            model="qwen-7b", messages=[{"role": "user", "content": "Hello!"}], max_tokens=4
        )
        assert raw.headers["x-mvllm-node"] == "sim-agent" and raw.parse().choices[0].message.content
        state = json.loads(http_get(agent["url"] + "/state")[1])
        qwen = next(i for i in state["instances"] if i["name"] == "qwen-7b")
        assert qwen["state"] == "ready" and pid_alive(qwen["pid"])
        out = mvllm("sleep", "qwen-7b", router=base)
        assert out.returncode == 0 and "qwen-7b on sim-agent: sleeping(1)" in out.stdout, out.stdout + out.stderr
        out = mvllm("wake", "qwen-7b", router=base)
        assert out.returncode == 0 and "qwen-7b on sim-agent: ready" in out.stdout, out.stdout + out.stderr

        router.signal(signal.SIGINT)  # Ctrl-C (the engines are in their own sessions: the router stops them)
        assert router.popen is not None
        assert router.popen.wait(timeout=30) == 0
        log = router.log()
        assert "mvllm demo" in log and f"curl {base}/v1/chat/completions" in log
        assert f"mvllm load qwen-7b --router {base}" in log  # the agent's part of the banner
        assert sim_pids(ports) == {}  # no engine left behind
        assert not pid_alive(qwen["pid"])  # nor the agent's
    finally:
        router.stop()


def test_run_with_a_config_file_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "servers.toml"
    cfg.write_text(f"[router]\nport = {port}\n\n[servers]\nservers = []\n")
    router = Proc(["run", "--config", str(cfg), "--console"], tmp_path / "router.log").start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 30, router.popen)
        health = json.loads(http_get(f"http://127.0.0.1:{port}/health")[1])
        assert health["nodes"] == 0
        status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and json.loads(body)["data"] == []
        router.signal(signal.SIGTERM)
        assert router.popen is not None and router.popen.wait(timeout=20) == 0
        assert "demo" not in router.log()
    finally:
        router.stop()


def test_a_bad_config_is_refused_with_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "servers.toml"
    cfg.write_text('[servers]\nservers = [{ url = "gpu-1:8000" }]\n')
    router = Proc(["run", "--config", str(cfg)], tmp_path / "router.log").start()
    try:
        assert router.popen is not None and router.popen.wait(timeout=20) == 2
        log = router.log()
        assert str(cfg) in log and "servers.servers[0].url" in log and "http://host:port" in log
    finally:
        router.stop()
