"""Pure: the vLLM flags an ad-hoc instance may be given (the allow-list), their checks, their argv form,
and the `[adhoc]` section of agent.toml.

A flag is named in snake case (`max_model_len`; `max-model-len` and `--max-model-len` are read as
the same). Each known flag has a kind that checks its value; a flag the operator adds to
`allowed_params` that this table does not know takes a plain scalar. The flags the agent sets
itself (host, port, served names, sleep mode ...) are never accepted, not even from the config.
Values go on the command line as `--flag=value` (so a value can never be read as another flag),
`true` as `--flag` and `false` as `--no-flag` (vLLM's boolean flags are BooleanOptionalAction).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mvllm.agent.estimate import VLLM_DTYPES
from mvllm.common.tomlconf import Section

# Kinds of values.
INT = "int"  # integer >= 1
INT0 = "int0"  # integer >= 0
SIZE = "size"  # integer >= 1, or "32k" / "8G" / "auto" (vLLM's human-readable ints)
FRACTION = "fraction"  # 0 < x <= 1
NUMBER = "number"  # float >= 0
BOOL = "bool"
TOKEN = "token"  # a word: letters, digits, ._-/:+
SCALAR = "scalar"  # an operator-added flag this table does not know: bool, number or token

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# name -> (kind, choices or None)
KNOWN_PARAMS: dict[str, tuple[str, tuple[Any, ...] | None]] = {
    "max_model_len": (SIZE, None),
    "max_num_seqs": (INT, None),
    "max_num_batched_tokens": (INT, None),
    "gpu_memory_utilization": (FRACTION, None),
    "kv_cache_memory_bytes": (SIZE, None),
    "tensor_parallel_size": (INT, None),
    "dtype": (TOKEN, tuple(VLLM_DTYPES)),
    "kv_cache_dtype": (TOKEN, ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")),
    "quantization": (TOKEN, None),
    "enforce_eager": (BOOL, None),
    "enable_prefix_caching": (BOOL, None),
    "enable_chunked_prefill": (BOOL, None),
    "enable_lora": (BOOL, None),
    "max_loras": (INT, None),
    "max_lora_rank": (INT, _LORA_RANKS),
    "seed": (INT0, None),
    "block_size": (INT, (8, 16, 32, 64, 128)),
    "swap_space": (NUMBER, None),
    "cpu_offload_gb": (NUMBER, None),
    "revision": (TOKEN, None),
    "tokenizer_mode": (TOKEN, ("auto", "slow", "mistral", "custom")),
    "trust_remote_code": (BOOL, None),  # runs the model repository's Python: off unless the config allows it
}

# What a request may set when the config says nothing (`[adhoc] allowed_params` replaces it).
DEFAULT_ALLOWED: tuple[str, ...] = tuple(n for n in KNOWN_PARAMS if n != "trust_remote_code")

# Set by the agent itself: never from a request or from base_params.
MANAGED_PARAMS = frozenset(
    {
        "model",
        "host",
        "port",
        "uds",
        "served_model_name",
        "enable_sleep_mode",
        "api_key",
        "disable_log_stats",  # the router scores on the engine's metrics
        "ssl_keyfile",
        "ssl_certfile",
        "root_path",
    }
)

# Flags the agent reads into the instance's own fields (placement and /state use them) rather
# than passing them on as they are.
STRUCTURED = frozenset({"gpu_memory_utilization", "max_model_len", "max_num_seqs", "tensor_parallel_size", "dtype"})

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:+-]*$")
_SIZE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?[kKmMgGtT]?$")


class ParamError(ValueError):
    """A flag that is not allowed or has a wrong value; `flag` names it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag
        self.message = message


def normalize_name(name: str) -> str:
    """`--max-model-len`, `max-model-len` and `max_model_len` are one flag."""
    return name.strip().lstrip("-").replace("-", "_").lower()


