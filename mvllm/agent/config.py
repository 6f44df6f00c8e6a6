"""The agent's `agent.toml`: typed dataclasses for the settings and the model catalog, and their loader."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mvllm.agent.adhoc_params import AdhocConfig, AdhocInfo, parse_adhoc
from mvllm.agent.estimate import VLLM_DTYPES, MemoryEstimate, ModelShape, estimate, flag_value
from mvllm.agent.modelfiles import read_shape
from mvllm.agent.placement import effective_sleep_level
from mvllm.common.envvars import AGENT_ENV, read_env
from mvllm.common.logfiles import LogConfig, parse_log_keys
from mvllm.common.tomlconf import ConfigError, Section, load_toml

GIB = 1024**3
DEFAULT_PORT = 7070
ENGINES = ("vllm", "sim")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ModelSpec:
    """One `[models.NAME]` entry: how to start the engine and how to treat it when idle."""

    name: str
    model: str
    served_model_names: list[str]
    devices: list[int] = field(default_factory=lambda: [0])
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    memory_gib: float | None = None  # budget on each of its devices; wins over utilization
    max_model_len: int | str | None = None
    max_num_seqs: int | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    idle_timeout: float | None = None  # seconds since last use before sleeping; None = never
    sleep_level_on_idle: int = 1  # 1, 2, or 0 = stop instead of sleeping
    unload_timeout: float | None = None  # seconds since last use before stopping; None = never
    # At unload_timeout, with memory to spare, sleep at level 2 instead of stopping (the next request
    # is a wake, not a cold start); stopped when memory is needed, or after stop_idle_timeout.
    sleep_on_unload: bool = True
    stop_idle_timeout: float | None = 86400.0
    pinned: bool = False  # never slept, stopped or evicted by the agent on its own
    preload: bool = False  # started when the agent starts
    lora_adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> path
    # Adapters loaded on demand: each subdirectory with an adapter_config.json (mvllm.agent.lora_dir).
    lora_dir: Path | None = None
    max_loras: int = 1
    max_lora_rank: int = 16
    sim: dict[str, Any] = field(default_factory=dict)  # `--sim-*` flags for engine = "sim"
    # Memory estimate inputs (mvllm.agent.estimate), used when neither budget above is given:
    param_count: float | None = None  # billions of parameters (seed 000's `param_count`)
    dtype: str | None = None  # vLLM --dtype (passed to the engine); also the estimate's bytes per weight
    shape: ModelShape | None = field(default=None, repr=False)  # from config.json, read at load
    shape_source: str | None = None  # the config.json read, or why none was found
    adhoc: AdhocInfo | None = None  # started by `POST /instances`, not from agent.toml

    @property
    def memory_estimate(self) -> MemoryEstimate | None:
        """The need per GPU estimated from the model's shape or param_count; None when the entry
        gives a budget (memory_gib or gpu_memory_utilization). Computed from the current fields,
        so a changed max_model_len or tensor_parallel_size counts at once."""
        if self.memory_gib is not None or self.gpu_memory_utilization is not None:
            return None
        try:
            return estimate(
                self.shape,
                param_count_b=self.param_count,
                dtype=self.dtype or flag_value(self.extra_args, "--dtype"),
                kv_dtype=flag_value(self.extra_args, "--kv-cache-dtype"),
                max_model_len=self.max_model_len,
                max_num_seqs=self.max_num_seqs,
                tensor_parallel_size=self.tensor_parallel_size,
                source="config.json" if self.shape is not None else (self.shape_source or "no config.json read"),
            )
        except ValueError as exc:  # an unreadable max_model_len: the engine will say so too
            return MemoryEstimate(None, f"no estimate: {exc}")

    @property
    def routable_names(self) -> list[str]:
        return [*self.served_model_names, *self.lora_adapters]

    @property
    def runtime_lora(self) -> bool:
        """Whether the agent starts its engine ready for adapters loaded at run time
        (`--enable-lora` and runtime LoRA updating): catalog adapters or a lora_dir."""
        return bool(self.lora_adapters) or self.lora_dir is not None

    @property
    def lora_enabled(self) -> bool:
        """Whether its engine runs with `--enable-lora` (catalog adapters, a lora_dir, or the flag in extra_args)."""
        return self.runtime_lora or any(
            a == "--enable-lora" or (a.startswith("--enable-lora=") and a.split("=", 1)[1].lower() not in ("false", "0"))
            for a in self.extra_args
        )

    @property
    def effective_sleep_level_on_idle(self) -> int:
        """`sleep_level_on_idle` as carried out: level 2 becomes 1 for a LoRA engine."""
        return effective_sleep_level(self.sleep_level_on_idle, self.lora_enabled)


@dataclass
class SimGpuSpec:
    memory_gib: float = 80.0
    name: str = "mvllm simulated GPU"


@dataclass(frozen=True)
class AgentConfig:
    """The agent's settings as loaded (agent.toml, then MVLLM_AGENT_* and flags); frozen from then on.

    `models` is the catalog as the file gave it; what changes at run time (ad-hoc entries,
    assignments) lives in `mvllm.agent.catalog.Catalog`."""

    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    token_env: str | None = None  # the variable the token came from (kept out of engines' env)
    engine: str = "vllm"
    engine_binary: list[str] = field(default_factory=lambda: ["vllm"])
    engine_port_range: tuple[int, int] = (9001, 9100)
    log_dir: Path = Path("logs")
    gpu_memory_reserve_gib: float = 1.0  # kept free on every GPU
    load_timeout: float = 600.0  # how long a request waits for a load or wake
    ready_timeout: float = 900.0  # how long an engine may take from spawn to ready
    stop_timeout: float = 30.0  # SIGTERM -> SIGKILL grace for an engine's process group
    drain_timeout: float = 30.0  # in-flight requests may finish before a manual sleep or stop
    # A load that needs a busy model's memory waits this long for it to go idle, then drains it
    # (no new requests; those in flight finish) and evicts it once idle.
    max_switch_wait: float = 30.0
    max_queue: int = 256  # requests that may wait for one model's load or wake
    restart_max: int = 3  # crashes within restart_window before the model is `failed`
    restart_window: float = 600.0
    restart_backoff: float = 1.0  # first restart delay, doubled per crash
    restart_backoff_max: float = 30.0
    poll_interval: float = 1.0  # GPU memory and engine metrics refresh
    reap_stale: bool = False
    # The agent's own log file (log_* keys; log_retention_days also ages out rotated engine logs),
    # and the size cap of each engine's log_dir/NAME.log (mvllm.agent.enginelogs).
    log: LogConfig = field(default_factory=LogConfig)
    engine_log_max_bytes: int = 50 * 1024**2
    engine_log_backups: int = 3
    log_check_interval: float = 5.0  # how often engine log sizes are checked
    sim_gpus: list[SimGpuSpec] = field(default_factory=list)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    # A standby process with the engine's modules imported (mvllm.agent.warm_launcher); None: on for
    # engine = "vllm" with the default engine_binary, off otherwise.
    warm_launcher: bool | None = None
    # vLLM's cache root (torch.compile and CUDA-graph caches) per catalog model: ENGINE_CACHE_DIR/NAME.
    engine_cache_dir: Path | None = None
    # Where the agent keeps what it measured (load timings) across restarts; None: memory only.
    state_dir: Path | None = None

    @property
    def warm_launcher_on(self) -> bool:
        if self.warm_launcher is not None:
            return self.warm_launcher
        return self.engine == "vllm" and self.engine_binary == ["vllm"]
    adhoc: AdhocConfig = field(default_factory=AdhocConfig)
    warnings: list[str] = field(default_factory=list)  # accepted but worth telling (logged at start)

    @property
    def reserve_bytes(self) -> int:
        return int(self.gpu_memory_reserve_gib * GIB)

    def model_for(self, requested: str) -> tuple[ModelSpec, str | None] | None:
        """The catalog entry serving `requested`, and the LoRA adapter name if it names one."""
        return model_for(self.models.values(), requested)


def model_for(specs: Iterable[ModelSpec], requested: str) -> tuple[ModelSpec, str | None] | None:
    """The entry of `specs` serving `requested`, and the LoRA adapter name if it names one."""
    for spec in specs:
        if requested in spec.served_model_names:
            return spec, None
        if requested in spec.lora_adapters:
            return spec, requested
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _duration(sec: Section, name: str, default: float | None) -> float | None:
    """Seconds; 0 means `never` for the idle timers."""
    value = sec.float(name, default, min=0)
    return None if value == 0 else value


def _int_list(sec: Section, name: str, default: list[int]) -> list[int]:
    value = sec.raw(name, default)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise sec.error(name, f"expected a non-empty list of GPU indices, got {value!r}")
    if len(set(value)) != len(value):
        raise sec.error(name, f"GPU indices repeat: {value!r}")
    return list(value)


def _str_table(sec: Section, name: str) -> dict[str, str]:
    value = sec.raw(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise sec.error(name, "expected a table of strings")
    return {str(k): v for k, v in value.items()}


def _command(sec: Section, name: str, default: list[str]) -> list[str]:
    value = sec.raw(name, default)
    if isinstance(value, str):
        value = shlex.split(value)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise sec.error(name, f"expected a command (string or list of strings), got {value!r}")
    return list(value)


def _model(sec: Section, name: str, defaults: dict[str, Any], base: Path) -> ModelSpec:
    if not _NAME_RE.match(name):
        raise ConfigError(sec.path, sec.prefix, f"model name {name!r} must be letters, digits, '.', '_' or '-'")
    served = sec.str_list("served_model_name", [name]) or [name]
    devices = _int_list(sec, "devices", [0])
    tp = sec.int("tensor_parallel_size", len(devices), min=1)
    if tp != len(devices):
        raise sec.error("tensor_parallel_size", f"is {tp} but devices lists {len(devices)} GPU(s)")
    util = sec.float("gpu_memory_utilization", None, min=0.01, max=1.0)
    mem = sec.float("memory_gib", None, min=0.01)
    max_len = sec.raw("max_model_len", None)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, str))):
        raise sec.error("max_model_len", f"expected an integer or a string like '32k', got {max_len!r}")
    loras_raw = sec.raw("lora_adapters", {})
    if not isinstance(loras_raw, dict) or not all(isinstance(v, str) for v in loras_raw.values()):
        raise sec.error("lora_adapters", "expected a table of adapter name = path")
    loras = {str(k): (str(base / v) if v.startswith(("./", "../")) else v) for k, v in loras_raw.items()}
    lora_dir = _lora_dir(sec, base)
    max_rank = sec.int("max_lora_rank", 16, min=1)
    if max_rank not in _LORA_RANKS:
        raise sec.error("max_lora_rank", f"must be one of {_LORA_RANKS}")
    sim = sec.raw("sim", {})
    if not isinstance(sim, dict):
        raise sec.error("sim", "expected a table of sim flags (e.g. weights_gib = 2)")
    sleep_level = sec.choice("sleep_level_on_idle", defaults["sleep_level_on_idle"], (0, 1, 2))
    spec = ModelSpec(
        name=name,
        model=sec.str("model", required=True) or "",
        served_model_names=served,
        devices=devices,
        tensor_parallel_size=tp or 1,
        gpu_memory_utilization=util,
        memory_gib=mem,
        max_model_len=max_len,
        max_num_seqs=sec.int("max_num_seqs", None, min=1),
        extra_args=sec.str_list("extra_args", []) or [],
        env=_str_table(sec, "env"),
        idle_timeout=_duration(sec, "idle_timeout", defaults["idle_timeout"]),
        sleep_level_on_idle=sleep_level,
        unload_timeout=_duration(sec, "unload_timeout", defaults["unload_timeout"]),
        sleep_on_unload=sec.bool("sleep_on_unload", defaults["sleep_on_unload"]),
        stop_idle_timeout=_duration(sec, "stop_idle_timeout", defaults["stop_idle_timeout"]),
        pinned=sec.bool("pinned", False),
        preload=sec.bool("preload", False),
        lora_adapters=loras,
        lora_dir=lora_dir,
        max_loras=sec.int("max_loras", 4 if lora_dir is not None else max(1, min(len(loras), 4)), min=1) or 1,
        max_lora_rank=max_rank or 16,
        sim=dict(sim),
        param_count=sec.float("param_count", None, min=0.001),
        dtype=_dtype(sec),
    )
    sec.check_unknown()
    return spec


def _lora_dir(sec: Section, base: Path) -> Path | None:
    raw = sec.str("lora_dir", None)
    if raw is None:
        return None
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise sec.error("lora_dir", f"{path} does not exist (a directory of LoRA adapters, one subdirectory each)")
    if not path.is_dir():
        raise sec.error("lora_dir", f"{path} is not a directory (a directory of LoRA adapters, one subdirectory each)")
    return path


def _dtype(sec: Section) -> str | None:
    raw = sec.raw("dtype", None)
    if raw is None:
        return None
    if not isinstance(raw, str) or raw.lower() not in VLLM_DTYPES:
        raise sec.error("dtype", f"expected one of {', '.join(sorted(VLLM_DTYPES))}, got {raw!r}")
    return VLLM_DTYPES[raw.lower()]


def read_shapes(cfg: AgentConfig, environ: Mapping[str, str], base: Path | None = None) -> None:
    """Read config.json of every catalog model without a budget (its memory estimate needs the
    shape). Blocking reads of small local files; never a download. The engine's own env (an
    entry's HF_HOME) decides which cache is looked in."""
    for spec in cfg.models.values():
        if spec.memory_gib is None and spec.gpu_memory_utilization is None and spec.shape is None:
            spec.shape, spec.shape_source = read_shape(spec.model, {**environ, **spec.env}, base)


