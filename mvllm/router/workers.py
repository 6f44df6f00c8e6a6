"""`mvllm run --workers N`: N router processes on one port (SO_REUSEPORT: the kernel spreads the
connections), sharing limits, keys, drains and events through `[cluster] redis_url`. This parent
listens on nothing: it starts the workers, restarts one that dies, runs the front end (dashboard)
against the port, and stops them all when it stops. Workers die with it (PR_SET_PDEATHSIG, and a
watch of their parent pid where that is missing), so a killed parent leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

log = logging.getLogger("mvllm.router.workers")

# A worker that exits with an error status (1: cannot listen, 2: bad config) this soon after its
# first start failed to start: the parent stops rather than restart it in a loop. A worker killed
# by a signal, or failing later, is restarted.
START_GRACE_S = 30.0
RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 15.0  # beyond the worker's own drain of in-flight requests
_PR_SET_PDEATHSIG = 1

NEEDS_REDIS = (
    "--workers > 1 (or [router] workers) needs [cluster] redis_url (or MVLLM_REDIS_URL) in servers.toml: "
    "the workers share their limits, keys and drains through it"
)


def die_with_parent() -> None:
    """In a worker, before exec: the kernel sends SIGTERM when the parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


async def watch_parent(parent: int, stop: asyncio.Event, interval: float = 1.0) -> None:
    """In a worker: set `stop` once `parent` is gone (our parent pid changes: re-parented)."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("worker: parent %d gone, stopping", parent)
            stop.set()
            return
        await asyncio.sleep(interval)


@dataclass
class Worker:
    index: int
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    starts: int = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent)
        self.started = time.monotonic()
        self.starts += 1
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class WorkerSet:
    """The workers of one `mvllm run --workers N`."""

    n: int
    config: Path
    host: str
    port: int
    log_level: str | None = None
    workers: list[Worker] = field(default_factory=list)

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "mvllm", "run", "--console", "--config", str(self.config)]
        args += ["--host", self.host, "--port", str(self.port), "--workers", "1", "--worker-of", str(os.getpid())]
        if self.log_level:
            args += ["--log-level", self.log_level]
        return args

    async def run(self, stop: asyncio.Event, frontend: Callable[[str, asyncio.Event], Awaitable[None]] | None) -> int:
        self.workers = [Worker(i, self.argv()) for i in range(self.n)]
        for w in self.workers:
            await w.start()
        log.info("router: %d workers on %s:%d, sharing state through Redis", self.n, self.host, self.port)
        failed: list[int] = []
        supervisors = [asyncio.create_task(self._supervise(w, stop, failed)) for w in self.workers]
        front: asyncio.Task[None] | None = None
        try:
            if frontend is not None:
                front = asyncio.create_task(self._front(frontend, stop))
            await stop.wait()
        finally:
            stop.set()
            if front is not None:
                front.cancel()
                await asyncio.gather(front, return_exceptions=True)
            await self._stop_all()
            for t in supervisors:
                t.cancel()
            await asyncio.gather(*supervisors, return_exceptions=True)
        return failed[0] if failed else 0

    async def _supervise(self, w: Worker, stop: asyncio.Event, failed: list[int]) -> None:
        while not stop.is_set():
            assert w.proc is not None
            code = await w.proc.wait()
            if stop.is_set():
                return
            if w.starts == 1 and code > 0 and time.monotonic() - w.started < START_GRACE_S:
                log.error("worker %d exited with %s at start: stopping the router", w.index, code)
                failed.append(code)
                stop.set()
                return
            log.warning("worker %d (pid %s) exited with %s: restarting it", w.index, w.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if not stop.is_set():
                await w.start()

    async def _front(self, frontend: Callable[[str, asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> None:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        url = f"http://{host}:{self.port}"
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                try:
                    async with s.get(url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        await frontend(url, stop)
        stop.set()  # the operator quit the dashboard: the router stops

    async def _stop_all(self) -> None:
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            for p in live:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in live))
