"""agent.toml loading: defaults, every catalog key, and errors that name the key."""

from pathlib import Path

import pytest

from mvllm.agent.config import GIB, check_listen, load_config, parse_config
from mvllm.common.tomlconf import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults():
    cfg = parse_config({"models": {"m": {"model": "org/m"}}})
    assert cfg.host == "127.0.0.1" and cfg.port == 7070 and cfg.engine == "vllm"
    assert cfg.engine_binary == ["vllm"]
    spec = cfg.models["m"]
    assert spec.served_model_names == ["m"] and spec.devices == [0] and spec.tensor_parallel_size == 1
    assert spec.idle_timeout == 600 and spec.unload_timeout == 3600 and spec.sleep_level_on_idle == 1
    assert cfg.reserve_bytes == GIB
    assert cfg.max_switch_wait == 30.0
    assert parse_config({"max_switch_wait": 2}).max_switch_wait == 2.0
    assert parse_config({"max_switch_wait": 0}).max_switch_wait == 0.0  # drain at once


def test_every_catalog_key(monkeypatch):
    monkeypatch.setenv("AGENT_TOKEN_T", "s3cret")
    cfg = parse_config(
        {
            "host": "0.0.0.0",
            "token_env": "AGENT_TOKEN_T",
            "engine": "sim",
            "engine_port_range": [20000, 20010],
            "idle_timeout": 30,
            "sim_gpus": [{"memory_gib": 24}, {"memory_gib": 24, "name": "b"}],
            "models": {
                "big": {
                    "model": "org/big",
                    "served_model_name": ["big", "big-alias"],
                    "devices": [0, 1],
                    "tensor_parallel_size": 2,
                    "memory_gib": 10,
                    "max_model_len": "32k",
                    "max_num_seqs": 64,
                    "extra_args": ["--enforce-eager"],
                    "env": {"X": "1"},
                    "idle_timeout": 0,
                    "sleep_level_on_idle": 2,
                    "unload_timeout": 60,
                    "pinned": True,
                    "preload": True,
                    "lora_adapters": {"sql": "/loras/sql"},
                    "max_lora_rank": 8,
                    "sim": {"weights_gib": 2},
                }
            },
        }
    )
    assert cfg.token == "s3cret" and cfg.token_env == "AGENT_TOKEN_T"
    s = cfg.models["big"]
    assert s.devices == [0, 1] and s.tensor_parallel_size == 2 and s.memory_gib == 10
    assert s.idle_timeout is None  # 0 = never
    assert s.unload_timeout == 60 and s.sleep_level_on_idle == 2 and s.pinned and s.preload
    assert s.lora_adapters == {"sql": "/loras/sql"} and s.max_lora_rank == 8
    assert cfg.model_for("big-alias") == (s, None)
    assert cfg.model_for("sql") == (s, "sql")
    assert cfg.model_for("nope") is None
    check_listen(cfg)  # has a token: any address is fine


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"models": {"m": {}}}, "models.m.model"),
        ({"models": {"m": {"model": "x", "bogus": 1}}}, "models.m.bogus"),
        ({"models": {"m": {"model": "x", "devices": [0, 1], "tensor_parallel_size": 1}}}, "models.m.tensor_parallel_size"),
        ({"models": {"m": {"model": "x", "sleep_level_on_idle": 3}}}, "models.m.sleep_level_on_idle"),
        ({"models": {"m": {"model": "x", "gpu_memory_utilization": 1.5}}}, "models.m.gpu_memory_utilization"),
        ({"engine": "trt"}, "engine"),
        ({"max_switch_wait": -1}, "max_switch_wait"),
        ({"max_switch_wait": "30s"}, "max_switch_wait"),
        ({"engine_port_range": [9000]}, "engine_port_range"),
        ({"token_env": "MVLLM_SURELY_UNSET_VAR"}, "token_env"),
        ({"engine": "sim", "models": {"m": {"model": "x", "devices": [1]}}}, "models.m.devices"),
        ({"models": {"a": {"model": "x"}, "b": {"model": "y", "served_model_name": "a"}}}, "models.b"),
    ],
)
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "agent.toml")
    assert exc.value.key == key, str(exc.value)


def test_refuses_to_listen_beyond_loopback_without_token():
    check_listen(parse_config({"host": "127.0.0.1"}))
    check_listen(parse_config({"host": "::1"}))
    with pytest.raises(ConfigError, match="needs a token"):
        check_listen(parse_config({"host": "0.0.0.0"}))


def test_relative_paths_follow_the_config_file(tmp_path):
    p = tmp_path / "agent.toml"
    p.write_text('log_dir = "engine-logs"\n[models.m]\nmodel = "x"\nlora_adapters = {a = "./loras/a"}\n')
    cfg = load_config(p)
    assert cfg.log_dir == tmp_path / "engine-logs"
    assert cfg.models["m"].lora_adapters["a"] == str(tmp_path / "loras/a")


def test_example_config_loads(monkeypatch):
    monkeypatch.setenv("MVLLM_AGENT_TOKEN", "t")
    cfg = load_config(REPO / "agent.example.toml")
    assert cfg.models, "the example has a catalog"


def test_sleep_level_2_with_lora_loads_with_a_warning():
    cfg = parse_config(
        {
            "models": {
                "lora": {"model": "org/a", "sleep_level_on_idle": 2, "lora_adapters": {"sql": "/l/sql"}},
                "flag": {"model": "org/b", "sleep_level_on_idle": 2, "extra_args": ["--enable-lora"]},
                "off": {"model": "org/c", "sleep_level_on_idle": 2, "extra_args": ["--enable-lora=false"]},
                "plain": {"model": "org/d", "sleep_level_on_idle": 2},
                "one": {"model": "org/e", "sleep_level_on_idle": 1, "lora_adapters": {"x": "/l/x"}},
            }
        },
        "agent.toml",
    )
    m = cfg.models
    assert [n for n, s in m.items() if s.lora_enabled] == ["lora", "flag", "one"]
    assert {n: s.sleep_level_on_idle for n, s in m.items()} == {"lora": 2, "flag": 2, "off": 2, "plain": 2, "one": 1}
    assert {n: s.effective_sleep_level_on_idle for n, s in m.items()} == {
        "lora": 1, "flag": 1, "off": 2, "plain": 2, "one": 1
    }
    assert len(cfg.warnings) == 2
    assert "models.lora.sleep_level_on_idle = 2" in cfg.warnings[0] and "level 1" in cfg.warnings[0]
    assert cfg.warnings[0].startswith("agent.toml: ") and "models.flag." in cfg.warnings[1]
