"""How an engine process comes to be and ends: the `Launcher` interface, the `ProcessHandle` it
returns, and `PlainLauncher`, which spawns `vllm serve` (or `mvllm sim serve`) in a session of its own.

A launcher that keeps engines warm (issue 17) implements the same interface; the engine's record
(mvllm.agent.process) only ever sees a handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mvllm.agent import procs
from mvllm.agent.launch import LaunchPlan


@dataclass
class ProcessHandle:
    """One engine process, the leader of its own session (vLLM's engine core and workers join it)."""

    popen: subprocess.Popen
    warm: bool = False  # handed to the warm launcher's standby (imports done ahead)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """Its exit code once it has exited, else None."""
        return self.popen.poll()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    async def members(self) -> set[int]:
        """The live processes of its session, itself included."""
        return set(await asyncio.to_thread(procs.session_members, self.popen.pid)) | {self.popen.pid}

    async def terminate(self, grace_s: float) -> bool:
        """SIGTERM to the group, wait `grace_s`, SIGKILL to the group; True when every member is gone."""
        return await terminate(self.popen, grace_s)

    async def kill_leftovers(self) -> None:
        """The leader is gone: SIGKILL whatever is left of its group."""
        await kill_leftovers(self.popen)


class Launcher(Protocol):
    async def launch(self, plan: LaunchPlan, log_path: Path, header: str, cwd: Path) -> ProcessHandle:
        """Start the engine of `plan`, its output appended to `log_path` after `header`."""
        ...


class PlainLauncher:
    """A fresh process per start (fork/exec in a thread: it blocks)."""

    async def launch(self, plan: LaunchPlan, log_path: Path, header: str, cwd: Path) -> ProcessHandle:
        return ProcessHandle(await asyncio.to_thread(spawn, plan, log_path, header, cwd))


def spawn(plan: LaunchPlan, log_path: Path, header: str, cwd: Path) -> subprocess.Popen:
    """Start the engine in a new session (its own process group), output appended to `log_path`.

    Blocking (fork/exec): call it through asyncio.to_thread.
    """
    with open(log_path, "ab") as logf:
        logf.write(header.encode())
        logf.flush()
        return subprocess.Popen(
            plan.argv,
            env=plan.env,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(cwd),
        )


async def wait_session_gone(sid: int, timeout: float) -> bool:
    """True once no live process is left in session `sid` (vLLM's engine core and workers included)."""
    deadline = time.monotonic() + timeout
    while True:
        if not await asyncio.to_thread(procs.session_members, sid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def wait_exit(popen: subprocess.Popen, timeout: float) -> bool:
    """The leader has exited (and is reaped) and its whole session is gone, within `timeout`."""
    deadline = time.monotonic() + timeout
    # A child's exit has no event to wait on here (Popen, not asyncio's child watcher): poll it.
    while popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    if popen.poll() is None:
        return False
    return await wait_session_gone(popen.pid, max(0.5, deadline - time.monotonic()))


async def kill_leftovers(popen: subprocess.Popen) -> None:
    """The API process is gone: SIGKILL whatever is left of its group (vLLM's engine core survives it)."""
    procs.kill_group(popen.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.to_thread(popen.wait, 5)
    await wait_session_gone(popen.pid, 5.0)


async def terminate(popen: subprocess.Popen, grace_s: float) -> bool:
    """SIGTERM to the group, wait `grace_s`, SIGKILL to the group; True when every member is gone."""
    procs.kill_group(popen.pid, signal.SIGTERM)
    if await wait_exit(popen, grace_s):
        return True
    procs.kill_group(popen.pid, signal.SIGKILL)
    return await wait_exit(popen, 10.0)
