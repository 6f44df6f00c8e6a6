"""Pure: the command line and environment of one engine (`vllm serve`, or `mvllm sim serve` in its place)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

from mvllm.agent.config import GIB, TOKEN_ENV, AgentConfig, ModelSpec

# Every engine carries these in its environment (inherited by vLLM's EngineCore and workers), so an
# agent that starts later can tell its own stale engines from anyone else's processes.
MARKER_ENGINE = "MVLLM_AGENT_ENGINE"  # catalog name
MARKER_AGENT = "MVLLM_AGENT_ID"  # "<agent pid>:<agent process start time>"


# Variables engines need from the agent's environment, documented in docs/agent.md. Every variable
# of the agent passes through (engine_env); this list is what the docs and tests promise.
PASS_THROUGH = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)  # fmt: skip


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def engine_argv(
    cfg: AgentConfig, spec: ModelSpec, port: int, utilization: float | None, gpu_total_bytes: int | None
) -> list[str]:
    if cfg.engine == "sim":
        head = [sys.executable, "-m", "mvllm", "sim", "serve", spec.model]
    else:
        head = [*cfg.engine_binary, "serve", spec.model]
    argv = [*head, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", *spec.served_model_names]
    argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size), "--enable-sleep-mode"]
    if utilization is not None:
        argv += ["--gpu-memory-utilization", f"{utilization:.3f}"]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    if spec.dtype is not None:
        argv += ["--dtype", spec.dtype]
    if spec.runtime_lora:
        argv += ["--enable-lora", "--max-loras", str(spec.max_loras), "--max-lora-rank", str(spec.max_lora_rank)]
    if cfg.engine == "sim":
        if gpu_total_bytes:
            argv += ["--sim-gpu-memory-gib", f"{gpu_total_bytes / GIB:g}"]
        for key, value in spec.sim.items():
            argv += [f"--sim-{key.replace('_', '-')}", _fmt(value)]
    argv += spec.extra_args
    return argv


def engine_env(
    cfg: AgentConfig, spec: ModelSpec, agent_id: str, base: Mapping[str, str]
) -> dict[str, str]:
    # The agent's environment passes through as it is (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, HF_HOME,
    # HF_ENDPOINT, HF_HUB_OFFLINE, HTTP(S)_PROXY/NO_PROXY in both cases ...: see PASS_THROUGH), the
    # entry's env over it; only the agent's token is taken out: it has no business in an engine.
    env = dict(base)
    for name in {cfg.token_env, TOKEN_ENV} - {None}:
        env.pop(name, None)
    env.update(spec.env)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in spec.devices),
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "VLLM_SERVER_DEV_MODE": "1",  # mounts /sleep, /wake_up, /is_sleeping, /collective_rpc
            MARKER_ENGINE: spec.name,
            MARKER_AGENT: agent_id,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if spec.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
    if cfg.engine_cache_dir is not None and "VLLM_CACHE_ROOT" not in spec.env:
        # One cache root per model: its torch.compile and CUDA-graph artefacts survive the engine, so
        # the next cold start of the same model reuses them (and `du` tells each model's share).
        env["VLLM_CACHE_ROOT"] = str(cfg.engine_cache_dir / spec.name)
    return env


def launch_plan(
    cfg: AgentConfig,
    spec: ModelSpec,
    port: int,
    utilization: float | None,
    gpu_total_bytes: int | None,
    agent_id: str,
    base_env: Mapping[str, str] | None = None,
) -> LaunchPlan:
    return LaunchPlan(
        engine_argv(cfg, spec, port, utilization, gpu_total_bytes),
        engine_env(cfg, spec, agent_id, base_env if base_env is not None else {}),
    )
