"""What the engines of one agent need and hold on each GPU, read from the last GPU sample as
mvllm.agent.placement takes it. Pure: no I/O, no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from mvllm.agent import placement
from mvllm.agent.config import ModelSpec
from mvllm.agent.gpu import GpuSample
from mvllm.agent.process import EngineProcess
from mvllm.common.state import READY, SLEEPING, STARTING


def gpu_map(sample: GpuSample) -> dict[int, placement.Gpu]:
    return {g.index: placement.Gpu(g.index, g.memory_total_bytes, g.memory_used_bytes) for g in sample.gpus}


def need(spec: ModelSpec, gpus: dict[int, placement.Gpu]) -> dict[int, int]:
    """Budget per GPU of `spec`; GPUs we know nothing of are left out (no placement check there)."""
    est = spec.memory_estimate  # no budget given: estimated from its shape (None: 0.9 of the GPU)
    return {
        d: placement.need_bytes(spec.memory_gib, spec.gpu_memory_utilization, gpus[d].total, est and est.bytes)
        for d in spec.devices
        if d in gpus
    }


def held(inst: EngineProcess, gpus: dict[int, placement.Gpu]) -> dict[int, int]:
    """What `inst` holds per GPU: measured, or (NVML pids not ours to see, as in a container
    without the host's PID namespace) estimated from its budget and state."""
    if inst.stats.memory:
        return dict(inst.stats.memory)
    if inst.state == SLEEPING:
        return {d: min(n, placement.SLEEP_RESIDUAL) for d, n in need(inst.spec, gpus).items()}
    if inst.state == READY:
        return need(inst.spec, gpus)
    return {}


def residents(engines: Iterable[EngineProcess], gpus: dict[int, placement.Gpu]) -> list[placement.Resident]:
    return [
        placement.Resident(
            name=i.name,
            state=i.state,
            memory=held(i, gpus),
            last_used=i.last_used,
            in_flight=i.in_flight,
            busy=i.op is not None,
            pinned=i.spec.pinned,
            sleep_level_on_idle=i.spec.sleep_level_on_idle,
            lora_enabled=i.spec.lora_enabled,
            wake_s=i.timings.wake_s(i.life.sleep_level if i.state == SLEEPING else i.spec.effective_sleep_level_on_idle),
            cold_s=i.timings.cold_start_s,
        )
        for i in engines
        if i.has_process
    ]


def pending(engines: Iterable[EngineProcess], gpus: dict[int, placement.Gpu], exclude: str) -> dict[int, int]:
    """Memory that starting engines (other than `exclude`) will take and do not hold yet."""
    out: dict[int, int] = {}
    for i in engines:
        if i.name == exclude or i.state != STARTING or not i.has_process:
            continue
        for d, n in need(i.spec, gpus).items():
            out[d] = out.get(d, 0) + max(0, n - i.stats.memory.get(d, 0))
    return out


def plan_for(
    inst: EngineProcess,
    engines: list[EngineProcess],
    sample: GpuSample,
    reserve_bytes: int,
    *,
    include_in_flight: bool = False,
    now: float | None = None,
) -> placement.Plan:
    """How `inst` fits among `engines` (every engine of the agent), with what evicted if it does not."""
    gpus = gpu_map(sample)
    wanted = need(inst.spec, gpus)
    if inst.state == SLEEPING:
        has = held(inst, gpus)
        wanted = {d: max(0, n - has.get(d, 0)) for d, n in wanted.items()}
    return placement.plan(
        inst.name,
        wanted,
        gpus,
        residents(engines, gpus),
        reserve_bytes,
        pending(engines, gpus, inst.name),
        include_in_flight=include_in_flight,
        now=now,
    )


def launch_utilization(spec: ModelSpec, sample: GpuSample, reserve_bytes: int) -> tuple[float | None, int | None]:
    """(--gpu-memory-utilization, total bytes of its first GPU) from the memory free now."""
    gpus = gpu_map(sample)
    known = [d for d in spec.devices if d in gpus]
    if not known:
        return spec.gpu_memory_utilization, None  # no NVML: the configured fraction, if any
    first = gpus[known[0]]
    budget = need(spec, gpus)[first.index]
    free = min(gpus[d].total - gpus[d].used for d in known)
    return placement.launch_utilization(budget, first.total, free, reserve_bytes), first.total
