"""The thin layer across one agent's engines (mvllm.agent.process.EngineProcess, one per catalog
entry): on-demand loads and wakes, placement with eviction, crash restarts, idle timers.

Locking: an operation that changes GPU memory (start, wake, sleep, stop) holds the locks of the
GPUs it touches, taken in index order, then the instance's own lock. A start or wake also locks
the GPUs of every instance that shares one with it, since those are the ones it may evict; so
locks are always taken GPUs first, in one order, and never while holding an instance lock. Starts
on one GPU are serialised on purpose: vLLM profiles free memory at start and fails if another
process frees or takes memory meanwhile.

Requests take the fast path (`state == ready` and no operation under way, checked and counted
without yielding); anything else waits on the instance's one shared `ready_task`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import aiohttp

from mvllm.agent import engine_metrics, gpu_view, placement, procs
from mvllm.agent.catalog import Catalog
from mvllm.agent.config import AgentConfig, ModelSpec
from mvllm.agent.engine import EngineClient
from mvllm.agent.errors import (
    AgentError,
    BadRequest,
    Busy,
    Conflict,
    Draining,
    EngineError,
    EngineExited,
    LoadFailed,
    NoRoom,
    UnknownModel,
)
from mvllm.agent.gpu import EngineRef, GpuBackend, GpuSample
from mvllm.agent.launcher import Launcher, PlainLauncher
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.process import EngineContext, EngineProcess
from mvllm.agent.states import IDLE_SLEEP, IDLE_UNLOAD, idle_action
from mvllm.agent.timings import TimingStore
from mvllm.common.state import FAILED, READY, SLEEPING, STARTING, STOPPED, StaleEngine

log = logging.getLogger("mvllm.agent")

_GPU_RELEASE_WAIT_S = 15.0


class Supervisor:
    """The engines of one agent, across its GPUs (one `EngineProcess` per catalog entry)."""

    def __init__(
        self,
        cfg: AgentConfig,
        gpus: GpuBackend,
        session: aiohttp.ClientSession,
        metrics: AgentMetrics,
        agent_id: str,
        launcher: Launcher | None = None,
    ) -> None:
        self.cfg = cfg
        self.catalog = Catalog(cfg.models)
        self.gpus = gpus
        self.session = session
        self.metrics = metrics
        self.agent_id = agent_id
        self.started_at = time.time()
        self.host = socket.gethostname()
        self.timings = TimingStore(cfg.state_dir)
        self.ctx = EngineContext(
            cfg, launcher or PlainLauncher(), EngineClient(session), metrics, agent_id, self.refresh_gpus, self._gpu_pids_of,
            self.timings,
        )  # fmt: skip
        self.instances: dict[str, EngineProcess] = {name: EngineProcess(spec, self.ctx) for name, spec in cfg.models.items()}
        self.sample = GpuSample()
        self.stale: list[StaleEngine] = []
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        cfg.log_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- lookup

    def get(self, name: str) -> EngineProcess:
        inst = self.instances.get(name)
        if inst is None:
            raise UnknownModel(f"no model named {name!r} in this agent's catalog")
        return inst

    def resolve(self, model: str) -> tuple[EngineProcess, str | None] | None:
        """The instance serving `model` (a served name or a LoRA name), and the adapter if it is one."""
        found = self.catalog.model_for(model)
        if found is not None:
            return self.instances[found[0].name], found[1]
        for inst in self.instances.values():
            if model in inst.extra_loras:
                return inst, model
        # Like vLLM's filesystem resolver: an adapter named in a request and found in a lora_dir.
        for inst in self.instances.values():
            if inst.dir_lora(model) is not None:
                return inst, model
        return None

    def routable(self) -> list[tuple[str, EngineProcess, str | None]]:
        """(name a client may send, its instance, the LoRA adapter it is or None)."""
        out = []
        for inst in self.instances.values():
            out += [(n, inst, None) for n in inst.spec.served_model_names]
            out += [(n, inst, n) for n in inst.lora_names()]
        return out

    def add(self, spec: ModelSpec) -> EngineProcess:
        """A new catalog entry (an ad-hoc instance) and its engine, stopped."""
        self.catalog.add(spec)
        inst = self.instances[spec.name] = EngineProcess(spec, self.ctx)
        return inst

    def forget(self, inst: EngineProcess) -> bool:
        """Drop a retired entry's engine once no process is left of it; whether it did."""
        self.catalog.remove(inst.spec)
        if inst.has_process or self.instances.get(inst.name) is not inst:
            return False
        del self.instances[inst.name]
        return True

    # --------------------------------------------------------- agent lifetime

    async def start(self, reap_stale: bool = False) -> None:
        """Report (and with `reap_stale`, stop) stale engines, measure the GPUs, start preloads."""
        found = await asyncio.to_thread(procs.find_stale, self.agent_id)
        reap = bool(found) and (reap_stale or self.cfg.reap_stale)
        for s in found:
            log.warning("stale engine process %d%s: %s", s.pid, f" (model {s.instance})" if s.instance else "", s.cmdline)
        if reap:
            await asyncio.to_thread(procs.reap, found, min(self.cfg.stop_timeout, 10.0))
            log.warning("reaped %d stale engine process(es)", len(found))
        elif found:
            log.warning("%d stale engine process(es) left alone; start with --reap-stale to stop them", len(found))
        self.stale = [StaleEngine(s.pid, s.cmdline, s.instance, reap) for s in found]
        await asyncio.to_thread(self.timings.load)
        await self.refresh_gpus()
        for inst in self.instances.values():
            if inst.spec.preload:
                self._ensure_task(inst)

    async def close(self) -> None:
        """Agent shutdown: cancel pending work, then stop every engine, last started first, and wait."""
        self._closing = True
        pending = [t for t in self._tasks if not t.done()]
        pending += [i.ready_task for i in self.instances.values() if i.ready_task and not i.ready_task.done()]
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        live = sorted((i for i in self.instances.values() if i.has_process), key=lambda i: i.history.start_seq, reverse=True)
        for inst in live:
            log.info("shutdown: stopping %s (pid %s)", inst.name, inst.pid)
            try:
                await inst.stop(reason="shutdown")
            except Exception:
                log.exception("shutdown: stopping %s failed", inst.name)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, AgentError):
            log.warning("%s", exc)
        else:
            log.error("background task failed", exc_info=exc)

    # ------------------------------------------------------------- measuring

    async def refresh_gpus(self) -> GpuSample:
        refs = [EngineRef(i.name, i.pid, i.url, tuple(i.spec.devices)) for i in self.instances.values() if i.has_process]
        sample = await self.gpus.sample(refs)
        self.sample = sample
        for inst in self.instances.values():
            inst.set_memory(sample.by_instance.get(inst.name, {}))
        return sample

    async def poll(self) -> None:
        """Periodic refresh: GPU memory and every awake or sleeping engine's metrics."""
        await self.refresh_gpus()
        targets = [i for i in self.instances.values() if i.state in (READY, SLEEPING) and i.url]
        texts = await asyncio.gather(*(engine_metrics.fetch(self.session, i.url) for i in targets))
        for inst, text in zip(targets, texts, strict=True):
            inst.set_engine_metrics(text, engine_metrics.load_signal(text) if text is not None else None)

    def need(self, spec: ModelSpec) -> dict[int, int]:
        """Budget per GPU of `spec` (mvllm.agent.gpu_view.need)."""
        return gpu_view.need(spec, gpu_view.gpu_map(self.sample))

    def plan_for(self, inst: EngineProcess, *, include_in_flight: bool = False) -> placement.Plan:
        engines = list(self.instances.values())
        return gpu_view.plan_for(
            inst, engines, self.sample, self.cfg.reserve_bytes, include_in_flight=include_in_flight, now=time.monotonic()
        )

    def memory_wanted(self, inst: EngineProcess) -> bool:
        """A request waits for another model on one of `inst`'s GPUs that does not fit now."""
        devs = set(inst.spec.devices)
        return any(
            o is not inst and o.queued > 0 and o.state != READY and devs & set(o.spec.devices) and not self.plan_for(o).fits
            for o in self.instances.values()
        )

    # ------------------------------------------------------------------ locks

    def _gpu_lock(self, d: int) -> asyncio.Lock:
        return self._gpu_locks.setdefault(d, asyncio.Lock())

    def _lock_set(self, inst: EngineProcess, *, neighbours: bool) -> list[int]:
        devs = set(inst.spec.devices)
        if neighbours:
            for other in self.instances.values():
                if devs & set(other.spec.devices):
                    devs |= set(other.spec.devices)
        return sorted(devs)

    def _locks_free(self, inst: EngineProcess) -> bool:
        return not inst.lock.locked() and not any(self._gpu_lock(d).locked() for d in inst.spec.devices)

    @contextlib.asynccontextmanager
    async def _locked(self, inst: EngineProcess, *, neighbours: bool) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for d in self._lock_set(inst, neighbours=neighbours):
                await stack.enter_async_context(self._gpu_lock(d))
            await stack.enter_async_context(inst.lock)
            yield

    async def _wait_no_op(self, inst: EngineProcess) -> None:
        deadline = time.monotonic() + self.cfg.load_timeout
        while inst.op is not None:
            if time.monotonic() >= deadline:
                raise Busy(f"model {inst.name}: {inst.op} still under way after {self.cfg.load_timeout:g} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------- ready on demand

    def _ensure_task(self, inst: EngineProcess, delay: float = 0.0) -> asyncio.Task:
        task = inst.ready_task
        if task is None or task.done():
            task = inst.ready_task = asyncio.create_task(self._make_ready(inst, delay))
            # Waiters get the exception; this only keeps asyncio from calling it never retrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def ensure_ready(self, inst: EngineProcess, lora: str | None = None) -> None:
        """Return once `inst` can take a request (with adapter `lora` loaded), loading or waking it.

        Concurrent callers share one load. The caller bounds the wait (load_timeout).
        """
        for _ in range(8):  # each turn waits for one operation; a handful covers any interleaving
            if inst.can_serve_now(lora):
                return
            if inst.draining:
                raise Draining(
                    f"model {inst.name} is draining on this agent to make room for another model; "
                    "try another node, or again shortly"
                )
            if self._closing:
                raise LoadFailed("the agent is shutting down")
            if inst.state == FAILED and (inst.ready_task is None or inst.ready_task.done()):
                raise LoadFailed(f"model {inst.name} failed: {inst.history.error}; POST /models/{inst.name}/load to retry")
            if inst.state == READY and inst.op is None and lora is not None:
                await inst.add_lora(lora, None)
                continue
            await asyncio.shield(self._ensure_task(inst))
        if not inst.can_serve_now(lora):
            raise LoadFailed(f"model {inst.name} did not become ready ({inst.state})")

    async def _make_ready(self, inst: EngineProcess, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        while True:
            if inst.retired:
                raise LoadFailed(f"instance {inst.name} was removed")
            # An assignment made while it ran (mvllm.agent.assign) takes effect at this start;
            # swapped before the locks are taken, so they cover its new devices.
            inst.take_pending_spec()
            try:
                async with self._locked(inst, neighbours=True):
                    if inst.state == READY and inst.process_alive:
                        return
                    if inst.state == SLEEPING and inst.process_alive:
                        try:
                            await self._wake_locked(inst)
                            return
                        except EngineError as exc:
                            log.error("%s: wake failed (%s); restarting the engine", inst.name, exc)
                            await inst.stop(reason="wake_failed")
                    await self._start_locked(inst)
                    return
            except EngineExited as exc:
                delay = inst.on_crash(str(exc))
                if delay is None:
                    raise LoadFailed(f"model {inst.name} failed: {inst.history.error}") from None
                await asyncio.sleep(delay)

    # -------------------------------------------------------------- placement

    async def _make_room(self, inst: EngineProcess) -> None:
        """Evict idle models, one step at a time, measuring after each, until `inst` fits.

        A model that has to go but is answering requests is waited for, up to load_timeout, and
        evicted once idle, never while busy (the switch from one model to another that a user
        expects). After max_switch_wait s of waiting, the busy ones are drained: they take no new
        request on this agent, so they go idle once those in flight finish (placement.switch_step).
        NoRoom at once when even that would not make room (pinned models, too big)."""
        t0 = time.monotonic()
        deadline = t0 + self.cfg.load_timeout
        evictions = 0
        drained: list[EngineProcess] = []
        try:
            while True:
                await self.refresh_gpus()
                plan = self.plan_for(inst)
                if plan.fits:
                    return
                if plan.feasible:
                    step = plan.steps[0]
                    victim = self.instances[step.name]
                    # Checked and claimed without yielding: no request can start on it from here on.
                    if not victim.in_flight and victim.op is None and victim.state in (READY, SLEEPING):
                        evictions += 1
                        if evictions > 2 * len(self.instances) + 2:
                            break
                        await self._evict(victim, step, inst)
                        continue
                    busy = [victim]  # it changed since the plan was made: look again shortly
                else:
                    later = self.plan_for(inst, include_in_flight=True)
                    if not later.feasible:
                        short = ", ".join(f"GPU {d}: {b / placement.GIB:.1f} GiB short" for d, b in plan.short.items())
                        raise NoRoom(
                            f"not enough GPU memory for {inst.name} ({short}) even after evicting every idle, "
                            "unpinned model"
                        )
                    busy = [v for v in map(self.instances.__getitem__, later.victims) if v.in_flight]
                names = tuple(v.name for v in busy)
                if names and names != inst.room_wait:
                    log.info(
                        "%s: waiting (up to %.0f s) for %s to finish answering requests, to make room",
                        inst.name, max(0.0, deadline - time.monotonic()), ", ".join(names),
                    )
                inst.room_wait = names
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise NoRoom(
                        f"not enough GPU memory for {inst.name}: {', '.join(names) or 'the models in the way'} "
                        f"still answering requests after {self.cfg.load_timeout:g} s (a busy model is never evicted)"
                    )
                step_ = placement.switch_step(now - t0, self.cfg.max_switch_wait, left)
                if step_.drain:
                    for v in busy:
                        if not v.draining:
                            log.warning(
                                "%s: draining %s after %.1f s of waiting for it to go idle (max_switch_wait): "
                                "no new requests for it here; %d in flight finish first",
                                inst.name, v.name, now - t0, v.in_flight,
                            )  # fmt: skip
                            v.stop_taking()
                            self.metrics.switch_drains.labels(v.name).inc()
                            drained.append(v)
                await _until_one_idle(busy, step_.wait_s)
        finally:
            inst.room_wait = ()
            # Evicted (asleep or stopped) or given up on: either way they take requests again.
            for v in drained:
                v.resume()
        await self.refresh_gpus()
        if not self.plan_for(inst).fits:
            raise NoRoom(f"could not make room for {inst.name}")

    async def _evict(self, victim: EngineProcess, step: placement.Step, inst: EngineProcess) -> None:
        level = f" level {step.level}" if step.action == placement.ACTION_SLEEP else ""
        log.warning("evicting %s (%s%s) to make room for %s", victim.name, step.action, level, inst.name)
        with victim.operation(step.action):
            async with victim.lock:
                if step.action == placement.ACTION_SLEEP:
                    await victim.sleep(step.level, reason="evict")
                else:
                    await victim.stop(reason="evict")

    # ------------------------------------------------------------------ start

    def _free_port(self) -> int:
        used = {i.port for i in self.instances.values() if i.port is not None}
        first, last = self.cfg.engine_port_range
        for port in range(first, last + 1):
            if port in used:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                # As servers bind (aiohttp, uvicorn): a port in TIME_WAIT from a stopped engine is free.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise NoRoom(f"no free port in engine_port_range {first}-{last}")

    async def _start_locked(self, inst: EngineProcess) -> None:
        with inst.operation("start"):
            try:
                await self._make_room(inst)
            except BaseException:
                if inst.state == STARTING and not inst.has_process:
                    inst.life.to(STOPPED)  # a crash restart that found no room: nothing runs
                raise
            # It died and the supervision tick has not seen it yet: clear what is left of it.
            await inst.clear_dead()
            util, total = gpu_view.launch_utilization(inst.spec, self.sample, self.cfg.reserve_bytes)
            await inst.start(util, total, self._free_port)
            await self.refresh_gpus()

    # ------------------------------------------------------------------ crash

    async def check_crashes(self) -> None:
        for inst in self.instances.values():
            code = inst.exited()  # None too while an operation under way watches its own process
            if code is None:
                continue
            delay = await inst.after_exit(code)
            if delay is not None:
                self._ensure_task(inst, delay)

    # ------------------------------------------------------------------- stop

    async def _gpu_pids_of(self, pids: set[int]) -> set[int]:
        """Pids of `pids` that NVML (or the sim GPUs) still lists, after waiting a little for release."""
        deadline = time.monotonic() + _GPU_RELEASE_WAIT_S
        while True:
            held = (await self.refresh_gpus()).gpu_pids() & pids
            if not held or time.monotonic() >= deadline:
                return held
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------ sleep / wake

    async def _wake_locked(self, inst: EngineProcess) -> None:
        with inst.operation("wake"):
            await self._make_room(inst)
            await inst.wake()

    # ---------------------------------------------------------- lifecycle API

    async def load(self, name: str) -> EngineProcess:
        inst = self.get(name)
        if inst.state == FAILED:
            inst.restart.reset()
        await asyncio.shield(self._ensure_task(inst))
        return inst

    async def sleep(self, name: str, level: int, *, reason: str = "api") -> EngineProcess:
        inst = self.get(name)
        if level not in (1, 2):
            raise BadRequest(f"level must be 1 or 2, got {level}")
        await self._wait_no_op(inst)
        if inst.state == SLEEPING and inst.life.sleep_level == placement.effective_sleep_level(
            level, inst.spec.lora_enabled
        ):
            return inst
        if inst.state != READY:
            raise Conflict(f"model {name} is {inst.state}; only a ready model can sleep")
        # Claimed before taking the locks, without yielding: new requests wait for the wake.
        with inst.operation("sleep"):
            async with self._locked(inst, neighbours=False):
                if inst.state != READY or not inst.process_alive:
                    raise Conflict(f"model {name} is {inst.state}; only a ready model can sleep")
                await inst.sleep(level, reason=reason)
        return inst

    async def wake(self, name: str) -> EngineProcess:
        inst = self.get(name)
        if inst.state not in (SLEEPING, READY):
            raise Conflict(f"model {name} is {inst.state}; POST /models/{name}/load starts it")
        await self.ensure_ready(inst)
        return inst

    async def unload(self, name: str, *, reason: str = "api") -> EngineProcess:
        inst = self.get(name)
        if inst.ready_task is not None and not inst.ready_task.done():
            inst.ready_task.cancel()  # a load under way stops its own engine when cancelled
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await inst.ready_task
        await self._wait_no_op(inst)
        with inst.operation("stop"):
            async with self._locked(inst, neighbours=False):
                await inst.wait_idle(self.cfg.drain_timeout)
                await inst.stop(reason=reason)
        return inst

    # ------------------------------------------------------------ idle timers

    def check_idle(self) -> None:
        now = time.monotonic()
        for inst in self.instances.values():
            spec = inst.spec
            action = idle_action(
                state=inst.state,
                in_flight=inst.in_flight,
                busy=inst.busy,
                pinned=spec.pinned,
                idle_for=now - inst.last_used,
                idle_timeout=spec.idle_timeout,
                unload_timeout=spec.unload_timeout,
                sleep_level_on_idle=spec.sleep_level_on_idle,
                sleep_on_unload=spec.sleep_on_unload,
                stop_idle_timeout=spec.stop_idle_timeout,
                parked=inst.parked,
            )
            # Never wait behind a start on the same GPU (the model could not serve meanwhile):
            # try again on the next tick.
            if action is None or not self._locks_free(inst):
                continue
            inst.claim({IDLE_SLEEP: "sleep", IDLE_UNLOAD: "sleep"}.get(action, "stop"))
            self._spawn_task(self._idle(inst, action))

    async def _idle(self, inst: EngineProcess, action: str) -> None:
        try:
            async with self._locked(inst, neighbours=False):
                if inst.in_flight or not inst.process_alive:
                    return
                if action == IDLE_SLEEP and inst.state == READY:
                    await inst.sleep(inst.spec.sleep_level_on_idle, reason="idle")
                elif action == IDLE_UNLOAD and inst.state in (READY, SLEEPING):
                    await self._unload_idle(inst)
                elif action not in (IDLE_SLEEP, IDLE_UNLOAD) and inst.state in (READY, SLEEPING):
                    await inst.stop(reason="idle")
        finally:
            inst.release()

    async def _unload_idle(self, inst: EngineProcess) -> None:
        """unload_timeout with sleep_on_unload (placement.unload_step): sleep deep rather than stop
        while the GPU has room; the caller holds its locks and `op`."""
        await self.refresh_gpus()
        step = placement.unload_step(
            state=inst.state,
            sleep_level=inst.life.sleep_level,
            lora_enabled=inst.spec.lora_enabled,
            memory_wanted=self.memory_wanted(inst),
            wake_fits=inst.state == SLEEPING and self.plan_for(inst).fits,
        )
        if step == placement.UNLOAD_STOP:
            log.info("%s: idle past unload_timeout and a waiting load needs its memory: stopping it", inst.name)
            await inst.stop(reason="idle")
            return
        if step == placement.UNLOAD_DEEPEN:
            # vLLM puts only an awake engine to sleep: wake it (room checked), then level 2. Its idle
            # time is kept, so stop_idle_timeout still counts from its last request.
            used, used_wall = inst.last_used, inst.last_used_wall
            await inst.wake()
            inst.last_used, inst.last_used_wall = used, used_wall
        if step in (placement.UNLOAD_SLEEP, placement.UNLOAD_DEEPEN):
            log.info("%s: idle past unload_timeout with memory to spare: sleeping at level 2 instead of stopping", inst.name)
            await inst.sleep(2, reason="unload")
        inst.parked = True


async def _until_one_idle(busy: list[EngineProcess], timeout: float) -> None:
    """Return once one of `busy` has no request in flight and no operation under way, or after
    `timeout` s. Polls attributes only (no I/O): the caller measures and plans again after."""
    end = time.monotonic() + timeout
    while True:
        await asyncio.sleep(0.05)
        if time.monotonic() >= end or any(not v.in_flight and v.op is None for v in busy):
            return