def check_value(name: str, value: Any) -> Any:
    """The value of flag `name`, checked against its kind (ParamError when it does not fit)."""
    kind, choices = KNOWN_PARAMS.get(name, (SCALAR, None))
    bad = ParamError(name, f"{name}: {_expected(kind, choices)}, got {value!r}")
    if kind == BOOL:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        if kind == SCALAR:
            return value
        raise bad
    if kind in (INT, INT0):
        if not isinstance(value, int) or value < (1 if kind == INT else 0):
            raise bad
    elif kind == SIZE:
        if isinstance(value, int):
            if value < 1:
                raise bad
        elif not (isinstance(value, str) and (value == "auto" or _SIZE_RE.match(value))):
            raise bad
    elif kind == FRACTION:
        if not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad
        value = float(value)
    elif kind == NUMBER:
        if not isinstance(value, (int, float)) or value < 0:
            raise bad
    elif kind == TOKEN:
        if not isinstance(value, str) or not _TOKEN_RE.match(value):
            raise bad
    else:  # SCALAR
        if isinstance(value, str):
            if not _TOKEN_RE.match(value):
                raise bad
        elif not isinstance(value, (int, float)):
            raise bad
    if choices is not None and value not in choices:
        raise ParamError(name, f"{name}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _expected(kind: str, choices: tuple[Any, ...] | None) -> str:
    if choices is not None:
        return f"expected one of {', '.join(map(str, choices))}"
    return {
        INT: "expected an integer >= 1",
        INT0: "expected an integer >= 0",
        SIZE: "expected an integer >= 1 or a size like '32k', '8G' or 'auto'",
        FRACTION: "expected a number in (0, 1]",
        NUMBER: "expected a number >= 0",
        BOOL: "expected true or false",
        TOKEN: "expected a word (letters, digits, . _ - / : +)",
    }.get(kind, "expected true/false, a number or a word (letters, digits, . _ - / : +)")


def validate_params(params: Any, allowed: Iterable[str], *, trust_remote_code: bool = False) -> dict[str, Any]:
    """The flags of a request, checked: each must be allowed and well typed (ParamError names the first that is not)."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ParamError("params", "params must be a JSON object of flag: value")
    allowed_set = set(allowed)
    if trust_remote_code:
        allowed_set.add("trust_remote_code")
    listed = ", ".join(sorted(allowed_set))
    out: dict[str, Any] = {}
    for raw_name, value in params.items():
        name = normalize_name(str(raw_name))
        if name in MANAGED_PARAMS:
            raise ParamError(name, f"flag {name!r} is set by the agent itself and cannot be given; allowed: {listed}")
        if name == "trust_remote_code" and name not in allowed_set:
            raise ParamError(
                name,
                "flag 'trust_remote_code' is off on this agent ([adhoc] allow_trust_remote_code = false); "
                f"allowed: {listed}",
            )
        if name not in allowed_set:
            raise ParamError(name, f"flag {raw_name!r} is not allowed for ad-hoc instances; allowed: {listed}")
        if name in out:
            raise ParamError(name, f"flag {name!r} is given twice")
        out[name] = check_value(name, value)
    return out


def param_args(params: Mapping[str, Any]) -> list[str]:
    """The command-line form of the flags that are passed on as they are (not STRUCTURED)."""
    args: list[str] = []
    for name, value in params.items():
        if name in STRUCTURED:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            args.append(f"{flag}={value}")
    return args


# ------------------------------------------------------------------ [adhoc] of agent.toml


@dataclass
class AdhocConfig:
    """`[adhoc]`: what `POST /instances` may start."""

    max_instances: int = 4  # live ad-hoc instances at once; 0 turns the API off
    default_ttl: float | None = 600.0  # seconds; None = no expiry
    max_ttl: float | None = None  # a request may not ask for more; None = no limit
    allowed_params: tuple[str, ...] = DEFAULT_ALLOWED
    allow_trust_remote_code: bool = False
    allowed_models: tuple[str, ...] = ()  # glob patterns of `model`; empty = any
    base_params: dict[str, Any] = field(default_factory=dict)  # under every request's params
    memory_gib: float | None = None  # budget per GPU when a request gives neither this nor a fraction
    sim: dict[str, Any] = field(default_factory=dict)  # `--sim-*` flags, engine = "sim" only

    def model_allowed(self, model: str) -> bool:
        return not self.allowed_models or any(fnmatch.fnmatchcase(model, p) for p in self.allowed_models)


def parse_adhoc(sec: Section) -> AdhocConfig:
    cfg = AdhocConfig()
    cfg.max_instances = sec.int("max_instances", cfg.max_instances, min=0) or 0
    ttl = sec.float("default_ttl", 600.0, min=0)
    cfg.default_ttl = ttl or None
    max_ttl = sec.float("max_ttl", 0.0, min=0)
    cfg.max_ttl = max_ttl or None
    if cfg.max_ttl is not None and (cfg.default_ttl is None or cfg.default_ttl > cfg.max_ttl):
        raise sec.error("default_ttl", f"must be set and at most max_ttl ({cfg.max_ttl:g})")
    cfg.allow_trust_remote_code = sec.bool("allow_trust_remote_code", False)
    if sec.has("allowed_params"):
        names = sec.str_list("allowed_params", []) or []
        norm = []
        for n in names:
            name = normalize_name(n)
            if not _NAME_RE.match(name):
                raise sec.error("allowed_params", f"{n!r} is not a flag name")
            if name in MANAGED_PARAMS:
                raise sec.error("allowed_params", f"{name!r} is set by the agent itself")
            if name == "trust_remote_code":
                raise sec.error("allowed_params", "use allow_trust_remote_code = true for trust_remote_code")
            norm.append(name)
        cfg.allowed_params = tuple(dict.fromkeys(norm))
    cfg.allowed_models = tuple(sec.str_list("allowed_models", []) or [])
    base = sec.raw("base_params", {})
    if not isinstance(base, dict):
        raise sec.error("base_params", "expected a table of flag = value")
    for raw_name, value in base.items():
        name = normalize_name(str(raw_name))
        if name in MANAGED_PARAMS:
            raise sec.error(f"base_params.{raw_name}", "is set by the agent itself")
        if not _NAME_RE.match(name):
            raise sec.error(f"base_params.{raw_name}", "is not a flag name")
        try:
            cfg.base_params[name] = check_value(name, value)
        except ParamError as exc:
            raise sec.error(f"base_params.{raw_name}", exc.message) from None
    cfg.memory_gib = sec.float("memory_gib", None, min=0.01)
    sim = sec.raw("sim", {})
    if not isinstance(sim, dict):
        raise sec.error("sim", "expected a table of sim flags (e.g. weights_gib = 2)")
    cfg.sim = dict(sim)
    sec.check_unknown()
    return cfg


def merged_params(cfg: AdhocConfig, requested: Mapping[str, Any]) -> dict[str, Any]:
    """base_params, then the request's flags over them."""
    return {**cfg.base_params, **requested}



@dataclass
class AdhocInfo:
    """What makes a catalog entry ad hoc: the flags it was started with and its lease."""

    model: str
    params: dict[str, Any]  # effective flags: base_params with the request's over them
    requested: dict[str, Any]  # the request's own flags
    ttl: float | None  # seconds from creation; None = no expiry
    created_at: float  # unix time
    created_mono: float  # monotonic time, for the expiry itself

    def deadline(self) -> float | None:
        """Monotonic time at which it expires (stopped once no request is in flight or waiting)."""
        return None if self.ttl is None else self.created_mono + self.ttl

    def expires_at(self) -> float | None:
        return None if self.ttl is None else self.created_at + self.ttl