def parse_config(data: dict[str, Any], path: str | Path | None = None) -> AgentConfig:
    root = Section(data, path, "")
    base = Path(path).resolve().parent if path else Path.cwd()
    d = AgentConfig()  # the defaults
    kw: dict[str, Any] = {"path": Path(path) if path else None}
    kw["host"] = root.str("host", d.host) or d.host
    kw["port"] = root.int("port", d.port, min=0, max=65535) or 0
    token = root.str("token")
    token_env = root.str("token_env")
    if token and token_env:
        raise root.error("token", "give either token or token_env, not both")
    if token_env:
        token = os.environ.get(token_env) or None
        if token is None:
            raise root.error("token_env", f"environment variable {token_env} is not set or empty")
        kw["token_env"] = token_env
    kw["token"] = token
    kw["engine"] = root.choice("engine", d.engine, ENGINES)
    kw["engine_binary"] = _command(root, "engine_binary", d.engine_binary)
    rng = root.raw("engine_port_range", list(d.engine_port_range))
    if (
        not isinstance(rng, list)
        or len(rng) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in rng)
        or not 1024 <= rng[0] <= rng[1] <= 65535
    ):
        raise root.error("engine_port_range", f"expected [first, last] ports within 1024..65535, got {rng!r}")
    kw["engine_port_range"] = (rng[0], rng[1])
    log_dir = Path(root.str("log_dir", "logs") or "logs").expanduser()
    kw["log_dir"] = log_dir if log_dir.is_absolute() else base / log_dir
    kw["gpu_memory_reserve_gib"] = root.float("gpu_memory_reserve_gib", d.gpu_memory_reserve_gib, min=0) or 0.0
    kw["load_timeout"] = root.float("load_timeout", d.load_timeout, min=0.1) or d.load_timeout
    kw["ready_timeout"] = root.float("ready_timeout", d.ready_timeout, min=1) or d.ready_timeout
    kw["stop_timeout"] = root.float("stop_timeout", d.stop_timeout, min=0.1) or d.stop_timeout
    kw["drain_timeout"] = root.float("drain_timeout", d.drain_timeout, min=0) or 0.0
    kw["max_switch_wait"] = root.float("max_switch_wait", d.max_switch_wait, min=0) or 0.0
    kw["max_queue"] = root.int("max_queue", d.max_queue, min=1) or d.max_queue
    kw["restart_max"] = root.int("restart_max", d.restart_max, min=0) or 0
    kw["restart_window"] = root.float("restart_window", d.restart_window, min=1) or d.restart_window
    kw["restart_backoff"] = root.float("restart_backoff", d.restart_backoff, min=0) or 0.0
    kw["restart_backoff_max"] = root.float("restart_backoff_max", d.restart_backoff_max, min=0) or 0.0
    kw["poll_interval"] = root.float("poll_interval", d.poll_interval, min=0.05) or d.poll_interval
    kw["reap_stale"] = root.bool("reap_stale", False)
    if root.raw("warm_launcher") is not None:
        kw["warm_launcher"] = root.bool("warm_launcher", True)
    cache_dir = root.str("engine_cache_dir")
    if cache_dir:
        cache_path = Path(cache_dir).expanduser()
        kw["engine_cache_dir"] = cache_path if cache_path.is_absolute() else base / cache_path
    elif os.environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory= (deploy/mvllm-agent.service)
        kw["engine_cache_dir"] = Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "engine-cache"
    state_dir = root.str("state_dir")
    if state_dir:
        state_path = Path(state_dir).expanduser()
        kw["state_dir"] = state_path if state_path.is_absolute() else base / state_path
    elif os.environ.get("STATE_DIRECTORY"):
        kw["state_dir"] = Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    kw["log"] = parse_log_keys(root, base)
    kw["engine_log_max_bytes"] = root.int("engine_log_max_bytes", d.engine_log_max_bytes, min=1024) or 1024
    kw["engine_log_backups"] = root.int("engine_log_backups", d.engine_log_backups, min=0, max=100) or 0
    kw["log_check_interval"] = root.float("log_check_interval", d.log_check_interval, min=0.05) or 5.0
    defaults = {
        "idle_timeout": root.float("idle_timeout", 600.0, min=0),
        "unload_timeout": root.float("unload_timeout", 3600.0, min=0),
        "sleep_level_on_idle": root.choice("sleep_level_on_idle", 1, (0, 1, 2)),
        "sleep_on_unload": root.bool("sleep_on_unload", True),
        "stop_idle_timeout": root.float("stop_idle_timeout", 86400.0, min=0),
    }
    sim_gpus: list[SimGpuSpec] = []
    sims = root.raw("sim_gpus", [])
    if not isinstance(sims, list):
        raise root.error("sim_gpus", "expected an array of tables ([[sim_gpus]])")
    for i, raw in enumerate(sims):
        s = Section(raw, path, f"sim_gpus[{i}]")
        sim_gpus.append(
            SimGpuSpec(
                memory_gib=s.float("memory_gib", 80.0, min=0.1) or 80.0,
                name=s.str("name", "mvllm simulated GPU") or "",
            )
        )
        s.check_unknown()
    if kw["engine"] == "sim" and not sim_gpus:
        sim_gpus.append(SimGpuSpec())
    models = root.section("models")
    kw["models"] = {name: _model(models.section(name), name, defaults, base) for name in models.data}
    kw["adhoc"] = parse_adhoc(root.section("adhoc"))
    root.check_unknown()
    cfg = AgentConfig(**kw, sim_gpus=sim_gpus)
    _check_catalog(cfg, path)
    read_shapes(cfg, os.environ, base)
    return cfg


