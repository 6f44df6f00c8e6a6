"""NVML reading with a stand-in `pynvml` module (the driver's library is third-party): what the agent makes of it."""

import os
import sys
import types

import pytest

from mvllm.agent.gpu import EngineRef, NvmlBackend

GIB = 1024**3


class FakeNvml(types.ModuleType):
    """The few nvidia-ml-py calls the agent makes, over two GPUs."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, procs_on_gpu1):
        super().__init__("pynvml")
        self.procs = {0: [], 1: procs_on_gpu1}
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(total=80 * GIB, used=(h + 1) * 10 * GIB)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}"

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=37)

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise self.NVMLError("not supported")  # some boards: the reading is simply absent

    def nvmlDeviceGetPowerUsage(self, h):
        return 123456  # milliwatts

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs[h]]


@pytest.fixture
def fake_nvml(monkeypatch):
    # This test process stands for an engine: its own session id is the engine's.
    fake = FakeNvml([(os.getpid(), 12 * GIB), (999999, None)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


async def test_reads_gpus_and_attributes_processes_by_session(fake_nvml):
    backend = NvmlBackend()
    assert backend.available
    me = EngineRef("my-model", os.getsid(0), None, (1,))
    sample = await backend.sample([me])
    assert [g.index for g in sample.gpus] == [0, 1]
    g1 = sample.gpus[1]
    assert g1.name == "NVIDIA H100 80GB HBM3" and g1.uuid == "GPU-1"
    assert g1.memory_used_bytes == 20 * GIB and g1.memory_free_bytes == 60 * GIB
    assert g1.utilization_pct == 37.0 and g1.power_w == pytest.approx(123.456) and g1.temperature_c is None
    assert [(p.pid, p.instance, p.memory_bytes) for p in g1.processes] == [
        (os.getpid(), "my-model", 12 * GIB),
        (999999, None, 0),  # hidden memory (containers) counts as 0, unknown pid as nobody's
    ]
    assert sample.by_instance == {"my-model": {1: 12 * GIB}}
    assert sample.gpu_pids() == {os.getpid(), 999999}
    backend.close()
    assert fake_nvml.shutdown


async def test_no_nvml_means_no_gpus(monkeypatch):
    class Broken(types.ModuleType):
        def nvmlInit(self):
            raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", Broken("pynvml"))
    backend = NvmlBackend()
    assert not backend.available
    sample = await backend.sample([EngineRef("m", 1, None, (0,))])
    assert sample.gpus == [] and sample.by_instance == {}
