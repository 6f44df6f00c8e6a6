"""`mvllm run --demo` on a real pseudo-terminal: the dashboard opens around the running router, shows
the demo's nodes with numbers that move while requests run, `mvllm top` shows the same router from
another process, and `q` exits with no engine left."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import openai

from tests.procs import REPO, free_port, http_get, wait_http_ok
from tests.support import wait_until

ROWS, COLS = 48, 160
_ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)")


def sim_pids(ports: list[int]) -> list[int]:
    """Live `mvllm sim serve ... --port P` processes on these ports."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"sim" in args and b"--port" in args and int(args[args.index(b"--port") + 1]) in ports:
            found.append(int(entry))
    return found


class Terminal:
    """A process on the slave side of a pty; everything it draws is collected from the master."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", "COLUMNS": str(COLS), "LINES": str(ROWS)}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mvllm", *args],
            cwd=REPO,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,  # the pty becomes its controlling terminal; a group we can kill
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        # Drained all along: a full pty buffer would block the app's writes.
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.output.extend(data)

    def mark(self) -> int:
        with self._lock:
            return len(self.output)

    def text(self, since: int = 0) -> str:
        with self._lock:
            raw = bytes(self.output[since:])
        return _ANSI.sub(b" ", raw).decode(errors="replace")

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.close(self.master)
        self._reader.join(timeout=5)


def test_demo_dashboard_on_a_tty_shows_live_numbers_and_q_leaves_nothing_behind() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    term = Terminal(["run", "--demo", "--port", str(port)])
    ports: list[int] = []
    try:
        wait_http_ok(base + "/health", 60, term.proc)
        stats = wait_until(
            lambda: (s := json.loads(http_get(base + "/load-stats")[1])) and len(s["nodes"]) == 4
            and all(n["healthy"] and n["models"] for n in s["nodes"]) and s,
            30,
            "the demo's three engines and its agent",
        )  # fmt: skip
        ports = [urlparse(n["url"]).port for n in stats["nodes"] if n["name"] != "sim-agent"]
        model = stats["nodes"][0]["models"][0]
        # The dashboard draws the demo's nodes.
        wait_until(lambda: all(n in term.text() for n in ("sim-fast", "sim-medium", "sim-slow", "sim-agent")), 20, "node names on screen")
        # The demo's "try it" lines while the dashboard has the screen: behind the t key.
        shown = term.mark()
        term.send(b"t")
        wait_until(lambda: "mvllm load qwen-7b" in term.text(shown) and "mvllm sleep llama-8b" in term.text(shown), 10, "try-it lines")
        term.send(b"\x1b")  # escape closes them

        before = term.mark()
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)

        def one(_: int) -> str:
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=12)
            return out.choices[0].message.content or ""

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(one, range(60)))
        assert all(answers)
        # The header's request rate moved off zero while the load ran (numbers from /metrics).
        rates = wait_until(
            lambda: [float(x) for x in re.findall(r"(\d+\.\d) req/s", term.text(before)) if float(x) > 0],
            10,
            "a request rate above zero on screen",
        )
        assert max(rates) > 0.5, rates
        assert re.search(r"p50 \d+ ms", term.text(before))
        assert sim_pids(ports)  # the engines run while the dashboard is up

        # The same screen on the same router from another process: `mvllm top --router URL`.
        top = Terminal(["top", "--router", base])
        try:
            wait_until(lambda: "sim-medium" in top.text() and "4/4 up" in top.text(), 20, "mvllm top's screen")
            top.send(b"q")
            assert top.proc.wait(timeout=15) == 0
        finally:
            top.close()

        term.send(b"q")  # nothing in flight: quits without asking
        assert term.proc.wait(timeout=30) == 0
        wait_until(lambda: not sim_pids(ports), 10, "every demo engine stopped")
    finally:
        term.close()
        for pid in sim_pids(ports):  # only if the test failed: nothing may outlive it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stderr_to_a_file_on_a_terminal_runs_headless(tmp_path: Path) -> None:
    """`mvllm run 2>file` on a terminal: plain log lines in the file, no dashboard drawn into it."""
    port = free_port()
    cfg = tmp_path / "servers.toml"
    cfg.write_text("[servers]\nservers = []\n")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    log = tmp_path / "router.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mvllm", "run", "--config", str(cfg), "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"},
            stdin=slave,
            stdout=slave,
            stderr=err,
            start_new_session=True,
        )
    os.close(slave)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc)
        wait_until(lambda: b"router listening on" in log.read_bytes(), 10, "the log line in the file")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        text = log.read_bytes()
        assert b"\x1b[" not in text, text[:500]  # no screen drawing
        assert re.search(rb"^\d\d:\d\d:\d\d INFO    mvllm\.router: router listening on", text, re.MULTILINE), text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        os.close(master)
