import argparse

import pytest

from mvllm.cli import build_parser
from mvllm.sim.config import (
    GIB,
    SLEEP_RESIDUAL_BYTES,
    SimConfig,
    config_from_args,
    human_readable_int,
    human_readable_int_or_auto,
    ignored_flags,
)
from mvllm.sim.engine import Engine, prefill_seconds, step_seconds


def parse(argv, env=None):
    args, unknown = build_parser().parse_known_args(["sim", "serve", *argv])
    return config_from_args(args, env or {}), unknown


def test_human_readable_ints_follow_vllm():
    assert human_readable_int("8g") == 8 * 10**9
    assert human_readable_int("8G") == 8 * 2**30
    assert human_readable_int("25.6k") == 25600
    assert human_readable_int("4096") == 4096
    assert human_readable_int_or_auto("auto") == -1
    with pytest.raises(argparse.ArgumentTypeError):
        human_readable_int("1.5G")


def test_flags_the_agent_passes_and_unknown_vllm_flags():
    cfg, unknown = parse(
        ["Qwen/Qwen3-8B", "--host", "127.0.0.1", "--port", "9001", "--served-model-name", "qwen", "q8",
         "-tp", "2", "--max-model-len", "32k", "--gpu-memory-utilization", "0.5", "--enable-sleep-mode",
         "--enable-lora", "--max-loras", "2", "--dtype", "bfloat16", "--trust-remote-code",
         "--kv-cache-memory-bytes", "8G", "--shutdown-timeout", "5"],
        env={"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
    )
    assert cfg.model == "Qwen/Qwen3-8B" and cfg.served_model_names == ["qwen", "q8"] and cfg.model_name == "qwen"
    assert cfg.tensor_parallel_size == 2 and cfg.max_model_len == 32000 and cfg.port == 9001
    assert cfg.enable_sleep_mode and cfg.enable_lora and cfg.max_loras == 2
    assert cfg.dev_mode and cfg.runtime_lora_updating
    assert cfg.kv_cache_memory_bytes == 8 * GIB and cfg.shutdown_timeout == 5.0
    assert ignored_flags(unknown) == ["--dtype bfloat16", "--trust-remote-code"]


def test_unknown_flags_are_not_taken_as_prefixes_of_ours():
    _, unknown = parse(["m", "--max-num", "3"])
    assert unknown == ["--max-num", "3"]


def test_api_key_from_environment_and_defaults():
    cfg, _ = parse(["m"], env={"VLLM_API_KEY": "k1"})
    assert cfg.api_keys == ["k1"] and cfg.served_model_names == ["m"]
    assert cfg.max_num_seqs == 1024  # vLLM's default on a card of >= 70 GiB
    assert SimConfig(model="m", gpu_memory_gib=40).max_num_seqs == 256
    assert not cfg.dev_mode and not cfg.runtime_lora_updating


def test_ignored_flags_grouping():
    assert ignored_flags(["--seed", "-1", "--x=1", "--flag", "stray"]) == ["--seed -1", "--x=1", "--flag stray"]
    assert ignored_flags(["stray"]) == ["stray"]


def test_memory_model():
    cfg = SimConfig(model="m", weights_gib=16, gpu_memory_gib=80, gpu_memory_utilization=0.5)
    assert cfg.weights_bytes_per_gpu == 16 * GIB
    assert cfg.kv_bytes_per_gpu == 24 * GIB  # 0.5 * 80 - 16
    assert cfg.num_gpu_blocks == 24 * GIB // (131072 * 16)
    tp = SimConfig(model="m", weights_gib=16, gpu_memory_gib=80, gpu_memory_utilization=0.5, tensor_parallel_size=2)
    assert tp.weights_bytes_per_gpu == 8 * GIB and tp.kv_bytes_per_gpu == 32 * GIB
    assert SimConfig(model="m", weights_gib=100, gpu_memory_utilization=0.5).kv_bytes_per_gpu == 0
    assert SimConfig(model="m", kv_cache_memory_bytes=GIB).kv_bytes_per_gpu == GIB


async def test_memory_follows_sleep_state():
    cfg = SimConfig(model="m", weights_gib=10, gpu_memory_gib=80, gpu_memory_utilization=0.5, wake_ms=0,
                    enable_sleep_mode=True)
    engine = Engine(cfg)
    awake = engine.memory_bytes()
    assert awake == 40 * GIB
    await engine.sleep(1)
    assert engine.is_sleeping and engine.memory_bytes() == SLEEP_RESIDUAL_BYTES
    await engine.wake_up(["weights"])
    assert engine.is_sleeping and engine.memory_bytes() == 10 * GIB
    assert engine.sleep_level == 0  # vLLM's gauge says "awake" after any wake_up
    await engine.wake_up(["kv_cache"])
    assert not engine.is_sleeping and engine.memory_bytes() == awake
    await engine.sleep(0)
    assert engine.is_sleeping and engine.memory_bytes() == awake and engine.sleep_level == 0
    await engine.wake_up()
    await engine.sleep(2)
    assert not engine.weights_valid and engine.sleep_level == 2
    await engine.wake_up()
    assert not engine.weights_valid  # level 2 needs reload_weights
    engine.reload_weights()
    assert engine.weights_valid


def test_timing_formulas():
    cfg = SimConfig(model="m", ttft_ms=50, itl_ms=10, prefill_ms_per_token=0.5, batch_slowdown=1.0, max_num_seqs=4)
    assert prefill_seconds(cfg, 100) == pytest.approx(0.1)
    assert step_seconds(cfg, 1) == pytest.approx(0.010)
    assert step_seconds(cfg, 4) == pytest.approx(0.0175)  # 10 * (1 + 3/4)


async def test_without_sleep_mode_sleep_only_pauses():
    # Observed on vLLM 0.25: /sleep answers 200 and /is_sleeping true, but nothing is freed.
    engine = Engine(SimConfig(model="m", wake_ms=0))
    before = engine.memory_bytes()
    await engine.sleep(2)
    assert engine.is_sleeping and engine.memory_bytes() == before and engine.weights_valid
    await engine.wake_up()
    assert not engine.is_sleeping


def test_keepalive_and_max_n_follow_vllms_environment():
    cfg, _ = parse(["m"])
    assert cfg.keepalive_s == 5.0 and cfg.max_n_sequences == 16384
    cfg, _ = parse(["m"], {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "2.5", "VLLM_MAX_N_SEQUENCES": "8"})
    assert cfg.keepalive_s == 2.5 and cfg.max_n_sequences == 8
    cfg, _ = parse(["m", "--sim-keepalive-s", "0.2"], {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "2.5"})
    assert cfg.keepalive_s == 0.2  # the flag wins
    with pytest.raises(ValueError, match="VLLM_MAX_N_SEQUENCES must be a number"):
        parse(["m"], {"VLLM_MAX_N_SEQUENCES": "lots"})
    with pytest.raises(ValueError, match="VLLM_HTTP_TIMEOUT_KEEP_ALIVE must be > 0"):
        parse(["m"], {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "0"})
