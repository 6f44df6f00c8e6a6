"""One engine of the agent (`EngineProcess`): its state machine, its process from start to confirmed
stop, readiness, sleep and wake, crash restarts with backoff, and the requests it has in flight.

What involves other engines (locks across GPUs, placement and eviction, when to start or sleep)
is the supervisor's; an `EngineProcess` only changes itself. The state machine is
mvllm.agent.states.Lifecycle, the restart rule mvllm.agent.states.RestartPolicy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mvllm.agent import loadphase, lora_dir, placement
from mvllm.agent.config import AgentConfig, ModelSpec
from mvllm.agent.engine import EngineClient, log_size, read_log_from, read_log_tail
from mvllm.agent.errors import BadRequest, Conflict, EngineError, EngineExited, LoadFailed
from mvllm.agent.failcause import START_HEADER, failure_text, since_start
from mvllm.agent.launch import launch_plan
from mvllm.agent.launcher import Launcher, ProcessHandle
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.states import Lifecycle, RestartPolicy
from mvllm.agent.timings import TimingStore
from mvllm.common.state import FAILED, READY, SLEEPING, STARTING, STOPPED, STOPPING, LoadProgress, LoadTimings

log = logging.getLogger("mvllm.agent")

_READY_POLL_S = 0.2
_PORT_RACE_RETRIES = 3  # engine starts retried on another port after losing a bind race
FAILED_TAIL_LINES = 40  # log lines kept in /state for a failed model
_FOLLOW_S = 0.25  # how often a starting engine's log is read for its phase
_LINE_END = re.compile(rb"[\r\n]")  # tqdm bars (CUDA graphs, safetensors) end their updates with \r


@dataclass(frozen=True)
class EngineContext:
    """What every engine of one agent shares: settings, launcher, HTTP client, metrics, and two
    calls into the supervisor (measure the GPUs; which of some pids still hold GPU memory)."""

    cfg: AgentConfig
    launcher: Launcher
    client: EngineClient
    metrics: AgentMetrics
    agent_id: str
    measure: Callable[[], Awaitable[object]]
    gpu_pids_held: Callable[[set[int]], Awaitable[set[int]]]
    timings: TimingStore = field(default_factory=TimingStore)  # measured load and wake times per model
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))  # start order, for shutdown


@dataclass
class EngineStats:
    """What was last measured of the engine: GPU memory per device and its own /metrics."""

    memory: dict[int, int] = field(default_factory=dict)  # bytes per GPU
    running: int = 0
    waiting: int = 0
    metrics_text: str | None = None


@dataclass
class EngineHistory:
    """What /state tells of its past: starts, restarts, the last error and log tail."""

    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    loads: int = 0
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)  # captured when it failed
    start_seq: int = 0  # order of starts, for stopping in reverse at shutdown


@dataclass
class LoadUnderWay:
    """A cold start (its phases read from the engine's log) or a wake, while it runs."""

    kind: str  # "cold" or "wake"
    t0: float  # monotonic time of the spawn (or of the wake call)
    wall0: float
    tracker: loadphase.PhaseTracker = field(default_factory=loadphase.PhaseTracker)
    warm: bool | None = None
    level: int = 0  # wake: from this level

    def report(self, timings: LoadTimings, now: float) -> LoadProgress:
        """Where it stands `now` (monotonic), with the time it should still take."""
        elapsed = max(0.0, now - self.t0)
        if self.kind == "wake":
            left = loadphase.wake_remaining_s(elapsed, timings.wake_s(self.level))
            return LoadProgress("wake", loadphase.WAKING, self.wall0, self.wall0, elapsed, left, level=self.level)
        t = self.tracker
        since = t.since_phase(elapsed)
        left = loadphase.remaining_s(t.phase, elapsed, since, last_start(timings))
        return LoadProgress("cold", t.phase, self.wall0, self.wall0 + t.offsets.get(t.phase, 0.0), elapsed, left, self.warm)


def last_start(timings: LoadTimings) -> loadphase.LastStart | None:
    if timings.cold_start_s is None:
        return None
    return loadphase.LastStart(timings.cold_start_s, dict(timings.cold_start_phases))


class EngineProcess:
    """The engine of one catalog entry, stopped or not (one per entry, for the agent's lifetime)."""

    def __init__(self, spec: ModelSpec, ctx: EngineContext) -> None:
        cfg = ctx.cfg
        self.spec = spec
        self.ctx = ctx
        self.life = Lifecycle()
        self.restart = RestartPolicy(cfg.restart_max, cfg.restart_window, cfg.restart_backoff, cfg.restart_backoff_max)
        self.lock = asyncio.Lock()
        self.op: str | None = None  # operation under way: start, wake, sleep, stop
        self.ready_task: asyncio.Task | None = None  # the one load/wake that requests share
        self.handle: ProcessHandle | None = None
        self.port: int | None = None
        self.utilization: float | None = None  # --gpu-memory-utilization it was started with
        self.expect_exit = False  # we are stopping it: its exit is no crash
        self.in_flight = 0
        self.idle = asyncio.Event()  # set while in_flight == 0
        self.idle.set()
        self.queued = 0
        self.draining = False  # takes no new request; those in flight finish
        self.last_used = 0.0  # monotonic
        self.last_used_wall: float | None = None
        self.loras: set[str] = set()  # adapters loaded in the engine now
        self.extra_loras: dict[str, str] = {}  # loaded by hand, not in the catalog
        self.stats = EngineStats()
        self.history = EngineHistory()
        self.lora_level_warned = False  # told the log once that level 2 became 1 (LoRA)
        self.pending_spec: ModelSpec | None = None  # an assignment (POST /models/NAME/assign) for its next start
        self.retired = False  # an ad-hoc instance being removed: it never starts again
        self.room_wait: tuple[str, ...] = ()  # busy models its load or wake waits for, to evict them once idle
        self._tail_task: asyncio.Task | None = None
        self.under_way: LoadUnderWay | None = None  # the cold start or wake running now
        self.parked = False  # put at its deepest sleep at unload_timeout since its last use (sleep_on_unload)

    # ----------------------------------------------------------------- reading

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        return self.life.state

    @property
    def pid(self) -> int | None:
        return self.handle.pid if self.handle is not None else None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port is not None else None

    @property
    def has_process(self) -> bool:
        """A process was started and not yet seen gone (it may have exited unseen)."""
        return self.handle is not None

    @property
    def process_alive(self) -> bool:
        return self.handle is not None and self.handle.alive

    @property
    def loading(self) -> bool:
        """The shared load or wake task is under way."""
        return self.ready_task is not None and not self.ready_task.done()

    @property
    def busy(self) -> bool:
        """An operation or the shared load is under way."""
        return self.op is not None or self.loading

    @property
    def log_path(self) -> Path:
        return self.ctx.cfg.log_dir / f"{self.name}.log"

    @property
    def timings(self) -> LoadTimings:
        return self.ctx.timings.get(self.name)

    def load_progress(self) -> LoadProgress | None:
        """The cold start or wake under way, for /state; None when none is."""
        under = self.under_way
        return under.report(self.timings, time.monotonic()) if under is not None else None

    def predicted_wait_s(self) -> float | None:
        """Seconds until it should be able to serve: what is left of the load or wake under way,
        else what waking it (asleep) or a cold start would take by the last measures."""
        under = self.under_way
        if under is not None:
            return under.report(self.timings, time.monotonic()).remaining_s
        if self.state == READY:
            return None
        if self.state == SLEEPING:
            return self.timings.wake_s(self.life.sleep_level)
        return loadphase.remaining_s(loadphase.SPAWNED, 0.0, 0.0, last_start(self.timings))

    # -------------------------------------------------------------- operations

    def claim(self, op: str) -> None:
        """An operation (start, wake, sleep, stop) is under way: from here, no request takes the fast path."""
        self.op = op

    def release(self) -> None:
        self.op = None

    @contextlib.contextmanager
    def operation(self, op: str) -> Iterator[None]:
        """`claim` for the length of the block (claimed without yielding)."""
        self.claim(op)
        try:
            yield
        finally:
            self.release()

    # ---------------------------------------------------------------- requests

    def can_serve_now(self, lora: str | None = None) -> bool:
        """The fast path of a request: awake, nothing under way, not draining, its adapter loaded."""
        return (
            self.life.state == READY and self.op is None and not self.draining and (lora is None or lora in self.loras)
        )

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
        self.parked = False
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    @contextlib.contextmanager
    def queue_slot(self) -> Iterator[None]:
        """A request waits for this engine to load or wake."""
        self.queued += 1
        try:
            yield
        finally:
            self.queued -= 1

    async def wait_idle(self, timeout: float) -> None:
        """Until no request is in flight, at most `timeout` s."""
        if self.in_flight > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout)

    def stop_taking(self) -> None:
        """From now on no new request is taken (they get Draining); those in flight finish."""
        self.draining = True

    async def drain(self, timeout: float | None = None) -> None:
        """Take no new request and let those in flight finish (up to drain_timeout); `resume` ends it."""
        self.stop_taking()
        await self.wait_idle(self.ctx.cfg.drain_timeout if timeout is None else timeout)

    def resume(self) -> None:
        self.draining = False

    # ----------------------------------------------------------- catalog entry

    def assign(self, new: ModelSpec) -> bool:
        """A changed entry: in use at once when no engine runs or starts (True), else at its next start."""
        if self.handle is None and not self.busy:
            self.spec, self.pending_spec = new, None
            return True
        self.pending_spec = new
        return False

    def take_pending_spec(self) -> None:
        """Before a start: an assignment made while it ran takes effect now."""
        if self.pending_spec is not None and self.handle is None:
            self.spec, self.pending_spec = self.pending_spec, None

    def retire(self) -> None:
        """An ad-hoc instance being removed: it never starts again."""
        self.retired = True

    def set_memory(self, memory: dict[int, int]) -> None:
        self.stats.memory = dict(memory) if self.handle is not None else {}

    def set_engine_metrics(self, text: str | None, signal: tuple[int, int] | None) -> None:
        self.stats.metrics_text = text
        if signal is not None:
            self.stats.running, self.stats.waiting = signal

    # ------------------------------------------------------------------- start

    async def start(self, utilization: float | None, gpu_total: int | None, free_port: Callable[[], int]) -> None:
        """Spawn the engine and wait until it is ready (its LoRA adapters loaded after). A bind race
        on its port is retried on another port; an exit during start raises EngineExited."""
        ctx, spec = self.ctx, self.spec
        if self.state != STARTING:
            self.life.to(STARTING)
        self.history.loads += 1
        t0 = time.monotonic()
        for attempt in range(_PORT_RACE_RETRIES + 1):
            self.port = free_port()
            plan = launch_plan(ctx.cfg, spec, self.port, utilization, gpu_total, ctx.agent_id, os.environ)
            header = f"\n{START_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')}: starting {spec.name}: {' '.join(plan.argv)}\n"
            offset = await asyncio.to_thread(log_size, self.log_path)
            self.handle = await ctx.launcher.launch(plan, self.log_path, header, ctx.cfg.log_dir)
            under = self.under_way = LoadUnderWay("cold", time.monotonic(), time.time(), warm=self.handle.warm)
            follow = asyncio.create_task(self._follow_log(under, offset))
            self.expect_exit = False
            self.utilization = utilization
            self.loras.clear()
            self.stats.memory = {}
            self.history.start_seq = next(ctx.seq)
            self.history.started_at = time.time()
            log.info("%s: started pid %d on port %d (utilization %s)", spec.name, self.handle.pid, self.port, utilization)
            try:
                await self._wait_ready()
                await self._record_cold_start(under, follow)
            except EngineExited as exited:
                await self.handle.kill_leftovers()
                port = self.port
                if attempt < _PORT_RACE_RETRIES and await self._lost_port_race():
                    # Another process bound the port between our check and the engine's bind:
                    # not the engine's fault, so no crash is counted; take the next free port.
                    log.warning("%s: port %s was taken before the engine bound it; retrying on another port", spec.name, port)
                    self.forget_process()
                    continue
                ctx.metrics.loads.labels(spec.name, "crashed").inc()
                self.forget_process()
                tail = await asyncio.to_thread(read_log_tail, self.log_path, FAILED_TAIL_LINES)
                raise EngineExited(exited.code, failure_text(exited.code, tail, spec.name)) from None
            except BaseException:
                ctx.metrics.loads.labels(spec.name, "failed").inc()
                await self.stop(reason="start_failed")
                raise
            finally:
                follow.cancel()
                self.under_way = None
            break
        self.life.to(READY)
        self.history.ready_at = time.time()
        self.history.error = None
        self.touch()
        ctx.metrics.loads.labels(spec.name, "ok").inc()
        ctx.metrics.load_seconds.labels(spec.name).observe(time.monotonic() - t0)
        log.info("%s: ready in %.1f s", spec.name, time.monotonic() - t0)
        for lname, lpath in {**spec.lora_adapters, **self.extra_loras}.items():
            try:
                await self._load_lora(lname, lpath)
            except EngineError as exc:
                log.error("%s: LoRA %s not loaded: %s", self.name, lname, exc)

    async def _follow_log(self, under: LoadUnderWay, offset: int) -> None:
        """Read what the engine writes to its log while it starts (in a thread, every _FOLLOW_S s)
        and move `under`'s phase on (mvllm.agent.loadphase). Ends when cancelled."""
        rest = b""
        while True:
            data, offset = await asyncio.to_thread(read_log_from, self.log_path, offset)
            if data:
                *lines, rest = _LINE_END.split(rest + data)
                elapsed = time.monotonic() - under.t0
                for line in lines:
                    if line:
                        under.tracker.feed(line.decode(errors="replace"), elapsed)
                if len(rest) > 64 * 1024:
                    rest = rest[-4096:]  # a line that never ends (a progress bar): only its end can matter
            await asyncio.sleep(_FOLLOW_S)

    async def _record_cold_start(self, under: LoadUnderWay, follow: asyncio.Task) -> None:
        """Ready: the start's measures become the model's last cold start (saved in the state_dir)."""
        total = time.monotonic() - under.t0
        follow.cancel()
        # What the engine wrote last (the ready lines) may not have been read yet: read it now.
        under.tracker.offsets.setdefault(loadphase.READY, total)
        t = self.timings
        t.cold_start_s = round(total, 3)
        t.cold_start_warm = under.warm
        t.cold_start_at = time.time()
        t.cold_start_phases = {p: round(v, 3) for p, v in under.tracker.offsets.items()}
        await self.ctx.timings.save()

    async def _wait_ready(self) -> None:
        assert self.handle is not None and self.url is not None
        deadline = time.monotonic() + self.ctx.cfg.ready_timeout
        while time.monotonic() < deadline:
            code = self.handle.poll()
            if code is not None:
                raise EngineExited(code)
            if await self.ctx.client.ready(self.url, self.spec.served_model_names):
                return
            await asyncio.sleep(_READY_POLL_S)
        raise LoadFailed(f"{self.name}: not ready within ready_timeout ({self.ctx.cfg.ready_timeout:g} s)")

    async def _lost_port_race(self) -> bool:
        """Whether an engine that exited during start failed to bind its port: the port is held by
        someone else now, or its log (since this start) says the address was in use."""
        port = self.port
        if port is None:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        tail = await asyncio.to_thread(read_log_tail, self.log_path, FAILED_TAIL_LINES)
        return "address already in use" in "\n".join(since_start(tail)).lower()

    def forget_process(self) -> None:
        self.handle = None
        self.port = None
        self.loras.clear()
        self.stats = EngineStats()

    async def clear_dead(self) -> None:
        """It exited and nobody has seen it yet: clear what is left of its group."""
        if self.handle is not None:
            await self.handle.kill_leftovers()
            self.forget_process()

    # -------------------------------------------------------------------- stop

    async def stop(self, *, reason: str) -> None:
        """SIGTERM the engine's group, wait, SIGKILL the group, then confirm no member holds GPU memory."""
        handle = self.handle
        if handle is None:
            if self.state not in (STOPPED, FAILED):
                self.life.to(STOPPING)
                self.life.to(STOPPED)
            return
        self.expect_exit = True
        if self.state != STOPPING:
            self.life.to(STOPPING)
        members = await handle.members()
        t0 = time.monotonic()
        gone = await handle.terminate(self.ctx.cfg.stop_timeout)
        port = self.port
        self.forget_process()
        held = await self.ctx.gpu_pids_held(members)
        self.ctx.metrics.stops.labels(self.name, reason).inc()
        if not gone or held:
            self.history.error = (
                f"engine group {handle.pid} did not exit" if not gone else f"GPU memory still held by pids {sorted(held)}"
            )
            log.error("%s: %s after stop", self.name, self.history.error)
            self.fail()
            return
        self.life.to(STOPPED)
        log.info("%s: stopped (%s) in %.1f s; port %s free", self.name, reason, time.monotonic() - t0, port)

    # ------------------------------------------------------------------- crash

    def exited(self) -> int | None:
        """The exit code of a process that ended unasked (nothing under way watches it), else None."""
        if self.handle is None or self.expect_exit or self.op is not None:
            return None
        return self.handle.poll()

    async def after_exit(self, code: int) -> float | None:
        """It exited unasked with `code` (see `exited`): clear what is left and count the crash. The
        delay before the restart the caller schedules, or None when none is due (failed, or it was
        asleep: it held nothing worth restarting for and loads again on its next request)."""
        was = self.state
        await self.clear_dead()
        delay = self.on_crash(f"engine exited with code {code} while {was}", restart=was != SLEEPING)
        if delay is None:
            return None
        if was == SLEEPING:
            self.life.to(STOPPING)
            self.life.to(STOPPED)
            return None
        if self.state != STARTING:
            self.life.to(STARTING)
        return delay

    def fail(self) -> None:
        if self.state != FAILED:
            self.life.to(FAILED)
        self.history.log_tail = []
        self._tail_task = asyncio.create_task(self._capture_tail())
        self._tail_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _capture_tail(self) -> None:
        self.history.log_tail = await asyncio.to_thread(read_log_tail, self.log_path, FAILED_TAIL_LINES)

    def on_crash(self, why: str, *, restart: bool = True) -> float | None:
        """Record a crash; the delay before restarting, or None when the model is now failed."""
        self.ctx.metrics.crashes.labels(self.name).inc()
        self.history.error = why
        delay = self.restart.on_crash(time.monotonic())
        if delay is None:
            self.fail()
            log.error("%s: %s; crashed too often, now failed", self.name, why)
        elif restart:
            self.history.restarts += 1
            log.warning("%s: %s; restarting in %.1f s", self.name, why, delay)
        else:
            log.warning("%s: %s; it loads again on its next request", self.name, why)
        return delay

    # ------------------------------------------------------------ sleep / wake

    def effective_level(self, level: int) -> int:
        """The sleep level carried out for `level`: 2 becomes 1 for a LoRA engine (warned once)."""
        effective = placement.effective_sleep_level(level, self.spec.lora_enabled)
        if effective != level and not self.lora_level_warned:
            self.lora_level_warned = True
            log.warning(
                "%s: sleeping at level %d instead of %d: it runs with --enable-lora, and vLLM 0.25 cannot "
                "reload its weights after a level-2 sleep (reload_weights fails, then the engine dies)",
                self.name, effective, level,
            )  # fmt: skip
        return effective

    async def sleep(self, level: int, *, reason: str) -> None:
        """Let requests in flight finish (drain_timeout), then sleep; the caller holds its locks and `op`."""
        # Every sleep (API, idle timer, eviction) comes here: never level 2 for a LoRA engine.
        level = self.effective_level(level)
        before = sum(self.stats.memory.values())
        await self.wait_idle(self.ctx.cfg.drain_timeout)
        assert self.url is not None
        t0 = time.monotonic()
        await self.ctx.client.sleep(self.name, self.url, level)
        dt = time.monotonic() - t0
        try:
            # Measured before /state says sleeping, so it never shows a sleeping model with its awake
            # memory (callers hold `op`: no request takes the fast path meanwhile).
            await self.ctx.measure()
        finally:
            self.life.to(SLEEPING, level=level)
        after = sum(self.stats.memory.values())
        self.ctx.metrics.sleeps.labels(self.name, str(level), reason).inc()
        log.info(
            "%s: asleep at level %d (%s) in %.2f s; GPU memory %.2f -> %.2f GiB",
            self.name, level, reason, dt, before / placement.GIB, after / placement.GIB,
        )  # fmt: skip

    async def wake(self) -> None:
        """Wake a sleeping engine (the room for it made already)."""
        assert self.url is not None
        level = self.life.sleep_level
        t0 = time.monotonic()
        self.under_way = LoadUnderWay("wake", t0, time.time(), level=level)
        try:
            await self.ctx.client.wake(self.name, self.url, level)
        finally:
            self.under_way = None
        self.life.to(READY)
        self.touch()
        dt = time.monotonic() - t0
        if level == 1:
            self.timings.wake_1_s = round(dt, 3)
        else:
            self.timings.wake_2_s = round(dt, 3)
        await self.ctx.timings.save()
        self.ctx.metrics.wakes.labels(self.name, str(level)).inc()
        self.ctx.metrics.wake_seconds.labels(self.name, str(level)).observe(dt)
        await self.ctx.measure()
        log.info(
            "%s: awake from level %d in %.2f s; GPU memory %.2f GiB",
            self.name, level, dt, sum(self.stats.memory.values()) / placement.GIB,
        )  # fmt: skip

    # -------------------------------------------------------------------- LoRA

    async def _load_lora(self, lname: str, path: str) -> None:
        assert self.url is not None
        await self.ctx.client.load_lora(self.name, self.url, lname, path)
        self.loras.add(lname)

    async def add_lora(self, lname: str, lpath: str | None) -> None:
        """Load adapter `lname` (a catalog one, or `lpath`), now if awake, else at its next ready."""
        path = lpath or self.spec.lora_adapters.get(lname) or self.extra_loras.get(lname) or self.dir_lora(lname)
        if path is None:
            raise BadRequest(f"LoRA {lname!r} is not in the catalog of {self.name}: give its lora_path")
        if not self.spec.runtime_lora:
            raise Conflict(f"model {self.name} runs without LoRA support (no lora_adapters or lora_dir in its catalog entry)")
        async with self.lock:
            if lname not in self.spec.lora_adapters:
                self.extra_loras[lname] = path
            if self.state == READY:
                await self._load_lora(lname, path)
            # Otherwise it is loaded when the engine is next ready.

    def dir_lora(self, lname: str) -> str | None:
        """The path of adapter `lname` in this model's lora_dir, when it has one and the adapter is there."""
        return None if self.spec.lora_dir is None else lora_dir.adapter_path(self.spec.lora_dir, lname)

    def lora_names(self) -> list[str]:
        """Every adapter name routed to this engine: the catalog's, those loaded by hand, those in lora_dir."""
        names = [*self.spec.lora_adapters, *self.extra_loras]
        if self.spec.lora_dir is not None:
            names += [n for n in lora_dir.adapters(self.spec.lora_dir) if n not in names]
        return names

    def lora_path(self, lname: str) -> str | None:
        return self.spec.lora_adapters.get(lname) or self.extra_loras.get(lname) or self.dir_lora(lname)

    async def remove_lora(self, lname: str) -> None:
        async with self.lock:
            self.extra_loras.pop(lname, None)
            if self.state == READY and lname in self.loras and self.url is not None:
                await self.ctx.client.unload_lora(self.name, self.url, lname)
            self.loras.discard(lname)
