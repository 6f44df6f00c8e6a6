"""Pure placement policy: does a model fit on its GPUs now, which idle models to evict, and the launch fraction.

Memory model (bytes, per GPU):
    headroom(d) = total(d) − used(d) − reserve − pending(d)
where `used` is measured (NVML, or the sum of simulated engines), and `pending` is memory that
engines still starting will take but do not hold yet (their budget minus what they hold now).
A model with budget `need(d)` on each of its devices fits when `headroom(d) ≥ need(d)` for each.

Eviction (when it does not fit): candidates are the instances that hold memory on a short GPU,
are unpinned, have no request in flight and no operation under way; the cheapest to lose first
(`eviction_key`: what bringing it back would cost, from measured wake and cold-start times, per
second it has been idle; with no measures, or costs alike, that is least recently used first).
  pass 1 — awake candidates are put to sleep at their `sleep_level_on_idle` (stopped if it is 0;
           level 1 instead of 2 for a LoRA engine, see `effective_sleep_level`);
           a sleep is expected to free all but `sleep_residual` of what they hold;
  pass 2 — if still short, sleeping candidates (those of pass 1 included) are stopped.
The plan is an estimate: the agent carries out its first step, measures again and plans again,
so what is freed is measured, never assumed. With `include_in_flight`, instances with requests in
flight count as candidates too: the agent uses that plan to tell "wait for them to finish" (then
evict them, idle) from "never fits" (NoRoom at once); it never evicts one while it is busy.

Fair switches (`switch_step`): a load that waits for busy models in its way waits at most
`max_switch_wait` seconds for one of them to go idle; then it drains them (no new requests on this
agent, those in flight finish) and evicts each once idle. No request in flight is ever cut.

Sleep before stop (`unload_step`): at unload_timeout, a model the GPU has room for is put at the
deepest sleep it survives (level 2, 1 for LoRA) instead of being stopped, so its next request is a
wake, not a cold start; it is stopped when a waiting load needs the memory (or by eviction, or
after stop_idle_timeout).

Launch fraction (VLLM.md §1.5): vLLM refuses to start when free < total × utilization, so a
co-located engine gets `min(need, free − reserve) / total`, floored to 0.001.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from mvllm.common.state import READY, SLEEPING, STOPPED

GIB = 1024**3
DEFAULT_UTILIZATION = 0.9  # a model given neither a budget nor a fraction (vLLM's own default is 0.92)
SLEEP_RESIDUAL = GIB  # what a sleeping engine keeps per GPU (CUDA context; ~960 MiB seen on H100)

ACTION_SLEEP = "sleep"
ACTION_STOP = "stop"

# Costs of bringing an evicted model back, when nothing was measured (seconds).
DEFAULT_WAKE_S = 1.0
DEFAULT_COLD_S = 60.0
# Costs below this are alike to a user: between them, recency alone decides.
COST_FLOOR_S = 1.0


def max_sleep_level(lora_enabled: bool) -> int:
    """The deepest sleep an engine survives. vLLM 0.25 with --enable-lora cannot reload its weights
    after a level-2 sleep (`reload_weights` answers 500, then the engine dies): level 1 at most."""
    return 1 if lora_enabled else 2


def effective_sleep_level(level: int, lora_enabled: bool) -> int:
    """The level the agent actually sleeps at when `level` is asked for (0 stays 0: stop, no sleep)."""
    return min(level, max_sleep_level(lora_enabled))


@dataclass(frozen=True)
class Gpu:
    index: int
    total: int
    used: int


@dataclass(frozen=True)
class Resident:
    """An instance that holds (or is about to hold) GPU memory."""

    name: str
    state: str
    memory: Mapping[int, int]  # bytes held now per GPU index (measured)
    last_used: float
    in_flight: int = 0
    busy: bool = False  # an operation (start, wake, sleep, stop) is under way
    pinned: bool = False
    sleep_level_on_idle: int = 1
    lora_enabled: bool = False  # caps its sleep at level 1
    wake_s: float | None = None  # measured wake from the level it sleeps (or would sleep) at
    cold_s: float | None = None  # measured cold start


def eviction_key(r: Resident, action: str, now: float | None) -> tuple[float, float]:
    """Order of eviction candidates, lowest first: the seconds that bringing `r` back would cost
    after `action` (a sleep: its wake; a stop: its cold start less the wake it would have had),
    floored at COST_FLOOR_S, per second it has been idle. Ties (and `now` None): least recently used."""
    if now is None:
        return (0.0, r.last_used)
    wake = r.wake_s if r.wake_s is not None else DEFAULT_WAKE_S
    if action == ACTION_SLEEP:
        cost = wake
    else:
        cold = r.cold_s if r.cold_s is not None else DEFAULT_COLD_S
        cost = cold - wake if r.state == SLEEPING else cold
    return (max(cost, COST_FLOOR_S) / max(now - r.last_used, 1e-3), r.last_used)


@dataclass(frozen=True)
class Step:
    name: str
    action: str  # ACTION_SLEEP or ACTION_STOP
    level: int = 0  # sleep level for ACTION_SLEEP


@dataclass
class Plan:
    fits: bool  # fits now, no eviction needed
    feasible: bool  # fits now or after the steps (by estimate)
    steps: list[Step] = field(default_factory=list)
    short: dict[int, int] = field(default_factory=dict)  # bytes missing per GPU now (before steps)

    @property
    def victims(self) -> list[str]:
        return list(dict.fromkeys(s.name for s in self.steps))


def need_bytes(memory_gib: float | None, utilization: float | None, total: int, estimate: int | None = None) -> int:
    """The budget of a model on one GPU of `total` bytes: `memory_gib`, else `utilization` of the
    GPU, else the `estimate` (mvllm.agent.estimate), else DEFAULT_UTILIZATION of the GPU."""
    if memory_gib is not None:
        return int(memory_gib * GIB)
    if utilization is None and estimate is not None:
        return estimate
    return int((utilization if utilization is not None else DEFAULT_UTILIZATION) * total)


def headroom(gpu: Gpu, reserve: int, pending: int = 0) -> int:
    return gpu.total - gpu.used - reserve - pending


def shortfall(
    need: Mapping[int, int], gpus: Mapping[int, Gpu], reserve: int, pending: Mapping[int, int] | None = None
) -> dict[int, int]:
    """Bytes missing per GPU for `need` (GPU index -> bytes); empty when it fits.

    A GPU we have no data for (no NVML) is not counted short: the agent cannot know and lets the
    engine decide.
    """
    pending = pending or {}
    out: dict[int, int] = {}
    for d, n in need.items():
        gpu = gpus.get(d)
        if gpu is None:
            continue
        missing = n - headroom(gpu, reserve, pending.get(d, 0))
        if missing > 0:
            out[d] = missing
    return out


def _evictable(r: Resident, target: str, include_in_flight: bool = False) -> bool:
    return (
        r.name != target
        and not r.pinned
        and not r.busy
        and (include_in_flight or r.in_flight == 0)
        and r.state in (READY, SLEEPING)
    )


def plan(
    target: str,
    need: Mapping[int, int],
    gpus: Mapping[int, Gpu],
    residents: Iterable[Resident],
    reserve: int,
    pending: Mapping[int, int] | None = None,
    sleep_residual: int = SLEEP_RESIDUAL,
    include_in_flight: bool = False,
    now: float | None = None,
) -> Plan:
    """Whether `target` fits with `need` more bytes per GPU, and if not, what to evict (see module doc)."""
    short = shortfall(need, gpus, reserve, pending)
    if not short:
        return Plan(fits=True, feasible=True)
    missing = dict(short)
    cands = sorted(
        (
            r
            for r in residents
            if _evictable(r, target, include_in_flight) and any(r.memory.get(d, 0) > 0 for d in short)
        ),
        key=lambda r: eviction_key(r, ACTION_SLEEP if r.state == READY and r.sleep_level_on_idle else ACTION_STOP, now),
    )
    steps: list[Step] = []
    slept: list[Resident] = []

    def credit(freed_by_gpu: Mapping[int, int]) -> None:
        for d in list(missing):
            missing[d] -= freed_by_gpu.get(d, 0)
            if missing[d] <= 0:
                del missing[d]

    for r in cands:
        if not missing:
            break
        if r.state != READY or not any(d in missing for d in r.memory):
            continue
        if r.sleep_level_on_idle == 0:
            steps.append(Step(r.name, ACTION_STOP))
            credit(r.memory)
        else:
            steps.append(Step(r.name, ACTION_SLEEP, effective_sleep_level(r.sleep_level_on_idle, r.lora_enabled)))
            credit({d: max(0, m - sleep_residual) for d, m in r.memory.items()})
            slept.append(r)
    if missing:
        # Pass 2: stop sleeping ones, least recently used first; those slept above free their residual.
        residual_of = {r.name: {d: min(m, sleep_residual) for d, m in r.memory.items()} for r in slept}
        asleep = [*(replace(r, state=SLEEPING) for r in slept), *(c for c in cands if c.state == SLEEPING)]
        for r in sorted(asleep, key=lambda r: eviction_key(r, ACTION_STOP, now)):
            if not missing:
                break
            if not any(d in missing for d in r.memory):
                continue
            steps.append(Step(r.name, ACTION_STOP))
            credit(residual_of.get(r.name, r.memory))
        # A model both slept and then stopped is just stopped.
        stopped = {s.name for s in steps if s.action == ACTION_STOP}
        steps = [s for s in steps if not (s.action == ACTION_SLEEP and s.name in stopped)]
    return Plan(fits=False, feasible=not missing, steps=steps, short=short)


UNLOAD_STOP = "stop"  # stop the engine, as without sleep_on_unload
UNLOAD_SLEEP = "sleep"  # awake: sleep at the deepest level it survives
UNLOAD_DEEPEN = "deepen"  # asleep at level 1: wake it, then sleep at level 2
UNLOAD_KEEP = "keep"  # asleep as deep as it goes (or no room to deepen): leave it


def unload_step(*, state: str, sleep_level: int, lora_enabled: bool, memory_wanted: bool, wake_fits: bool) -> str:
    """What unload_timeout does to an idle model with sleep_on_unload (see the module doc).

    `memory_wanted`: a load waiting on one of its GPUs does not fit; `wake_fits`: waking it (to go
    from level 1 to level 2: vLLM sleeps only an awake engine) fits now without evicting anyone."""
    if memory_wanted or state not in (READY, SLEEPING):
        return UNLOAD_STOP if state != STOPPED else UNLOAD_KEEP
    deepest = max_sleep_level(lora_enabled)
    if state == READY:
        return UNLOAD_SLEEP
    if sleep_level >= deepest or not wake_fits:
        return UNLOAD_KEEP
    return UNLOAD_DEEPEN


@dataclass(frozen=True)
class SwitchStep:
    """What a load waiting for busy models does next."""

    drain: bool  # drain the busy models in the way now (max_switch_wait has passed)
    wait_s: float  # then wait this long, at most, for one of them to go idle, and plan again


def switch_step(waited: float, max_switch_wait: float, left: float, poll: float = 1.0) -> SwitchStep:
    """After `waited` s of waiting for busy models (with `left` s of load_timeout left): drain them
    once `max_switch_wait` has passed; look again after `poll` s at most, and no later than the
    moment the drain falls due."""
    drain = waited >= max_switch_wait
    wait = min(poll, left) if drain else min(poll, left, max_switch_wait - waited)
    return SwitchStep(drain=drain, wait_s=max(0.0, wait))


def launch_utilization(need: int, total: int, free: int, reserve: int) -> float:
    """`--gpu-memory-utilization` for an engine whose budget is `need` bytes on a GPU with `free` now."""
    if total <= 0:
        return DEFAULT_UTILIZATION
    usable = min(need, free - reserve)
    return max(0.001, math.floor(usable / total * 1000) / 1000)