def _check_catalog(cfg: AgentConfig, path: str | Path | None) -> None:
    seen: dict[str, str] = {}
    for spec in cfg.models.values():
        for alias in spec.routable_names:
            if alias in seen:
                raise ConfigError(
                    path, f"models.{spec.name}", f"model name {alias!r} is also served by models.{seen[alias]}"
                )
            seen[alias] = spec.name
        if cfg.engine == "sim":
            for d in spec.devices:
                if d >= len(cfg.sim_gpus):
                    raise ConfigError(
                        path, f"models.{spec.name}.devices", f"GPU {d} is not one of the {len(cfg.sim_gpus)} sim_gpus"
                    )
    first, last = cfg.engine_port_range
    if last - first + 1 < len(cfg.models):
        raise ConfigError(path, "engine_port_range", f"{last - first + 1} ports for {len(cfg.models)} models")
    for spec in cfg.models.values():
        if spec.sleep_level_on_idle == 2 and spec.lora_enabled:
            cfg.warnings.append(
                f"{path or 'config'}: models.{spec.name}.sleep_level_on_idle = 2 with LoRA enabled: the agent "
                "sleeps it at level 1 instead (vLLM cannot reload LoRA-enabled weights after level 2)"
            )


def model_from_table(
    cfg: AgentConfig, name: str, table: dict[str, Any], models: Mapping[str, ModelSpec] | None = None
) -> ModelSpec:
    """One `[models.NAME]` table read as the loader reads it (ConfigError names the key), then the
    catalog checks run with it in place of the entry of that name among `models` (the catalog at
    run time; default: the file's) (for changes at run time)."""
    base = Path(cfg.path).resolve().parent if cfg.path else Path.cwd()
    defaults = {
        "idle_timeout": 600.0, "unload_timeout": 3600.0, "sleep_level_on_idle": 1,
        "sleep_on_unload": True, "stop_idle_timeout": 86400.0,
    }  # fmt: skip
    spec = _model(Section(table, cfg.path, f"models.{name}"), name, defaults, base)
    others = cfg.models if models is None else models
    trial = AgentConfig(
        path=cfg.path, engine=cfg.engine, engine_port_range=(1024, 65535), sim_gpus=cfg.sim_gpus,
        models={**others, name: spec},
    )  # fmt: skip
    _check_catalog(trial, cfg.path)
    return spec


