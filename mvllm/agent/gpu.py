"""GPU data for the agent: NVML (real GPUs, never a CUDA context) or simulated GPUs fed by `mvllm sim` engines.

Both backends answer one question, `sample(engines)`: every GPU's memory and load now, and how
much memory each of our engines holds on each GPU. No NVML (no driver, no GPU) gives an empty list
and the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from mvllm.agent.config import GIB, SimGpuSpec
from mvllm.agent.procs import read_stat
from mvllm.common.state import GpuProcess, GpuState

log = logging.getLogger("mvllm.agent.gpu")


@dataclass(frozen=True)
class EngineRef:
    """What a backend needs to know of one live engine."""

    name: str
    sid: int | None  # session (= process group) of the engine, from start_new_session
    url: str | None  # http://127.0.0.1:PORT
    devices: tuple[int, ...]


@dataclass
class GpuSample:
    gpus: list[GpuState] = field(default_factory=list)
    by_instance: dict[str, dict[int, int]] = field(default_factory=dict)  # name -> GPU -> bytes
    running: dict[str, int] = field(default_factory=dict)  # sim only: requests running per engine

    def gpu_pids(self) -> set[int]:
        return {p.pid for g in self.gpus for p in g.processes}


class GpuBackend(Protocol):
    simulated: bool

    async def sample(self, engines: Sequence[EngineRef]) -> GpuSample: ...

    def close(self) -> None: ...


class NvmlBackend:
    """Real GPUs through nvidia-ml-py; indices are NVML's, i.e. PCI bus order."""

    simulated = False

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no library, no driver, no GPU: all the same to us
            log.warning("NVML not available (%s): no GPU data, placement checks off", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    async def sample(self, engines: Sequence[EngineRef]) -> GpuSample:
        if self._nvml is None:
            return GpuSample()
        # NVML calls block (and can take milliseconds each on a busy driver): keep them off the loop.
        return await asyncio.to_thread(self._read, list(engines))

    def _read(self, engines: list[EngineRef]) -> GpuSample:
        nv = self._nvml
        by_sid = {e.sid: e.name for e in engines if e.sid is not None}
        sample = GpuSample()
        try:
            count = nv.nvmlDeviceGetCount()
        except nv.NVMLError as exc:
            log.warning("NVML device count failed: %s", exc)
            return sample
        for i in range(count):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                gpu = GpuState(
                    index=i,
                    name=_text(nv.nvmlDeviceGetName(h)),
                    uuid=_text(nv.nvmlDeviceGetUUID(h)),
                    memory_total_bytes=int(mem.total),
                    memory_used_bytes=int(mem.used),
                )
            except nv.NVMLError as exc:
                log.warning("NVML read of GPU %d failed: %s", i, exc)
                continue
            with contextlib.suppress(nv.NVMLError):
                gpu.utilization_pct = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            with contextlib.suppress(nv.NVMLError):
                gpu.temperature_c = float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
            with contextlib.suppress(nv.NVMLError):
                gpu.power_w = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
            procs: list[Any] = []
            with contextlib.suppress(nv.NVMLError):
                procs = list(nv.nvmlDeviceGetComputeRunningProcesses(h))
            for p in procs:
                used = int(p.usedGpuMemory or 0)  # None when the driver hides it (containers)
                info = read_stat(int(p.pid))
                owner = by_sid.get(info.sid) if info is not None else None
                gpu.processes.append(GpuProcess(pid=int(p.pid), memory_bytes=used, instance=owner))
                if owner is not None:
                    per = sample.by_instance.setdefault(owner, {})
                    per[i] = per.get(i, 0) + used
            sample.gpus.append(gpu)
        return sample

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SimBackend:
    """Simulated GPUs from agent.toml; used memory = Σ of `GET /sim/state` memory_bytes of the engines on each."""

    simulated = True

    def __init__(self, specs: Sequence[SimGpuSpec], session: aiohttp.ClientSession, timeout_s: float = 2.0) -> None:
        self.specs = list(specs)
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def _engine_state(self, e: EngineRef) -> dict[str, Any] | None:
        if e.url is None:
            return None
        try:
            async with self.session.get(f"{e.url}/sim/state", timeout=self.timeout) as resp:
                if resp.status != 200:
                    return None
                return await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None  # not listening yet, or gone: it holds nothing we can see

    async def sample(self, engines: Sequence[EngineRef]) -> GpuSample:
        engines = list(engines)
        states = await asyncio.gather(*(self._engine_state(e) for e in engines))
        sample = GpuSample()
        gpus = [
            GpuState(
                index=i,
                name=s.name,
                uuid=f"SIM-{i:04d}",
                memory_total_bytes=int(s.memory_gib * GIB),
                memory_used_bytes=0,
                utilization_pct=0.0,
                simulated=True,
            )
            for i, s in enumerate(self.specs)
        ]
        for e, st in zip(engines, states, strict=True):
            if st is None:
                continue
            # The sim reports what it holds on each of its GPUs (weights / tp + KV), like NVML per device.
            held = int(st.get("memory_bytes") or 0)
            per = {d: held for d in e.devices}
            sample.by_instance[e.name] = per
            running = int(st.get("running") or 0)
            sample.running[e.name] = running
            pid = int(st.get("pid") or e.sid or 0)
            for d, b in per.items():
                if d < len(gpus):
                    gpus[d].memory_used_bytes += b
                    gpus[d].processes.append(GpuProcess(pid=pid, memory_bytes=b, instance=e.name))
                    if running:
                        gpus[d].utilization_pct = 100.0
        sample.gpus = gpus
        return sample

    def close(self) -> None:
        pass
