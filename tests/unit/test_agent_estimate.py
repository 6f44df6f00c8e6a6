"""The memory estimate of a catalog model without a budget (mvllm.agent.estimate), the lookup of
its config.json (mvllm.agent.modelfiles), and their use by the agent config and placement.

The shapes are the published config.json files of the models named; their exact parameter counts
(from the model cards / safetensors index) check the formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mvllm.agent.config import parse_config
from mvllm.agent.estimate import (
    GIB,
    KV_SEQUENCES,
    OVERHEAD_BYTES,
    estimate,
    flag_value,
    parse_length,
    shape_from_config,
)
from mvllm.agent.launch import engine_argv
from mvllm.agent.modelfiles import find_config_json, hub_cache_dirs, read_shape
from mvllm.agent.placement import DEFAULT_UTILIZATION, need_bytes

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}  # fmt: skip
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}  # fmt: skip
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32000,
}  # fmt: skip
MIXTRAL_8X7B = {**MISTRAL_7B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8,
                "num_experts_per_tok": 2}  # fmt: skip

ROUND = 256 * 1024**2


def rounded(n: float) -> int:
    return math.ceil(n / ROUND) * ROUND


# ------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("doc", "exact", "tolerance"),
    [
        (LLAMA3_8B, 8_030_261_248, 0),
        (MISTRAL_7B, 7_241_732_096, 0),
        (MIXTRAL_8X7B, 46_702_792_704, 0),
        (QWEN25_05B, 494_032_768, 1e-4),  # its q/k/v biases (27,648 params) are not counted
    ],
)
def test_parameter_count_from_config_json(doc, exact, tolerance):
    shape = shape_from_config(doc)
    assert abs(shape.params - exact) <= exact * tolerance, shape.params


def test_shape_reads_gqa_heads_and_tied_embeddings():
    llama = shape_from_config(LLAMA3_8B)
    assert (llama.layers, llama.kv_heads, llama.head_dim, llama.max_position) == (32, 8, 128, 8192)
    assert llama.embed_params == 2 * 128256 * 4096  # embeddings + untied lm_head
    qwen = shape_from_config(QWEN25_05B)
    assert (qwen.kv_heads, qwen.head_dim) == (2, 64)
    assert qwen.embed_params == 151936 * 896  # tied: counted once


def test_shape_without_kv_heads_is_multi_head_and_missing_keys_are_named():
    mha = shape_from_config({k: v for k, v in LLAMA3_8B.items() if k != "num_key_value_heads"})
    assert mha.kv_heads == 32
    with pytest.raises(ValueError, match=r"hidden_size.*vocab_size"):
        shape_from_config({"num_hidden_layers": 2, "num_attention_heads": 2})


def test_multimodal_text_config_is_used():
    doc = {"model_type": "llava", "torch_dtype": "float16", "text_config": dict(MISTRAL_7B, torch_dtype=None)}
    shape = shape_from_config(doc)
    assert shape.params == 7_241_732_096 and shape.dtype == "float16"
    assert "vision tower not counted" in shape.note


# ------------------------------------------------------------------------------------ estimate


def test_llama3_8b_estimate_is_weights_plus_kv_plus_overhead():
    est = estimate(shape_from_config(LLAMA3_8B), max_model_len=8192)
    weights = 8_030_261_248 * 2
    kv = 2 * 32 * 8 * 128 * 2 * 8192 * KV_SEQUENCES  # 128 KiB per token (GQA: 8 KV heads) = 4 GiB
    assert kv == 4 * GIB
    assert est.bytes == rounded(weights + kv + OVERHEAD_BYTES)
    assert (est.weights_bytes, est.kv_bytes, est.overhead_bytes) == (weights, kv, OVERHEAD_BYTES)
    assert "config.json: 8.03B params bfloat16" in est.basis
    assert f"KV {KV_SEQUENCES} x 8192 tok (max_model_len)" in est.basis
    assert est.to_dict()["bytes"] == est.bytes


def test_gqa_needs_a_quarter_of_the_kv_of_multi_head_attention():
    gqa = estimate(shape_from_config(LLAMA3_8B), max_model_len=8192)
    mha = estimate(shape_from_config({**LLAMA3_8B, "num_key_value_heads": 32}), max_model_len=8192)
    assert mha.kv_bytes == 4 * gqa.kv_bytes
    assert mha.bytes > gqa.bytes


def test_qwen_05b_defaults_to_max_position_embeddings():
    est = estimate(shape_from_config(QWEN25_05B))
    kv = 2 * 24 * 2 * 64 * 2 * 32768 * KV_SEQUENCES  # 12 KiB per token
    assert est.kv_bytes == kv == int(1.5 * GIB)
    assert est.bytes == rounded(494_005_120 * 2 + kv + OVERHEAD_BYTES) == int(4.5 * GIB)
    assert "0.49B params bfloat16" in est.basis and "(max_position_embeddings)" in est.basis


def test_fewer_sequences_shorter_length_and_tensor_parallelism():
    shape = shape_from_config(LLAMA3_8B)
    one = estimate(shape, max_model_len="4k", max_num_seqs=1)
    assert one.kv_bytes == 2 * 32 * 8 * 128 * 2 * 4000
    assert "KV 1 x 4000 tok" in one.basis
    full = estimate(shape, max_model_len=8192)
    tp2 = estimate(shape, max_model_len=8192, tensor_parallel_size=2)
    assert tp2.weights_bytes == full.weights_bytes // 2 and tp2.kv_bytes == full.kv_bytes // 2
    assert tp2.overhead_bytes == OVERHEAD_BYTES  # every GPU has its own CUDA context
    assert "/ tp 2" in tp2.basis


def test_dtypes_float32_auto_explicit_kv_fp8_and_quantized():
    f32 = {**QWEN25_05B, "torch_dtype": "float32"}
    auto = estimate(shape_from_config(f32), max_model_len=1024)
    assert auto.weights_bytes == 494_005_120 * 2  # vLLM's auto runs float32 checkpoints in 16 bits
    explicit = estimate(shape_from_config(f32), dtype="float32", max_model_len=1024)
    assert explicit.weights_bytes == 494_005_120 * 4
    kv8 = estimate(shape_from_config(LLAMA3_8B), kv_dtype="fp8", max_model_len=8192)
    assert kv8.kv_bytes == 2 * GIB
    awq = {**LLAMA3_8B, "torch_dtype": "float16", "quantization_config": {"quant_method": "awq", "bits": 4}}
    q = estimate(shape_from_config(awq), max_model_len=8192)
    embed = 2 * 128256 * 4096
    assert q.weights_bytes == int((8_030_261_248 - embed) * 0.5 + embed * 2)
    assert "4-bit quantized" in q.basis


def test_param_count_alone_as_seed_000():
    est = estimate(None, param_count_b=7, dtype="float16")
    assert est.weights_bytes == 14_000_000_000
    assert est.kv_bytes == int(14_000_000_000 * 0.25)
    assert "param_count 7.00B float16" in est.basis and "25% of weights" in est.basis
    # param_count wins over the computed count, the shape still gives the KV cache
    both = estimate(shape_from_config(LLAMA3_8B), param_count_b=8, max_model_len=8192)
    assert both.weights_bytes == 16_000_000_000 and both.kv_bytes == 4 * GIB


def test_nothing_to_estimate_from():
    est = estimate(None, source="org/m not in the HF cache (/x)")
    assert est.bytes is None and "not in the HF cache" in est.basis


def test_parse_length():
    assert parse_length(4096) == 4096
    assert parse_length("32k") == 32000 and parse_length("32K") == 32768 and parse_length("1.5k") == 1500
    assert parse_length("auto") is None and parse_length(-1) is None and parse_length(None) is None
    with pytest.raises(ValueError):
        parse_length("long")
    assert flag_value(["--dtype", "half", "--x", "--dtype=float32"], "--dtype") == "float32"
    assert flag_value(["--enforce-eager"], "--dtype") is None


# --------------------------------------------------------------------------- finding config.json


def _hub_snapshot(cache: Path, repo: str, doc: dict, commit: str = "abc123") -> Path:
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(doc))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap / "config.json"


def test_config_json_from_the_hf_cache_and_from_a_local_dir(tmp_path):
    path = _hub_snapshot(tmp_path / "hf" / "hub", "Qwen/Qwen2.5-0.5B", QWEN25_05B)
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert find_config_json("Qwen/Qwen2.5-0.5B", env) == (path, str(path))
    shape, where = read_shape("Qwen/Qwen2.5-0.5B", env)
    assert shape is not None and shape.kv_heads == 2 and where == str(path)

    local = tmp_path / "models" / "llama"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps(LLAMA3_8B))
    shape, _ = read_shape(str(local), {})
    assert shape is not None and shape.params == 8_030_261_248

    missing, why = read_shape("org/absent", env)
    assert missing is None and "not in the HF cache" in why and str(tmp_path / "hf" / "hub") in why


def test_hub_cache_order():
    dirs = hub_cache_dirs({"HF_HUB_CACHE": "/a", "HF_HOME": "/b", "TRANSFORMERS_CACHE": "/c"})
    assert dirs == [Path("/a"), Path("/b/hub"), Path("/c")]
    assert hub_cache_dirs({"HOME": "/home/u"}) == [Path("/home/u/.cache/huggingface/hub")]


# ---------------------------------------------------------------- the agent config and placement


def test_catalog_entry_without_budget_gets_an_estimate(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    _hub_snapshot(hub, "meta-llama/Meta-Llama-3-8B", LLAMA3_8B)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    cfg = parse_config(
        {
            "models": {
                "llama": {"model": "meta-llama/Meta-Llama-3-8B", "max_model_len": 8192},
                "budget": {"model": "meta-llama/Meta-Llama-3-8B", "memory_gib": 20},
                "seed000": {"model": "org/unknown", "param_count": 7, "dtype": "fp16"},
                "nothing": {"model": "org/unknown"},
            }
        }
    )
    llama = cfg.models["llama"].memory_estimate
    assert llama is not None and llama.bytes == rounded(8_030_261_248 * 2 + 4 * GIB + OVERHEAD_BYTES)
    assert cfg.models["budget"].memory_estimate is None and cfg.models["budget"].shape is None  # not even read
    seed = cfg.models["seed000"]
    assert seed.dtype == "float16" and seed.memory_estimate is not None and seed.memory_estimate.bytes
    assert cfg.models["nothing"].memory_estimate.bytes is None

    total = 80 * GIB
    assert need_bytes(None, None, total, llama.bytes) == llama.bytes
    assert need_bytes(None, None, total, None) == int(DEFAULT_UTILIZATION * total)
    assert need_bytes(None, 0.5, total, llama.bytes) == total // 2  # a given fraction wins
    argv = engine_argv(cfg, seed, 9001, None, None)
    assert argv[argv.index("--dtype") + 1] == "float16"


def test_entry_env_picks_the_cache_and_bad_dtype_is_refused(tmp_path):
    _hub_snapshot(tmp_path / "own" / "hub", "Qwen/Qwen2.5-0.5B", QWEN25_05B)
    cfg = parse_config({"models": {"q": {"model": "Qwen/Qwen2.5-0.5B", "env": {"HF_HOME": str(tmp_path / "own")}}}})
    assert cfg.models["q"].memory_estimate.bytes == int(4.5 * GIB)
    from mvllm.common.tomlconf import ConfigError

    with pytest.raises(ConfigError, match="dtype"):
        parse_config({"models": {"q": {"model": "x", "dtype": "fp7"}}})
