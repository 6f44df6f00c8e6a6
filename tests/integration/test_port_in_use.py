"""A port in use stops `mvllm run` and `mvllm agent` with one line that says so and suggests --port,
not a traceback (real processes, a real socket holding the port)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import tomli_w

from tests.procs import REPO


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mvllm", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def _check(out: subprocess.CompletedProcess, port: int) -> None:
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if f"cannot listen on 127.0.0.1:{port}" in line]
    assert len(lines) == 1 and "in use" in lines[0].lower() and "--port" in lines[0], out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_router_and_agent_on_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        servers = tmp_path / "servers.toml"
        servers.write_text("[servers]\nservers = []\n")
        _check(_run("run", "--console", "--config", str(servers), "--port", str(port)), port)

        agent = tmp_path / "agent.toml"
        agent.write_text(tomli_w.dumps({"engine": "sim", "log_dir": str(tmp_path / "logs")}))
        _check(_run("agent", "--config", str(agent), "--port", str(port)), port)
