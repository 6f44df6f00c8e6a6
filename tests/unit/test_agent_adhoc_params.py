"""The ad-hoc flag allow-list: names, value kinds, the agent's own flags, argv form, and `[adhoc]` parsing."""

from __future__ import annotations

import pytest

from mvllm.agent.adhoc_params import (
    DEFAULT_ALLOWED,
    AdhocConfig,
    ParamError,
    param_args,
    parse_adhoc,
    validate_params,
)
from mvllm.agent.config import parse_config
from mvllm.common.tomlconf import ConfigError, Section


def test_allowed_flags_pass_with_their_names_normalised() -> None:
    got = validate_params(
        {"max-model-len": "32k", "--max_num_seqs": 64, "gpu_memory_utilization": 0.5, "enforce_eager": True,
         "dtype": "bfloat16", "quantization": "awq", "kv_cache_memory_bytes": "8G", "seed": 0},
        DEFAULT_ALLOWED,
    )  # fmt: skip
    assert got == {
        "max_model_len": "32k", "max_num_seqs": 64, "gpu_memory_utilization": 0.5, "enforce_eager": True,
        "dtype": "bfloat16", "quantization": "awq", "kv_cache_memory_bytes": "8G", "seed": 0,
    }  # fmt: skip
    assert validate_params(None, DEFAULT_ALLOWED) == {}


def test_a_flag_outside_the_list_is_refused_by_name_with_the_list() -> None:
    with pytest.raises(ParamError) as e:
        validate_params({"max_model_len": 1024, "tokenizer_pool_size": 4}, DEFAULT_ALLOWED)
    assert e.value.flag == "tokenizer_pool_size"
    assert "'tokenizer_pool_size' is not allowed" in e.value.message
    assert "max_model_len" in e.value.message and "enforce_eager" in e.value.message  # the allowed list


@pytest.mark.parametrize("name", ["host", "port", "served-model-name", "enable_sleep_mode", "api_key", "model"])
def test_the_agents_own_flags_are_never_accepted(name: str) -> None:
    with pytest.raises(ParamError, match="set by the agent itself") as e:
        validate_params({name: "x"}, [*DEFAULT_ALLOWED, name.replace("-", "_")])
    assert e.value.flag == name.replace("-", "_")


def test_trust_remote_code_needs_the_config_switch() -> None:
    with pytest.raises(ParamError, match="allow_trust_remote_code"):
        validate_params({"trust_remote_code": True}, DEFAULT_ALLOWED)
    assert validate_params({"trust_remote_code": True}, DEFAULT_ALLOWED, trust_remote_code=True) == {
        "trust_remote_code": True
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_model_len", "lots"),
        ("max_model_len", 0),
        ("max_num_seqs", 1.5),
        ("max_num_seqs", True),
        ("gpu_memory_utilization", 1.2),
        ("gpu_memory_utilization", 0),
        ("enforce_eager", "yes"),
        ("dtype", "int4"),
        ("max_lora_rank", 12),
        ("quantization", "awq --trust-remote-code"),  # a value is never a second flag
        ("revision", "-main"),
        ("swap_space", -1),
    ],
)
def test_values_of_the_wrong_kind_are_refused(name: str, value: object) -> None:
    with pytest.raises(ParamError) as e:
        validate_params({name: value}, DEFAULT_ALLOWED)
    assert e.value.flag == name and e.value.message.startswith(f"{name}:")


def test_params_must_be_an_object_and_a_flag_counts_once() -> None:
    with pytest.raises(ParamError, match="JSON object"):
        validate_params(["max_model_len"], DEFAULT_ALLOWED)
    with pytest.raises(ParamError, match="given twice"):
        validate_params({"max_model_len": 1, "max-model-len": 2}, DEFAULT_ALLOWED)


def test_argv_form_keeps_values_glued_to_their_flags_and_skips_the_structured_ones() -> None:
    args = param_args(
        {"max_model_len": 2048, "gpu_memory_utilization": 0.5, "dtype": "half", "enforce_eager": True,
         "enable_prefix_caching": False, "kv_cache_memory_bytes": "8G", "quantization": "awq"}
    )  # fmt: skip
    assert args == ["--enforce-eager", "--no-enable-prefix-caching", "--kv-cache-memory-bytes=8G", "--quantization=awq"]


def adhoc(data: dict) -> AdhocConfig:
    return parse_adhoc(Section(data, "agent.toml", "adhoc"))


def test_adhoc_section_defaults_and_overrides() -> None:
    cfg = adhoc({})
    assert cfg.max_instances == 4 and cfg.default_ttl == 600 and cfg.allowed_params == DEFAULT_ALLOWED
    assert "trust_remote_code" not in cfg.allowed_params and cfg.model_allowed("any/model")
    cfg = adhoc(
        {"allowed_params": ["max-model-len", "rope_scaling_factor"], "default_ttl": 0, "allowed_models": ["Qwen/*"],
         "base_params": {"dtype": "auto", "trust_remote_code": True}, "max_instances": 0}
    )  # fmt: skip
    assert cfg.allowed_params == ("max_model_len", "rope_scaling_factor") and cfg.default_ttl is None
    assert cfg.base_params == {"dtype": "auto", "trust_remote_code": True} and cfg.max_instances == 0
    assert cfg.model_allowed("Qwen/Qwen3-0.6B") and not cfg.model_allowed("meta-llama/x")
    # An operator-added flag the table does not know takes a plain scalar, still never a second flag.
    assert validate_params({"rope_scaling_factor": 2.0}, cfg.allowed_params) == {"rope_scaling_factor": 2.0}
    with pytest.raises(ParamError):
        validate_params({"rope_scaling_factor": "2 --x"}, cfg.allowed_params)


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"allowed_params": ["port"]}, "adhoc.allowed_params", "set by the agent itself"),
        ({"allowed_params": ["trust_remote_code"]}, "adhoc.allowed_params", "allow_trust_remote_code"),
        ({"base_params": {"max_num_seqs": "many"}}, "adhoc.base_params.max_num_seqs", "integer"),
        ({"base_params": {"served_model_name": "x"}}, "adhoc.base_params.served_model_name", "set by the agent"),
        ({"max_ttl": 60, "default_ttl": 600}, "adhoc.default_ttl", "max_ttl"),
        ({"max_instance": 3}, "adhoc.max_instance", "unknown"),
    ],
)
def test_adhoc_section_errors_name_the_key(data: dict, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        adhoc(data)
    assert e.value.key == key and problem in str(e.value)


def test_agent_config_reads_the_adhoc_section() -> None:
    cfg = parse_config({"engine": "sim", "adhoc": {"max_instances": 2, "sim": {"weights_gib": 1}}})
    assert cfg.adhoc.max_instances == 2 and cfg.adhoc.sim == {"weights_gib": 1}
