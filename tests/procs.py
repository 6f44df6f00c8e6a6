"""Real processes on 127.0.0.1 for integration tests: free ports, `mvllm` subprocesses, readiness waits.

Every wait here is bounded, and every process started is killed (with its process group) when
its context exits, so a failing test never leaves an engine behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http_ok(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r})")


@dataclass
class Proc:
    """A `python -m mvllm ...` subprocess in its own process group, with its output in a log file."""

    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen | None = None
    cwd: Path = REPO  # where it runs: `mvllm run` looks for ./servers.toml there

    def start(self) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "mvllm", *self.args],
            cwd=self.cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Children of the group (engines of an agent) must not survive the test either.
        self.signal(signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


@dataclass
class Sim:
    proc: Proc
    port: int
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def run_sim(
    tmp_path: Path,
    model: str = "sim-model",
    extra: Sequence[str] = (),
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float = 20.0,
) -> Iterator[Sim]:
    """Start `mvllm sim serve MODEL` on a free port and wait until /health answers 200."""
    port = port or free_port()
    log = tmp_path / f"sim-{model.replace('/', '_')}-{port}.log"  # HF ids contain a slash
    proc = Proc(["sim", "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra], log, env or {})
    proc.start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", ready_timeout, proc.popen)
        yield Sim(proc, port, model)
    except BaseException:
        print(proc.log()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.stop()
