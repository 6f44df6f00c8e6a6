"""The agent's `GET /state` document: typed dataclasses, versioned, shared by agent, router and dashboard.

Contract (version 1)
--------------------
`GET /state` (bearer token) returns one JSON object, `AgentState`:

    version       int     schema version; a reader refuses a document whose version it does not know
    agent         str     mvllm version of the agent
    host          str     host name of the GPU machine
    engine        str     "vllm" or "sim"
    time          float   unix time the snapshot was taken
    started_at    float   unix time the agent started
    gpus          [GpuState]        one per GPU (NVML, PCI order) or per simulated GPU; [] without NVML
    instances     [InstanceState]   one per catalog model, stopped ones included
    catalog       [CatalogEntry]    what the agent can load, with where it would fit now
    stale_engines [StaleEngine]     engine processes found at start that no live agent owns

Units: memory in bytes, times in unix seconds (or seconds for durations, suffix `_s`), utilization
in percent. Optional numbers are `null` when unknown (no NVML, engine not scraped yet).

A reader ignores keys it does not know (later minor additions keep the version), and every field
not listed as required has a default, so `from_dict` accepts a document from an older agent of the
same version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATE_VERSION = 1

# Instance states; `sleeping` carries its level in `InstanceState.sleep_level` (1 or 2).
STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
SLEEPING = "sleeping"
STOPPING = "stopping"
FAILED = "failed"
INSTANCE_STATES = (STOPPED, STARTING, READY, SLEEPING, STOPPING, FAILED)

# Where a catalog model stands for the router's choice (DESIGN.md §3, "no node has the model awake"):
# awake > sleeping > fits (cold load without eviction) > evict (cold load after eviction) > no_room.
PLACEMENT_AWAKE = "awake"
PLACEMENT_SLEEPING = "sleeping"
PLACEMENT_FITS = "fits"
PLACEMENT_EVICT = "evict"
PLACEMENT_NO_ROOM = "no_room"
PLACEMENTS = (PLACEMENT_AWAKE, PLACEMENT_SLEEPING, PLACEMENT_FITS, PLACEMENT_EVICT, PLACEMENT_NO_ROOM)


class StateVersionError(ValueError):
    """A /state document of a schema version this reader does not understand."""


def _from(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass `cls` from `data`, ignoring unknown keys (forward compatibility)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class GpuProcess:
    """A process holding memory on a GPU (NVML compute process, or a simulated engine)."""

    pid: int
    memory_bytes: int
    instance: str | None = None  # catalog name of the engine it belongs to, when it is ours

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuProcess:
        return _from(cls, data)


@dataclass
class GpuState:
    index: int  # NVML index (PCI bus order, as CUDA_DEVICE_ORDER=PCI_BUS_ID) or sim GPU index
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    uuid: str = ""
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    simulated: bool = False
    processes: list[GpuProcess] = field(default_factory=list)

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory_free_bytes"] = self.memory_free_bytes
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuState:
        gpu = _from(cls, data)
        gpu.processes = [GpuProcess.from_dict(p) for p in data.get("processes") or []]
        return gpu


@dataclass
class LoadTimings:
    """What the agent last measured of one model's loads (kept across agent restarts when the agent
    has a state_dir). A minor addition to version 1."""

    cold_start_s: float | None = None  # spawn -> ready of its last cold start
    cold_start_warm: bool | None = None  # that start was handed to the warm launcher's standby
    cold_start_at: float | None = None  # unix time it became ready
    cold_start_phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds after spawn it began
    wake_1_s: float | None = None  # last wake from sleep level 1
    wake_2_s: float | None = None  # last wake from sleep level 2 (weights reloaded)

    def wake_s(self, level: int) -> float | None:
        return self.wake_1_s if level == 1 else self.wake_2_s if level == 2 else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadTimings:
        t = _from(cls, data)
        t.cold_start_phases = {str(k): float(v) for k, v in (data.get("cold_start_phases") or {}).items()}
        return t


@dataclass
class LoadProgress:
    """A load or wake under way (mvllm.agent.loadphase): where it is and the time it should still take.
    A minor addition to version 1."""

    kind: str  # "cold" (engine start) or "wake"
    phase: str  # cold: spawned, imported, weights, compile, kv_cache, graphs, ready; wake: waking
    started_at: float  # unix time of the spawn (or of the wake call)
    phase_at: float  # unix time the phase began
    elapsed_s: float
    remaining_s: float | None = None  # predicted; null when nothing predicts it
    warm: bool | None = None  # cold: handed to the warm launcher's standby
    level: int = 0  # wake: the sleep level it wakes from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadProgress:
        return _from(cls, data)


@dataclass
class InstanceState:
    """One catalog model's engine on this host (present for stopped models too)."""

    name: str  # catalog name (the key of [models.NAME]); lifecycle API uses it
    state: str  # one of INSTANCE_STATES
    served_model_names: list[str] = field(default_factory=list)  # names clients send as `model`
    loras: list[str] = field(default_factory=list)  # LoRA adapters loaded in the engine now
    sleep_level: int = 0  # 1 or 2 while sleeping, else 0
    port: int | None = None  # engine port on 127.0.0.1 (reachable from the agent's host only)
    url: str | None = None
    pid: int | None = None  # engine API process (also its process group and session id)
    devices: list[int] = field(default_factory=list)
    last_used: float | None = None  # unix time of the last request start or end
    in_flight: int = 0  # requests the agent is relaying to it now
    # Takes no new request on this agent (its requests in flight finish): drained to make room for
    # another model after max_switch_wait. A minor addition to version 1 (older readers ignore it).
    draining: bool = False
    queued: int = 0  # requests waiting for it to load or wake
    running: int = 0  # engine's vllm:num_requests_running (last scrape)
    waiting: int = 0  # engine's vllm:num_requests_waiting (last scrape)
    capacity: int | None = None  # max_num_seqs it was started with, when known
    memory_bytes: int | None = None  # GPU memory it holds now, measured, all devices together
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0  # crash restarts since the agent started
    loads: int = 0  # engine starts (cold loads) since the agent started
    pinned: bool = False
    error: str | None = None  # why it failed, or the last crash
    log_tail: list[str] = field(default_factory=list)  # last log lines, filled when failed
    adhoc: bool = False  # started by POST /instances (not from the catalog file)
    expires_at: float | None = None  # ad hoc: unix time its ttl ends (stopped then, once idle)
    load: LoadProgress | None = None  # the load or wake under way, else null
    timings: LoadTimings = field(default_factory=LoadTimings)

    @property
    def awake(self) -> bool:
        return self.state == READY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstanceState:
        inst = _from(cls, data)
        inst.load = LoadProgress.from_dict(data["load"]) if isinstance(data.get("load"), dict) else None
        inst.timings = LoadTimings.from_dict(data["timings"]) if isinstance(data.get("timings"), dict) else LoadTimings()
        if inst.state not in INSTANCE_STATES:
            raise ValueError(f"instance {inst.name!r}: unknown state {inst.state!r}")
        return inst


