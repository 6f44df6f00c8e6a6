"""The simulator's settings: `vllm serve` flags it models plus `--sim-*` flags, parsed into a typed SimConfig."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mvllm.common.tomlconf import range_problem

GIB = 1 << 30
# What the simulated engine reports as its vLLM version (/version, system_fingerprint).
VLLM_VERSION = "0.25.0"
# Memory a sleeping engine keeps on its GPU (CUDA context, buffers), as measured on vLLM 0.25.
SLEEP_RESIDUAL_BYTES = GIB // 2
DEFAULT_MAX_N = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default
DEFAULT_KEEPALIVE_S = 5.0  # vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE default


def human_readable_int(value: str) -> int:
    """vLLM's integer syntax: `8g` = 8e9 (lowercase = decimal), `8G` = 8 GiB (uppercase = binary)."""
    value = value.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if m:
        number, suffix = m.groups()
        if suffix.islower():
            return int(float(number) * 10 ** {"k": 3, "m": 6, "g": 9, "t": 12}[suffix])
        if "." in number:
            raise argparse.ArgumentTypeError(
                f"Decimals are not allowed with binary suffixes like {suffix}. "
                f"Did you mean to use {number}{suffix.lower()} instead?"
            )
        return int(number) * 2 ** {"K": 10, "M": 20, "G": 30, "T": 40}[suffix]
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid integer: {value!r}") from exc


def human_readable_int_or_auto(value: str) -> int:
    """As human_readable_int, plus `-1` / `auto` (= -1: pick the default)."""
    if value.strip() in ("-1", "auto", "AUTO", "Auto"):
        return -1
    return human_readable_int(value)


def _checked(value: str, parse: Callable[[str], Any], **bounds: Any) -> Any:
    parsed = parse(value)
    problem = range_problem(parsed, shown=value, **bounds)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return parsed


def _fraction(value: str) -> float:
    return _checked(value, float, min=0, max=1, within=True)


def _non_negative(value: str) -> float:
    return _checked(value, float, min=0)


def _positive_float(value: str) -> float:
    return _checked(value, float, above=0)


def _positive_int(value: str) -> int:
    return _checked(value, int, min=1)


FAIL_KINDS = ("500", "503", "hang", "reset", "midstream", "crash")


