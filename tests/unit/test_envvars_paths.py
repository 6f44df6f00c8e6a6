"""Environment variables over config keys (router and agent), what passes to an engine's
environment, and the router's un-versioned path aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvllm.agent.config import TOKEN_ENV
from mvllm.agent.config import apply_env as agent_apply_env
from mvllm.agent.config import parse_config as parse_agent
from mvllm.agent.launch import PASS_THROUGH, engine_env
from mvllm.common.envvars import AGENT_ENV, ROUTER_ENV, read_env
from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import apply_env, load_config
from mvllm.router.proxy import VERSIONED_ALIASES, is_proxied_path


def test_read_env_types_and_empty_values():
    env = read_env(
        ROUTER_ENV,
        {"MVLLM_PORT": "9000", "MVLLM_HOST": "", "MVLLM_LOG_LEVEL": "DEBUG", "MVLLM_LOG_RETENTION_DAYS": "7.5"},
    )
    assert env == {"port": 9000, "log_level": "debug", "log_retention_days": 7.5}  # empty HOST: unset


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("MVLLM_PORT", "http", "expected an integer"),
        ("MVLLM_PORT", "70000", "within 1..65535"),
        ("MVLLM_LOG_LEVEL", "loud", "expected one of"),
        ("MVLLM_LOG_RETENTION_DAYS", "-1", ">= 0"),
    ],
)
def test_invalid_values_name_the_variable(name, value, problem):
    with pytest.raises(ConfigError, match=f"environment variable {name}: .*{problem}"):
        read_env(ROUTER_ENV, {name: value})


def test_router_env_overrides_the_file_at_every_load(tmp_path: Path):
    cfg = tmp_path / "servers.toml"
    cfg.write_text('[router]\nhost = "127.0.0.1"\nport = 8001\nlog_level = "warning"\nlog_file = "r.log"\n')
    plain = load_config(cfg, environ={})
    assert (plain.host, plain.port, plain.log.level, plain.log.file) == ("127.0.0.1", 8001, "warning", tmp_path / "r.log")
    env = {"MVLLM_PORT": "8002", "MVLLM_LOG_LEVEL": "debug", "MVLLM_LOG_FILE": "/var/log/x.log", "MVLLM_LOG_BACKUPS": "2"}
    over = load_config(cfg, environ=env)
    assert (over.host, over.port, over.log.level, over.log.file, over.log.backups) == (
        "127.0.0.1", 8002, "debug", Path("/var/log/x.log"), 2,
    )  # fmt: skip
    assert apply_env(plain, env) == over


def test_agent_env_overrides_and_the_token_stays_out_of_engines():
    cfg = parse_agent(
        {"port": 7001, "token": "from-file", "log_level": "info", "models": {"m": {"model": "org/m", "memory_gib": 1}}}
    )
    agent_apply_env(
        cfg,
        {"MVLLM_AGENT_PORT": "7002", "MVLLM_AGENT_TOKEN": "from-env", "MVLLM_LOG_LEVEL": "error",
         "MVLLM_AGENT_LOG_DIR": "/tmp/x", "MVLLM_AGENT_ENGINE_LOG_MAX_BYTES": "4096"},
    )  # fmt: skip
    assert (cfg.port, cfg.token, cfg.log.level, str(cfg.log_dir), cfg.engine_log_max_bytes) == (
        7002, "from-env", "error", "/tmp/x", 4096,
    )  # fmt: skip
    assert cfg.token_env == TOKEN_ENV
    env = engine_env(cfg, cfg.models["m"], "1:2", {TOKEN_ENV: "from-env", "PATH": "/bin"})
    assert TOKEN_ENV not in env and env["PATH"] == "/bin"
    assert {v.name for v in AGENT_ENV} >= {"MVLLM_AGENT_HOST", "MVLLM_AGENT_PORT", "MVLLM_AGENT_TOKEN",
                                           "MVLLM_AGENT_CONFIG", "MVLLM_LOG_LEVEL"}  # fmt: skip


def test_hf_and_proxy_variables_pass_to_engines_and_the_entry_env_wins():
    cfg = parse_agent(
        {"models": {"m": {"model": "org/m", "memory_gib": 1, "env": {"HF_ENDPOINT": "https://mirror.example"}}}}
    )
    base = {name: f"agent-{name}" for name in PASS_THROUGH}
    env = engine_env(cfg, cfg.models["m"], "1:2", base)
    for name in PASS_THROUGH:
        expected = "https://mirror.example" if name == "HF_ENDPOINT" else f"agent-{name}"
        assert env[name] == expected, name
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_unversioned_aliases_are_proxied_as_their_v1_form():
    assert VERSIONED_ALIASES == {
        "/chat/completions": "/v1/chat/completions",
        "/completions": "/v1/completions",
        "/embeddings": "/v1/embeddings",
    }
    for path in VERSIONED_ALIASES:
        assert is_proxied_path(path)
    assert not is_proxied_path("/sleep") and not is_proxied_path("/chat")
