"""The embedded demo: three local `mvllm sim` engines of different speeds and capacities and a node
agent with simulated GPUs (mvllm.router.demo_agent), started as subprocesses behind the router when
no servers.toml exists (or with --demo), and stopped with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from mvllm.router import demo_agent
from mvllm.router.config import NodeConfig, RouterConfig, ScrapeConfig

DEMO_MODEL = "mvllm-demo"
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 5.0
# The agent stops its engines first (their stop_timeout, 3 s, each at worst).
_AGENT_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class DemoEngine:
    name: str
    max_num_seqs: int
    ttft_ms: float
    itl_ms: float


ENGINES = (
    DemoEngine("sim-fast", max_num_seqs=16, ttft_ms=30, itl_ms=8),
    DemoEngine("sim-medium", max_num_seqs=8, ttft_ms=60, itl_ms=20),
    DemoEngine("sim-slow", max_num_seqs=4, ttft_ms=120, itl_ms=45),
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the router is killed outright (SIGKILL), the kernel still stops its engines.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Running:
    name: str
    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    engine: DemoEngine | None = None  # None: the agent

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class DemoFleet:
    """`async with DemoFleet() as fleet:` starts the engines and waits until each answers /health;
    leaving the block stops them (SIGTERM to each process group, then SIGKILL)."""

    engines: tuple[DemoEngine, ...] = ENGINES
    model: str = DEMO_MODEL
    with_agent: bool = True
    running: list[_Running] = field(default_factory=list)
    _log_dir: Path | None = None

    async def __aenter__(self) -> DemoFleet:
        await self.start()
        return self

    async def start(self) -> None:
        """Start every engine and wait until each answers /health; on any failure, stop them all."""
        self._log_dir = Path(tempfile.mkdtemp(prefix="mvllm-demo-"))
        try:
            for engine in self.engines:
                await self._start(engine)
            if self.with_agent:
                await self._start_agent()
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start(self, engine: DemoEngine) -> None:
        args = [
            "sim", "serve", self.model,
            "--max-num-seqs", str(engine.max_num_seqs),
            "--sim-ttft-ms", str(engine.ttft_ms),
            "--sim-itl-ms", str(engine.itl_ms),
        ]  # fmt: skip
        await self._spawn(engine.name, args, engine, listen=True)

    async def _start_agent(self) -> None:
        assert self._log_dir is not None
        port = _free_port()
        config = self._log_dir / "agent.toml"
        config.write_text(demo_agent.agent_toml(port, self._log_dir / "engines"))
        await self._spawn(demo_agent.AGENT_NAME, ["agent", "--config", str(config)], None, port=port)

    async def _spawn(
        self, name: str, args: list[str], engine: DemoEngine | None, *, listen: bool = False, port: int | None = None
    ) -> None:
        assert self._log_dir is not None
        port = port if port is not None else _free_port()
        log_path = self._log_dir / f"{name}.log"
        argv = ["-m", "mvllm", *args, *(["--host", "127.0.0.1", "--port", str(port)] if listen else [])]
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            os.close(log_fd)  # the process holds its own copy
        self.running.append(_Running(name, port, proc, log_path, engine))

    @property
    def agent(self) -> _Running | None:
        return next((r for r in self.running if r.engine is None), None)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT
        pending = list(self.running)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while pending:
                for r in list(pending):
                    if r.proc.returncode is not None:
                        tail = r.log_path.read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"demo process {r.name} exited with {r.proc.returncode}:\n{tail}")
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        async with session.get(r.url + "/health") as resp:
                            if resp.status == 200:
                                pending.remove(r)
                if pending:
                    if time.monotonic() > deadline:
                        names = ", ".join(r.name for r in pending)
                        raise RuntimeError(f"demo processes not ready after {_READY_TIMEOUT:.0f}s: {names}")
                    await asyncio.sleep(0.1)

    async def stop(self) -> None:
        for r in self.running:
            if r.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGTERM)
        for r in self.running:
            try:
                await asyncio.wait_for(r.proc.wait(), _STOP_TIMEOUT if r.engine else _AGENT_STOP_TIMEOUT)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(r.proc.pid, signal.SIGKILL)
                await r.proc.wait()
        self.running.clear()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def router_config(self, host: str, port: int) -> RouterConfig:
        nodes = tuple(
            NodeConfig(name=r.name, url=r.url, capacity=r.engine.max_num_seqs)
            if r.engine is not None
            else NodeConfig(name=r.name, url=r.url, kind="agent")
            for r in self.running
        )
        # Short intervals: the demo is for watching the load move.
        return RouterConfig(nodes=nodes, host=host, port=port, scrape=ScrapeConfig(interval=0.5, timeout=0.5))

    def banner(self, router_url: str, reason: str) -> str:
        lines = [
            "",
            f"mvllm demo ({reason}): the router runs in front of {len(self.engines)} simulated vLLM engines",
            "(`mvllm sim`), started here and stopped with Ctrl-C:",
        ]
        for r in self.running:
            e = r.engine
            if e is None:
                continue
            lines.append(
                f"  {e.name:<11} {r.url:<24} capacity {e.max_num_seqs:>2}, ~{1000 / e.itl_ms:.0f} tokens/s per request"
            )
        lines += [
            "",
            f"OpenAI endpoint: {router_url}/v1    model: {self.model}",
            "",
            "Try it:",
            f"  curl {router_url}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"    -d '{{\"model\": \"{self.model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'",
            "",
            f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{router_url}/v1\", api_key=\"x\"); "
            f"print(c.chat.completions.create(model=\"{self.model}\", "
            "messages=[{\"role\": \"user\", \"content\": \"Hello!\"}]).choices[0].message.content)'",
            "",
            f"Load per node: {router_url}/load-stats    metrics: {router_url}/metrics",
            *self._agent_lines(router_url),
            "To route to real vLLM servers, copy servers.example.toml to servers.toml and edit it.",
            "",
        ]
        return "\n".join(lines)

    def _agent_lines(self, router_url: str) -> list[str]:
        agent = self.agent
        return ["", *demo_agent.banner_lines(agent.url, router_url), ""] if agent is not None else []
