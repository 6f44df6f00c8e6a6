"""The simulated engine's clock: drives the Scheduler in real time, emits tokens, and owns sleep state.

Timing model (all configurable, see docs/simulator.md):
- a sequence admitted at time t emits its first token at
      t + ttft_ms + prefill_ms_per_token * (prompt tokens not found in the prefix cache);
  a prompt's blocks become cache hits for others only once its prefill is done;
- running sequences then decode in lock-step batches; one step, i.e. the time between two tokens of
  every running sequence, lasts
      itl_ms * (1 + batch_slowdown * (running - 1) / max_num_seqs)
  where `running` counts every admitted sequence (also those still in prefill);
- time to first token as a client sees it adds the queue wait before admission.
Sleep follows vLLM 0.25: while paused or asleep no request is admitted and no token is produced;
requests keep arriving and wait. Level 2 discards the weights: tokens produced after waking carry no
text until `reload_weights`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mvllm.sim.config import SLEEP_RESIDUAL_BYTES, SimConfig
from mvllm.sim.scheduler import Phase, Scheduler, Seq

SLEEP_TAGS = ("weights", "kv_cache")
log = logging.getLogger(__name__)


def prefill_seconds(cfg: SimConfig, uncached_tokens: int) -> float:
    return (cfg.ttft_ms + cfg.prefill_ms_per_token * max(0, uncached_tokens)) / 1000.0


def step_seconds(cfg: SimConfig, running: int) -> float:
    max_seqs = cfg.max_num_seqs or 1
    factor = 1.0 + cfg.batch_slowdown * max(0, running - 1) / max_seqs
    return cfg.itl_ms * factor / 1000.0


class EngineObserver(Protocol):
    """What the engine reports as it works (metrics.py implements it)."""

    def on_scheduled(self, seq: Seq, now: float, first_time: bool) -> None: ...
    def on_token(self, seq: Seq, now: float, itl: float | None) -> None: ...
    def on_finished(self, seq: Seq, reason: str, now: float) -> None: ...
    def on_preempted(self, seq: Seq) -> None: ...


@dataclass
class EngineSnapshot:
    running: int
    waiting: int
    deferred: int
    kv_usage: float
    sleep_level: int  # 0 awake (or only paused), 1 or 2
    paused: bool  # true while asleep or paused (level 0)
    running_loras: list[str]
    waiting_loras: list[str]


class Engine:
    """One simulated engine. `run()` is its background loop (owned by the app's cleanup_ctx)."""

    def __init__(
        self,
        cfg: SimConfig,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.observer = observer
        self.clock = clock
        self.sched = Scheduler(
            max_num_seqs=cfg.max_num_seqs or 1,
            num_gpu_blocks=cfg.num_gpu_blocks,
            block_size=cfg.block_size,
            max_loras=cfg.max_loras if cfg.enable_lora else None,
            enable_prefix_caching=cfg.enable_prefix_caching,
        )
        self._next_id = 0
        self._next_step_at: float | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._idle_waiters: list[asyncio.Future[None]] = []
        # Sleep state.
        self.sleep_level = 0
        self.asleep_tags: set[str] = set()
        self.paused = False  # level 0 or any sleep: nothing admitted, nothing produced
        self.weights_valid = True
        self._paused_at: float | None = None

    # --- requests ------------------------------------------------------------------------------
    def new_seq_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def submit(self, seq: Seq) -> None:
        self.sched.add(seq)
        self._kick()

    def abort(self, seq: Seq, reason: str = "abort") -> None:
        """Drop a sequence (client gone, sleep with mode=abort, shutdown); tells its sink."""
        if seq.phase is Phase.FINISHED:
            return
        self.sched.abort(seq)
        self._finished(seq, reason, self.clock())
        self._kick()

    # --- sleep ---------------------------------------------------------------------------------
    @property
    def is_sleeping(self) -> bool:
        return self.paused

    async def sleep(self, level: int, mode: str = "abort") -> None:
        """vLLM's `/sleep?level=&mode=`: abort (default) drops in-flight requests, wait drains
        them first, keep freezes them where they are; then the level applies."""
        if mode == "wait" and not self.paused:
            limit = self._next_id
            self.sched.admit_up_to = limit  # in-flight ones may still be admitted; newer ones wait
            self._kick()
            while self.sched.has_seqs_up_to(limit):
                fut = asyncio.get_running_loop().create_future()
                self._idle_waiters.append(fut)
                await fut
        elif mode == "abort":
            for seq in list(self.sched.all_seqs()):
                self.abort(seq, "abort")
        self._pause()
        level = min(max(level, 0), 2)
        if level >= 1:
            self.sched.reset_prefix_cache()
            self.sleep_level = level
            # Without --enable-sleep-mode vLLM 0.25 still pauses and reports sleeping, but its
            # allocator frees nothing ("Sleep mode freed 0.0 GiB"): memory and weights stay.
            if self.cfg.enable_sleep_mode:
                self.asleep_tags = set(SLEEP_TAGS)
                if level >= 2:
                    self.weights_valid = False

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM's `/wake_up[?tags=...]`: no tags wakes everything; the engine resumes only when
        fully awake."""
        if self.cfg.wake_ms > 0:
            await asyncio.sleep(self.cfg.wake_ms / 1000.0)
        if tags is None:
            self.asleep_tags.clear()
        else:
            self.asleep_tags -= set(tags)
        # vLLM resets its sleep-state gauge to "awake" on every wake_up, even a partial one; the
        # engine itself resumes only once every tag is awake (is_sleeping stays true until then).
        self.sleep_level = 0
        if not self.asleep_tags:
            self._resume()

    def reload_weights(self) -> None:
        self.weights_valid = True

    def reset_prefix_cache(self) -> None:
        self.sched.reset_prefix_cache()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._paused_at = self.clock()
        self.sched.admit_up_to = -1

    def _resume(self) -> None:
        if self.paused and self._paused_at is not None:
            # Frozen sequences (mode=keep) resume where they were: shift their timers.
            shift = self.clock() - self._paused_at
            for seq in self.sched.running:
                if seq.phase is Phase.PREFILL:
                    seq.ready_at += shift
            if self._next_step_at is not None:
                self._next_step_at += shift
        self.paused = False
        self._paused_at = None
        self.sched.admit_up_to = None
        self._kick()

    # --- observation ---------------------------------------------------------------------------
    def snapshot(self) -> EngineSnapshot:
        s = self.sched
        return EngineSnapshot(
            running=s.num_running,
            waiting=s.num_waiting,
            deferred=s.num_deferred(),
            kv_usage=s.kv_usage,
            sleep_level=self.sleep_level,
            paused=self.paused,
            running_loras=s.running_loras(),
            waiting_loras=s.waiting_loras(),
        )

    def memory_bytes(self) -> int:
        """Simulated GPU memory this engine holds on each of its GPUs now."""
        held = 0
        if "weights" not in self.asleep_tags:
            held += self.cfg.weights_bytes_per_gpu
        if "kv_cache" not in self.asleep_tags:
            held += self.cfg.kv_bytes_per_gpu
        if self.asleep_tags:
            held = max(held, SLEEP_RESIDUAL_BYTES)
        return held

    # --- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = self.clock()
            try:
                self._tick(now)
            except Exception:  # a bug here must not silently stall every request
                log.exception("mvllm sim: engine step failed")
            delay = self._next_delay(now)
            fut: asyncio.Future[None] = loop.create_future()
            self._wakeup = fut
            handle = loop.call_later(max(0.0, delay), _set_done, fut) if delay is not None else None
            try:
                await fut
            finally:
                self._wakeup = None
                if handle is not None:
                    handle.cancel()

    def abort_all(self, reason: str = "abort") -> None:
        for seq in list(self.sched.all_seqs()):
            self.abort(seq, reason)

    def _kick(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _tick(self, now: float) -> None:
        if not self.paused:
            eps = 1e-4
            if self._next_step_at is not None and now >= self._next_step_at - eps:
                self._decode_step(now)
                self._next_step_at = None  # the next step is timed from now, below
            for seq in list(self.sched.running):
                if seq.phase is Phase.PREFILL and seq.ready_at <= now + eps:
                    self.sched.mark_computed(seq)
                    if seq.pooling:
                        seq.first_token_at = now
                        self.sched.finish(seq)
                        self._finished(seq, seq.finish_reason, now)
                        continue
                    seq.phase = Phase.DECODE
                    self._emit(seq, now)
            for seq in self.sched.schedule(now):
                first_time = seq.generated == 0 and seq.preemptions == 0
                uncached = seq.prompt_tokens + seq.generated - seq.cached_tokens
                seq.ready_at = now + prefill_seconds(self.cfg, uncached)
                if self.observer is not None:
                    self.observer.on_scheduled(seq, now, first_time)
            decoding = any(s.phase is Phase.DECODE for s in self.sched.running)
            if not decoding:
                self._next_step_at = None
            elif self._next_step_at is None or self._next_step_at <= now:
                self._next_step_at = now + step_seconds(self.cfg, self.sched.num_running)
        self._notify_idle()

    def _next_delay(self, now: float) -> float | None:
        if self.paused:
            return None
        times = [s.ready_at for s in self.sched.running if s.phase is Phase.PREFILL]
        if self._next_step_at is not None:
            times.append(self._next_step_at)
        return (min(times) - now) if times else None

    def _decode_step(self, now: float) -> None:
        for seq in [s for s in self.sched.running if s.phase is Phase.DECODE]:
            if seq.phase is not Phase.DECODE:  # preempted earlier in this step
                continue
            for victim in self.sched.reserve_next_token(seq):
                if self.observer is not None:
                    self.observer.on_preempted(victim)
            if seq.phase is Phase.DECODE:
                self._emit(seq, now)

    def _emit(self, seq: Seq, now: float) -> None:
        itl = None if seq.last_token_at is None else now - seq.last_token_at
        seq.generated += 1
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.weights_valid = self.weights_valid
        if self.observer is not None:
            self.observer.on_token(seq, now, itl)
        if seq.sink is not None:
            seq.sink(seq, None)
        if seq.generated >= seq.target_tokens:
            self.sched.finish(seq)
            self._finished(seq, seq.finish_reason, now)

    def _finished(self, seq: Seq, reason: str, now: float) -> None:
        if self.observer is not None:
            self.observer.on_finished(seq, reason, now)
        if seq.sink is not None:
            seq.sink(seq, reason)

    def _notify_idle(self) -> None:
        if self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