def load_config(path: str | Path) -> AgentConfig:
    return parse_config(load_toml(path), path)


TOKEN_ENV = "MVLLM_AGENT_TOKEN"


def apply_env(cfg: AgentConfig, environ: Mapping[str, str]) -> AgentConfig:
    """Let the MVLLM_AGENT_* (and MVLLM_LOG_LEVEL) variables override the file's keys
    (mvllm.common.envvars.AGENT_ENV); ConfigError names a variable with an invalid value.

    The last step of loading, so it still writes `cfg` in place (and returns it); nothing after it can."""
    env = read_env(AGENT_ENV, environ)
    changes: dict[str, Any] = {
        "host": env.get("host", cfg.host),
        "port": env.get("port", cfg.port),
        "engine_log_max_bytes": max(1024, env.get("engine_log_max_bytes", cfg.engine_log_max_bytes)),
    }
    if "token" in env:
        changes["token"] = env["token"]
        changes["token_env"] = TOKEN_ENV  # so it is kept out of the engines' environment too
    if "log_dir" in env:
        changes["log_dir"] = env["log_dir"]
    log = cfg.log
    changes["log"] = LogConfig(
        level=env.get("log_level", log.level),
        file=env.get("log_file", log.file),
        max_bytes=max(4096, env.get("log_max_bytes", log.max_bytes)),
        backups=env.get("log_backups", log.backups),
        retention_days=env.get("log_retention_days", log.retention_days),
    )
    _overwrite(cfg, replace(cfg, **changes))
    return cfg


def _overwrite(cfg: AgentConfig, new: AgentConfig) -> None:
    """Copy `new` into `cfg`: the loader's own write to a frozen config (callers hold `cfg` already)."""
    for f in fields(AgentConfig):
        object.__setattr__(cfg, f.name, getattr(new, f.name))


def check_listen(cfg: AgentConfig) -> None:
    """The agent relays to engines whose admin endpoints have no auth: never open without a token."""
    if not cfg.token and not is_loopback(cfg.host):
        raise ConfigError(
            cfg.path, "token", f"listening on {cfg.host} needs a token (token or token_env); only loopback may go without"
        )
