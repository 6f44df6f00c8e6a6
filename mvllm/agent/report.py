"""The supervisor seen as the `/state` document (mvllm.common.state): instances, catalog placement, GPUs."""

from __future__ import annotations

import time
from dataclasses import replace

from mvllm import __version__
from mvllm.agent.process import EngineProcess
from mvllm.agent.supervisor import Supervisor
from mvllm.common.state import (
    FAILED,
    PLACEMENT_AWAKE,
    PLACEMENT_EVICT,
    PLACEMENT_FITS,
    PLACEMENT_NO_ROOM,
    PLACEMENT_SLEEPING,
    READY,
    SLEEPING,
    AgentState,
    CatalogEntry,
    InstanceState,
)


def instance_state(sup: Supervisor, inst: EngineProcess) -> InstanceState:
    return InstanceState(
        name=inst.name,
        state=inst.state,
        served_model_names=list(inst.spec.served_model_names),
        loras=sorted(inst.loras),
        sleep_level=inst.life.sleep_level,
        port=inst.port,
        url=inst.url,
        pid=inst.pid,
        devices=list(inst.spec.devices),
        last_used=inst.last_used_wall,
        in_flight=inst.in_flight,
        draining=inst.draining,
        queued=inst.queued,
        running=inst.stats.running,
        waiting=inst.stats.waiting,
        capacity=inst.spec.max_num_seqs,
        # Unknown (None) while an engine runs and nothing measured it (no NVML); 0 when none runs.
        memory_bytes=sum(inst.stats.memory.values()) if inst.stats.memory else (0 if not inst.has_process else None),
        started_at=inst.history.started_at,
        ready_at=inst.history.ready_at,
        restarts=inst.history.restarts,
        loads=inst.history.loads,
        pinned=inst.spec.pinned,
        error=inst.history.error,
        log_tail=list(inst.history.log_tail) if inst.state == FAILED else [],
        adhoc=inst.spec.adhoc is not None,
        expires_at=inst.spec.adhoc.expires_at() if inst.spec.adhoc is not None else None,
        load=inst.load_progress(),
        timings=replace(inst.timings, cold_start_phases=dict(inst.timings.cold_start_phases)),
    )


def catalog_entry(sup: Supervisor, inst: EngineProcess) -> CatalogEntry:
    spec = inst.spec
    need = sup.need(spec)
    evict: list[str] = []
    if inst.state == READY:
        where = PLACEMENT_AWAKE
    elif inst.state == SLEEPING:
        where = PLACEMENT_SLEEPING
    else:
        plan = sup.plan_for(inst)
        where = PLACEMENT_FITS if plan.fits else PLACEMENT_EVICT if plan.feasible else PLACEMENT_NO_ROOM
        evict = plan.victims if plan.feasible else []
    return CatalogEntry(
        name=spec.name,
        model=spec.model,
        served_model_names=list(spec.served_model_names),
        lora_adapters=inst.lora_names(),
        devices=list(spec.devices),
        tensor_parallel_size=spec.tensor_parallel_size,
        memory_bytes=max(need.values()) if need else None,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        pinned=spec.pinned,
        preload=spec.preload,
        idle_timeout_s=spec.idle_timeout,
        sleep_level_on_idle=spec.effective_sleep_level_on_idle,  # what the agent carries out
        unload_timeout_s=spec.unload_timeout,
        placement=where,
        evict=evict,
        adhoc=spec.adhoc is not None,
        memory_estimate=est.to_dict() if (est := spec.memory_estimate) is not None else None,
    )


def snapshot(sup: Supervisor) -> AgentState:
    return AgentState(
        host=sup.host,
        engine=sup.cfg.engine,
        agent=__version__,
        time=time.time(),
        started_at=sup.started_at,
        gpus=list(sup.sample.gpus),
        instances=[instance_state(sup, i) for i in sup.instances.values()],
        catalog=[catalog_entry(sup, i) for i in sup.instances.values()],
        stale_engines=list(sup.stale),
    )
