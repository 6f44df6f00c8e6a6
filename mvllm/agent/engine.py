"""One engine: its live record (`Instance`), its process group, and the HTTP calls that control it.

No policy here: the supervisor decides when to start, sleep, wake or stop; these are the means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from mvllm.agent import procs
from mvllm.agent.config import ModelSpec
from mvllm.agent.errors import EngineError, EngineExited
from mvllm.agent.launch import LaunchPlan
from mvllm.agent.states import Lifecycle, RestartPolicy
from mvllm.common.state import READY

_CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3, sock_connect=2)


@dataclass
class Instance:
    """The live record of one catalog model's engine (one per catalog entry, stopped or not)."""

    spec: ModelSpec
    life: Lifecycle = field(default_factory=Lifecycle)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    op: str | None = None  # operation under way: start, wake, sleep, stop
    ready_task: asyncio.Task | None = None  # the one load/wake that requests share
    popen: subprocess.Popen | None = None
    port: int | None = None
    utilization: float | None = None  # --gpu-memory-utilization it was started with
    expect_exit: bool = False  # we are stopping it: its exit is no crash
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while in_flight == 0
    queued: int = 0
    last_used: float = 0.0  # monotonic
    last_used_wall: float | None = None
    memory: dict[int, int] = field(default_factory=dict)  # measured bytes per GPU
    running: int = 0
    waiting: int = 0
    metrics_text: str | None = None
    loras: set[str] = field(default_factory=set)  # adapters loaded in the engine now
    extra_loras: dict[str, str] = field(default_factory=dict)  # loaded by hand, not in the catalog
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    loads: int = 0
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)  # captured when it failed
    start_seq: int = 0  # order of starts, for stopping in reverse at shutdown
    lora_level_warned: bool = False  # told the log once that level 2 became 1 (LoRA)
    pending_spec: ModelSpec | None = None  # an assignment (POST /models/NAME/assign) for its next start
    retired: bool = False  # an ad-hoc instance being removed: it never starts again
    room_wait: tuple[str, ...] = ()  # busy models its load or wake waits for, to evict them once idle

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        return self.life.state

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port is not None else None

    @property
    def process_alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def can_serve_now(self, lora: str | None = None) -> bool:
        """The fast path of a request: awake, nothing under way, its adapter loaded."""
        return self.life.state == READY and self.op is None and (lora is None or lora in self.loras)

    def begin(self) -> None:
        """A request starts being relayed to this engine (called right after `can_serve_now`)."""
        self.in_flight += 1
        self.idle.clear()
        self.touch()

    def end(self) -> None:
        self.in_flight -= 1
        self.touch()
        if self.in_flight == 0:
            self.idle.set()

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    def forget_process(self) -> None:
        self.popen = None
        self.port = None
        self.loras.clear()
        self.memory = {}
        self.metrics_text = None
        self.running = self.waiting = 0


# ------------------------------------------------------------------ processes


def read_log_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of an engine log, read from its end (blocking: use a thread)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max(4096, lines * 400)))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


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


# ---------------------------------------------------------------- HTTP control


class EngineClient:
    """vLLM's HTTP endpoints as the agent uses them (VLLM.md), over the agent's pooled session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def ready(self, inst: Instance) -> bool:
        """`/health` is 200 and one of its served names is listed by `/v1/models`."""
        assert inst.popen is not None
        code = inst.popen.poll()
        if code is not None:
            raise EngineExited(code)
        try:
            async with self.session.get(f"{inst.url}/health", timeout=_PROBE_TIMEOUT) as resp:
                if resp.status != 200:
                    return False
            async with self.session.get(f"{inst.url}/v1/models", timeout=_PROBE_TIMEOUT) as resp:
                if resp.status != 200:
                    return False
                data = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False
        listed = {m.get("id") for m in data.get("data", []) if isinstance(m, dict)}
        return bool(set(inst.spec.served_model_names) & listed)

    async def call(self, inst: Instance, method: str, path: str, body: dict | None = None) -> str:
        try:
            async with self.session.request(method, f"{inst.url}{path}", json=body, timeout=_CONTROL_TIMEOUT) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineError(f"{inst.name}: {method} {path} -> {resp.status} {text[:300]}")
                return text
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"{inst.name}: {method} {path} failed: {exc!r}") from None

    async def is_sleeping(self, inst: Instance) -> bool:
        text = await self.call(inst, "GET", "/is_sleeping")
        try:
            return bool(json.loads(text).get("is_sleeping"))
        except (ValueError, AttributeError):
            raise EngineError(f"{inst.name}: /is_sleeping answered {text[:200]!r}") from None

    async def expect_sleeping(self, inst: Instance, want: bool, timeout: float = 5.0) -> None:
        """vLLM answers 200 before every worker is done (0.11's FIXME): confirm with /is_sleeping."""
        deadline = time.monotonic() + timeout
        while await self.is_sleeping(inst) != want:
            if time.monotonic() >= deadline:
                raise EngineError(f"{inst.name}: /is_sleeping still says {not want}")
            await asyncio.sleep(0.1)

    async def sleep(self, inst: Instance, level: int) -> None:
        await self.call(inst, "POST", f"/sleep?level={level}&mode=wait")
        await self.expect_sleeping(inst, True)

    async def wake(self, inst: Instance, level: int) -> None:
        if level == 2:
            # Level 2 discarded the weights: reallocate them, load them again, then the KV cache.
            await self.call(inst, "POST", "/wake_up?tags=weights")
            await self.call(inst, "POST", "/collective_rpc", {"method": "reload_weights"})
            await self.call(inst, "POST", "/wake_up?tags=kv_cache")
        else:
            await self.call(inst, "POST", "/wake_up")
        await self.expect_sleeping(inst, False)

    async def load_lora(self, inst: Instance, name: str, path: str) -> None:
        try:
            await self.call(inst, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except EngineError as exc:
            if "already" not in str(exc).lower():  # vLLM: 400 "... has already been loaded"
                raise
        inst.loras.add(name)

    async def unload_lora(self, inst: Instance, name: str) -> None:
        await self.call(inst, "POST", "/v1/unload_lora_adapter", {"lora_name": name})
        inst.loras.discard(name)