@dataclass
class CatalogEntry:
    """A model the agent can serve, and where it stands for placement right now."""

    name: str
    model: str  # HF id or path given to the engine
    served_model_names: list[str] = field(default_factory=list)
    lora_adapters: list[str] = field(default_factory=list)  # adapter names, each routable as a model
    devices: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1
    memory_bytes: int | None = None  # budget per device (from memory_gib or utilization x total)
    gpu_memory_utilization: float | None = None
    max_model_len: int | str | None = None
    max_num_seqs: int | None = None
    pinned: bool = False
    preload: bool = False
    idle_timeout_s: float | None = None
    sleep_level_on_idle: int = 1
    unload_timeout_s: float | None = None
    placement: str = PLACEMENT_FITS  # one of PLACEMENTS
    evict: list[str] = field(default_factory=list)  # models a cold load would sleep or stop now
    adhoc: bool = False  # an ad-hoc instance (POST /instances), gone when its ttl ends or it is deleted
    # Without a budget in the catalog: {bytes (per device, or null), basis (what was assumed),
    # weights_bytes, kv_bytes, overhead_bytes}; null when the entry gives a budget.
    memory_estimate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CatalogEntry:
        return _from(cls, data)

    def routable_names(self) -> list[str]:
        return [*self.served_model_names, *self.lora_adapters]


@dataclass
class StaleEngine:
    pid: int
    cmdline: str
    instance: str | None = None  # catalog name from our launch marker, when it has one
    reaped: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StaleEngine:
        return _from(cls, data)


@dataclass
class AgentState:
    host: str
    engine: str
    version: int = STATE_VERSION
    agent: str = ""
    time: float = 0.0
    started_at: float = 0.0
    gpus: list[GpuState] = field(default_factory=list)
    instances: list[InstanceState] = field(default_factory=list)
    catalog: list[CatalogEntry] = field(default_factory=list)
    stale_engines: list[StaleEngine] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "agent": self.agent,
            "host": self.host,
            "engine": self.engine,
            "time": self.time,
            "started_at": self.started_at,
            "gpus": [g.to_dict() for g in self.gpus],
            "instances": [i.to_dict() for i in self.instances],
            "catalog": [c.to_dict() for c in self.catalog],
            "stale_engines": [asdict(s) for s in self.stale_engines],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentState:
        if not isinstance(data, dict):
            raise ValueError("agent state: expected a JSON object")
        version = data.get("version")
        if version != STATE_VERSION:
            raise StateVersionError(f"agent state version {version!r}; this reader knows {STATE_VERSION}")
        state = _from(cls, data)
        state.gpus = [GpuState.from_dict(g) for g in data.get("gpus") or []]
        state.instances = [InstanceState.from_dict(i) for i in data.get("instances") or []]
        state.catalog = [CatalogEntry.from_dict(c) for c in data.get("catalog") or []]
        state.stale_engines = [StaleEngine.from_dict(s) for s in data.get("stale_engines") or []]
        return state

    def instance(self, name: str) -> InstanceState | None:
        return next((i for i in self.instances if i.name == name), None)

    def find_model(self, model: str) -> CatalogEntry | None:
        """The catalog entry that serves `model` (a served name or a LoRA adapter name)."""
        return next((c for c in self.catalog if model in c.routable_names()), None)
