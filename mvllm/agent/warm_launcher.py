"""The warm launcher: one standby process per agent that has already imported the engine's modules
(mvllm.agent.standby), handed the next engine's arguments instead of a fresh `vllm serve` paying
its ~40 s of imports; a new standby starts behind it. Any trouble falls back to a plain spawn.

The handle it returns is the same `ProcessHandle` over the same kind of process (a session leader
whose output goes to the engine's log), so the engine's record stops, watches and restarts it
exactly as a plainly spawned one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mvllm.agent.launch import MARKER_AGENT, MARKER_ENGINE, LaunchPlan
from mvllm.agent.launcher import Launcher, PlainLauncher, ProcessHandle, terminate

log = logging.getLogger(__name__)

STANDBY_MARKER = "(standby)"  # MARKER_ENGINE of a standby: a later agent reaps it like any stale engine
STOP_GRACE_S = 5.0


def handoff_env(kind: str, env: Mapping[str, str]) -> dict[str, str]:
    """The environment an engine gets from a standby. `vllm serve` sets its engine core's start
    method to `spawn` unless told otherwise, and a spawned engine core imports vLLM all over again
    (18-22 s of a cold start on the H200): the standby has those modules imported and no CUDA
    context, so forking it costs nothing. vLLM itself still switches to spawn if CUDA was started;
    a catalog entry's own VLLM_WORKER_MULTIPROC_METHOD wins."""
    out = dict(env)
    if kind == "vllm":
        out.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    return out


@dataclass
class Standby:
    """One waiting standby process and what it said."""

    popen: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: str | None = None
    import_s: float | None = None
    reader: asyncio.Task | None = None

    async def read_status(self) -> None:
        assert self.popen.stdout is not None
        line = (await asyncio.to_thread(self.popen.stdout.readline)).decode(errors="replace").strip()
        if line.startswith("ready"):
            with contextlib.suppress(ValueError, IndexError):
                self.import_s = float(line.split()[1])
            log.info("warm launcher: standby pid %d ready (imports took %.1f s)", self.popen.pid, self.import_s or 0.0)
        else:
            self.failed = line or f"exited with code {self.popen.poll()}"
            log.warning("warm launcher: standby pid %d unusable: %s", self.popen.pid, self.failed)
        self.ready.set()

    async def wait_ready(self, timeout: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ready.wait(), timeout)
        return self.ready.is_set() and self.failed is None and self.popen.poll() is None

    def hand_off(self, job: dict) -> None:
        """Blocking (a pipe write): give the standby its engine."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(job).encode() + b"\n")
        self.popen.stdin.close()
        self.popen.stdout.close()


class WarmLauncher:
    """`Launcher` with a standby process of engine kind `kind` ("vllm" or "sim") kept ready."""

    def __init__(
        self,
        kind: str,
        log_dir: Path,
        agent_id: str,
        base_env: Mapping[str, str] | None = None,
        fallback: Launcher | None = None,
        ready_wait_s: float = 180.0,
    ) -> None:
        self.kind = kind
        self.log_dir = log_dir
        self.agent_id = agent_id
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.fallback = fallback or PlainLauncher()
        self.ready_wait_s = ready_wait_s
        self.standby: Standby | None = None
        self.handoffs = 0
        self.fallbacks = 0
        self.last_import_s: float | None = None
        self._closed = False
        self._refill: asyncio.Task | None = None

    def applies(self, plan: LaunchPlan) -> bool:
        """The standby runs this agent's Python: it can become `python -m ...` of that Python, or
        vLLM's own console script, nothing else (a `vllm` of another environment is spawned plainly)."""
        if self.kind == "sim":
            return plan.argv[:2] == [sys.executable, "-m"]
        return bool(plan.argv) and plan.argv[0] == "vllm"

    async def start(self) -> None:
        """Start the first standby (returns at once; it imports in the background)."""
        if self.standby is None and not self._closed:
            standby = await asyncio.to_thread(self._spawn)
            standby.reader = asyncio.get_running_loop().create_task(standby.read_status())
            self.standby = standby

    def _spawn(self) -> Standby:
        """Blocking (fork/exec): run through asyncio.to_thread."""
        env = {**self.base_env, "PYTHONUNBUFFERED": "1", MARKER_AGENT: self.agent_id, MARKER_ENGINE: STANDBY_MARKER}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "standby.log", "ab") as errf:
            popen = subprocess.Popen(
                [sys.executable, "-u", "-m", "mvllm.agent.standby", "--preload", self.kind],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errf,
                start_new_session=True,
                cwd=str(self.log_dir),
            )
        return Standby(popen)

    async def launch(self, plan: LaunchPlan, log_path: Path, header: str, cwd: Path) -> ProcessHandle:
        standby, self.standby = self.standby, None
        if not self.applies(plan) or self._closed:
            if standby is not None:
                self.standby = standby  # not ours to use: keep it for the next engine
            return await self.fallback.launch(plan, log_path, header, cwd)
        if standby is None or not await standby.wait_ready(self.ready_wait_s):
            reason = "none was started" if standby is None else (standby.failed or "not ready in time")
            log.warning("warm launcher: no standby for this engine (%s); spawning it plainly", reason)
            if standby is not None:
                await self._discard(standby)
            self.fallbacks += 1
            self._start_refill()
            return await self.fallback.launch(plan, log_path, header, cwd)
        job = {"argv": plan.argv, "env": handoff_env(self.kind, plan.env), "cwd": str(cwd), "log_path": str(log_path),
               "header": header}
        await asyncio.to_thread(standby.hand_off, job)
        self.handoffs += 1
        self.last_import_s = standby.import_s
        log.info("warm launcher: engine handed to standby pid %d (imports done in %.1f s ahead)",
                 standby.popen.pid, standby.import_s or 0.0)
        self._start_refill()
        return ProcessHandle(standby.popen, warm=True)

    def _start_refill(self) -> None:
        if not self._closed and (self._refill is None or self._refill.done()):
            self._refill = asyncio.get_running_loop().create_task(self.start())

    async def _discard(self, standby: Standby) -> None:
        # stdin's end makes a waiting standby exit by itself; stdout is closed only after the reader
        # thread has seen its end (closing a file another thread reads from blocks on its lock).
        with contextlib.suppress(OSError):
            if standby.popen.stdin is not None:
                standby.popen.stdin.close()
        await terminate(standby.popen, STOP_GRACE_S)
        if standby.reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(standby.reader, 5.0)
        with contextlib.suppress(OSError):
            if standby.popen.stdout is not None:
                standby.popen.stdout.close()

    async def close(self) -> None:
        """Stop the standby (engines already handed off belong to their records)."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refill
        standby, self.standby = self.standby, None
        if standby is not None:
            await self._discard(standby)
