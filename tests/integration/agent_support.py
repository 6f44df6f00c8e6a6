"""Helpers of the agent's integration tests: `mvllm agent` (engine = "sim") as a subprocess with a
generated agent.toml, catalog entries, and the engine processes an agent marked as its own."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import tomli_w

from tests.procs import Proc, free_port, wait_http_ok

TOKEN = "agent-test-token"
SIM_FAST = "sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2 }"


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def marked_processes(agent_pid: int) -> list[int]:
    """Live processes carrying the launch marker of the agent with this pid (its engines)."""
    out = []
    needle = f"MVLLM_AGENT_ID={agent_pid}:".encode()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env and pid_alive(int(p)):
            out.append(int(p))
    return out


class Agent:
    """`mvllm agent` as a subprocess with a generated agent.toml (engine = "sim")."""

    def __init__(
        self, tmp_path: Path, catalog: str, *, sim_gpus: tuple[float, ...] = (80,), top: dict | None = None
    ) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        base = random.randrange(20000, 32700, 50)  # below the ephemeral ports (32768+) that free_port and clients take
        settings = {
            "port": self.port,
            "token": TOKEN,
            "engine": "sim",
            "engine_port_range": [base, base + 40],
            "log_dir": str(tmp_path / "logs"),
            "poll_interval": 0.2,
            "restart_backoff": 0.2,
            "stop_timeout": 5,
            "gpu_memory_reserve_gib": 1.0,
            "load_timeout": 60,
            **(top or {}),
        }
        settings["sim_gpus"] = [{"memory_gib": g} for g in sim_gpus]
        self.config = tmp_path / f"agent-{self.port}.toml"
        self.config.write_text(tomli_w.dumps(settings) + "\n" + catalog)
        self.proc: Proc | None = None
        self.pids: list[int] = []  # every agent pid this object started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra: str) -> Agent:
        self.proc = Proc(["agent", "--config", str(self.config), *extra], self.tmp_path / f"agent-{self.port}.log")
        self.proc.start()
        self.pids.append(self.proc.pid)
        try:
            wait_http_ok(f"{self.url}/health", 30, self.proc.popen)
        except BaseException:
            print(self.proc.log()[-3000:])
            raise
        return self

    def stop(self) -> int | None:
        code = self.proc.stop(timeout=30) if self.proc else None
        # Safety net for a failing test: no engine of ours may outlive it.
        for agent_pid in self.pids:
            for pid in marked_processes(agent_pid):
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
        return code

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = TOKEN) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, data=data, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def state(self) -> dict:
        code, raw = self.api("GET", "/state")
        assert code == 200, raw
        return json.loads(raw)

    def inst(self, name: str) -> dict:
        return next(i for i in self.state()["instances"] if i["name"] == name)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)

    def chat(self, model: str, **kw: object) -> str:
        r = self.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=kw.pop("max_tokens", 8), **kw
        )
        return r.choices[0].message.content or ""


@contextlib.contextmanager
def running_agent(tmp_path: Path, catalog: str, **kw: object) -> Iterator[Agent]:
    agent = Agent(tmp_path, catalog, **kw)
    try:
        yield agent.start()
    finally:
        agent.stop()


def model(name: str, extra: str = "", sim: str = SIM_FAST) -> str:
    return f'[models.{name}]\nmodel = "org/{name}"\nmemory_gib = 10\n{sim}\n{extra}\n'
