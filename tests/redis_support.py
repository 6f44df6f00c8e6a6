"""A real `redis-server` for tests: started on a free loopback port in a temp dir, killed and
restarted on demand (for "Redis down" tests), stopped after. No fake Redis anywhere.

Without a `redis-server` binary the tests that need one are skipped, except in CI (CI=true),
where a missing server is a broken setup and fails loudly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procs import free_port

DEBIAN_PATH = "/usr/bin/redis-server"


def redis_server_binary() -> str | None:
    """MVLLM_TEST_REDIS_SERVER when set (a path; a missing one counts as absent), else PATH, else Debian's."""
    override = os.environ.get("MVLLM_TEST_REDIS_SERVER")
    if override is not None:
        return override if override and os.access(override, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    return DEBIAN_PATH if os.access(DEBIAN_PATH, os.X_OK) else None


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_redis_server() -> str:
    """The binary's path; skip (or, in CI, fail) with a reason naming the package when absent."""
    binary = redis_server_binary()
    if binary is None:
        reason = "redis-server not installed (Debian/Ubuntu: apt-get install -y redis-server)"
        if in_ci():
            pytest.fail(f"{reason}; CI must provide it (.ci/run installs it)", pytrace=False)
        pytest.skip(reason)
    return binary


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on 127.0.0.1:`port` answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One `redis-server` subprocess without persistence; `kill` and `start` again keep its port."""

    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        log = self.workdir / "redis.log"
        self.popen = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--logfile", str(log),
                "--daemonize", "no",
            ],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.popen.returncode}:\n{text}")
            if ping(self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown, every client connection cut at once."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        self.popen = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        self.kill()
        return self.start(timeout)

    def stop(self) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