@dataclass
class SimConfig:
    """Everything one simulated engine needs. Defaults mirror `vllm serve` where vLLM has the flag."""

    model: str
    served_model_names: list[str] = field(default_factory=list)  # empty: [model]
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int | None = None  # None: vLLM's default for the simulated card (256 or 1024)
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.92
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    api_keys: list[str] = field(default_factory=list)
    shutdown_timeout: float = 0.0
    enable_server_load_tracking: bool = False
    disable_log_stats: bool = False
    # Environment switches of vLLM, read once at start (see from_env_and_args).
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: /sleep, /wake_up, /collective_rpc, ...
    runtime_lora_updating: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING=1: /v1/load_lora_adapter
    max_n_sequences: int = DEFAULT_MAX_N  # VLLM_MAX_N_SEQUENCES: the largest `n` a request may ask for
    # Seconds an idle keep-alive connection stays open: uvicorn's --timeout-keep-alive, which vLLM
    # sets from VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5). A client that reuses a connection the server has
    # just closed sees the error a proxy must survive.
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    # Simulation knobs.
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    prefill_ms_per_token: float = 0.04
    batch_slowdown: float = 1.0
    startup_s: float = 0.0
    wake_ms: float = 20.0
    fail_rate: float = 0.0
    fail_kind: str = "500"
    seed: int = 0
    weights_gib: float = 16.0
    gpu_memory_gib: float = 80.0
    kv_bytes_per_token: int = 131072
    max_tokens_default: int = 32
    embedding_dim: int = 256

    def __post_init__(self) -> None:
        if not self.served_model_names:
            self.served_model_names = [self.model]
        if self.max_num_seqs is None:
            # vLLM 0.25 `get_batch_defaults`: 1024 on cards of >= 70 GiB (A100 aside), else 256.
            self.max_num_seqs = 1024 if self.gpu_memory_gib >= 70 else 256
        if self.fail_kind not in FAIL_KINDS:
            raise ValueError(f"--sim-fail-kind must be one of {', '.join(FAIL_KINDS)}, got {self.fail_kind!r}")

    @property
    def model_name(self) -> str:
        """The name in metrics labels and in responses: the first served name."""
        return self.served_model_names[0]

    @property
    def weights_bytes_per_gpu(self) -> int:
        return int(self.weights_gib * GIB / self.tensor_parallel_size)

    @property
    def kv_bytes_per_gpu(self) -> int:
        """KV cache memory on each GPU: `--kv-cache-memory-bytes` when given, else what
        `--gpu-memory-utilization` of the card leaves after the weights (never negative)."""
        if self.kv_cache_memory_bytes is not None:
            return self.kv_cache_memory_bytes
        budget = self.gpu_memory_utilization * self.gpu_memory_gib * GIB
        return max(0, int(budget - self.weights_bytes_per_gpu))

    @property
    def num_gpu_blocks(self) -> int:
        # With tensor parallelism each GPU holds 1/tp of every token's KV, so the pool grows with tp.
        per_block = self.kv_bytes_per_token * self.block_size / self.tensor_parallel_size
        return int(self.kv_bytes_per_gpu // per_block)

    @property
    def kv_cache_size_tokens(self) -> int:
        return self.num_gpu_blocks * self.block_size


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `mvllm sim serve MODEL`; anything else is a vLLM flag the simulator ignores."""
    p.add_argument("model", nargs="?", help="model name or path (as `vllm serve MODEL`)")
    v = p.add_argument_group("vLLM flags the simulator models")
    v.add_argument("--model", dest="model_flag", help="same as the positional MODEL")
    v.add_argument("--host", default="127.0.0.1", help="listen address (vLLM's default is all interfaces)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="names clients use; the first one labels metrics and responses")
    v.add_argument("--max-num-seqs", type=_positive_int, default=None,
                   help="most requests running at once (default: 1024 on a card >= 70 GiB, else 256)")
    v.add_argument("--max-model-len", type=human_readable_int_or_auto, default=-1,
                   help="context length in tokens, e.g. 32k (default/auto: 8192)")
    v.add_argument("--gpu-memory-utilization", type=_fraction, default=0.92)
    v.add_argument("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    v.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1)
    v.add_argument("--block-size", type=_positive_int, default=16)
    v.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    v.add_argument("--enable-sleep-mode", action="store_true")
    v.add_argument("--enable-lora", action="store_true")
    v.add_argument("--max-loras", type=_positive_int, default=1)
    v.add_argument("--max-lora-rank", type=_positive_int, default=16)
    v.add_argument("--api-key", nargs="+", default=None, help="bearer keys accepted on /v1 (also VLLM_API_KEY)")
    v.add_argument("--shutdown-timeout", type=_non_negative, default=0.0,
                   help="seconds to drain in-flight requests on SIGTERM (0: abort at once)")
    v.add_argument("--enable-server-load-tracking", action="store_true")
    v.add_argument("--disable-log-stats", action="store_true", help="no vllm:* metrics, as in vLLM")
    s = p.add_argument_group("simulation (not vLLM flags)")
    s.add_argument("--sim-ttft-ms", type=_non_negative, default=50.0, help="base time to first token")
    s.add_argument("--sim-itl-ms", type=_non_negative, default=10.0, help="time per output token, batch of one")
    s.add_argument("--sim-prefill-ms-per-token", type=_non_negative, default=0.04,
                   help="extra time to first token per prompt token not found in the prefix cache")
    s.add_argument("--sim-batch-slowdown", type=_non_negative, default=1.0,
                   help="per-token time is itl * (1 + this * (running - 1) / max_num_seqs)")
    s.add_argument("--sim-startup-s", type=_non_negative, default=0.0, help="delay before the port listens")
    s.add_argument("--sim-wake-ms", type=_non_negative, default=20.0, help="time each /wake_up takes")
    s.add_argument("--sim-fail-rate", type=_fraction, default=0.0, help="share of inference requests that fail")
    s.add_argument("--sim-fail-kind", choices=FAIL_KINDS, default="500")
    s.add_argument("--sim-seed", type=int, default=0, help="seed of the generated text and of fault draws")
    s.add_argument("--sim-weights-gib", type=_non_negative, default=16.0, help="model weights, all GPUs together")
    s.add_argument("--sim-gpu-memory-gib", type=_non_negative, default=80.0, help="memory of one simulated card")
    s.add_argument("--sim-kv-bytes-per-token", type=human_readable_int, default=131072,
                   help="KV cache bytes per token, all GPUs together (default: an 8B Llama in fp16)")
    s.add_argument("--sim-max-tokens-default", type=_positive_int, default=32,
                   help="answers without max_tokens end (finish_reason stop) after N/2..N tokens")
    s.add_argument("--sim-embedding-dim", type=_positive_int, default=256)
    s.add_argument("--sim-keepalive-s", type=_positive_float, default=None,
                   help="close a connection idle this long (default: VLLM_HTTP_TIMEOUT_KEEP_ALIVE, else 5, as vLLM)")


def config_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> SimConfig:
    """Build the config from parsed flags and vLLM's environment switches."""
    env = os.environ if env is None else env
    model = ns.model_flag or ns.model
    if not model:
        raise ValueError("a MODEL is required: mvllm sim serve MODEL [flags]")
    api_keys = list(ns.api_key or [])
    if not api_keys and env.get("VLLM_API_KEY"):
        api_keys = [env["VLLM_API_KEY"]]
    return SimConfig(
        model=model,
        served_model_names=list(ns.served_model_name or []),
        host=ns.host,
        port=ns.port,
        max_num_seqs=ns.max_num_seqs,
        max_model_len=8192 if ns.max_model_len == -1 else ns.max_model_len,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        tensor_parallel_size=ns.tensor_parallel_size,
        block_size=ns.block_size,
        enable_prefix_caching=ns.enable_prefix_caching,
        enable_sleep_mode=ns.enable_sleep_mode,
        enable_lora=ns.enable_lora,
        max_loras=ns.max_loras,
        max_lora_rank=ns.max_lora_rank,
        api_keys=api_keys,
        shutdown_timeout=ns.shutdown_timeout,
        enable_server_load_tracking=ns.enable_server_load_tracking,
        disable_log_stats=ns.disable_log_stats,
        dev_mode=_env_flag(env, "VLLM_SERVER_DEV_MODE"),
        runtime_lora_updating=_env_flag(env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
        ttft_ms=ns.sim_ttft_ms,
        itl_ms=ns.sim_itl_ms,
        prefill_ms_per_token=ns.sim_prefill_ms_per_token,
        batch_slowdown=ns.sim_batch_slowdown,
        startup_s=ns.sim_startup_s,
        wake_ms=ns.sim_wake_ms,
        fail_rate=ns.sim_fail_rate,
        fail_kind=ns.sim_fail_kind,
        seed=ns.sim_seed,
        weights_gib=ns.sim_weights_gib,
        gpu_memory_gib=ns.sim_gpu_memory_gib,
        kv_bytes_per_token=ns.sim_kv_bytes_per_token,
        max_tokens_default=ns.sim_max_tokens_default,
        embedding_dim=ns.sim_embedding_dim,
        max_n_sequences=_env_number(env, "VLLM_MAX_N_SEQUENCES", DEFAULT_MAX_N, int),
        keepalive_s=(ns.sim_keepalive_s if ns.sim_keepalive_s is not None
                     else _env_number(env, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", DEFAULT_KEEPALIVE_S, float)),
    )


def _env_number(env: Mapping[str, str], name: str, default: float, kind: type) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    problem = range_problem(value, above=0, shown=repr(raw))
    if problem is not None:
        raise ValueError(f"{name} {problem}")
    return value


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    # vLLM reads these as `bool(int(...))` or "true"; accept both spellings.
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


def ignored_flags(unknown: Sequence[str]) -> list[str]:
    """Group unknown command-line words into the flags they belong to: `--dtype half` and
    `--trust-remote-code` give ["--dtype half", "--trust-remote-code"]. Words before any flag
    (a stray positional) are reported on their own."""
    groups: list[str] = []
    for word in unknown:
        if word.startswith("-") and not _is_number(word):
            groups.append(word)
        elif groups and groups[-1].startswith("-"):
            groups[-1] += " " + word
        else:
            groups.append(word)
    return groups


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
