"""`lora_dir` on a catalog model: checked at config load, and the adapters it holds (one
subdirectory with an adapter_config.json each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvllm.agent.config import load_config
from mvllm.agent.launch import engine_argv, engine_env
from mvllm.agent.lora_dir import adapter_path, adapters
from mvllm.common.tomlconf import ConfigError


def _adapter(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return root / name


def _config(tmp_path: Path, lora_dir: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(f'engine = "sim"\n[models.m]\nmodel = "org/m"\nlora_dir = "{lora_dir}"\n')
    return p


def test_lora_dir_relative_to_the_config_file_and_the_engine_started_for_runtime_loras(tmp_path: Path) -> None:
    (tmp_path / "loras").mkdir()
    cfg = load_config(_config(tmp_path, "loras"))
    spec = cfg.models["m"]
    assert spec.lora_dir == tmp_path / "loras" and spec.lora_adapters == {}
    assert spec.runtime_lora and spec.lora_enabled and spec.max_loras == 4
    argv = engine_argv(cfg, spec, 9000, None, None)
    assert argv[argv.index("--enable-lora") :][:3] == ["--enable-lora", "--max-loras", "4"]
    assert engine_env(cfg, spec, "a", {})["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"


@pytest.mark.parametrize(("make", "problem"), [(None, "does not exist"), ("file", "is not a directory")])
def test_lora_dir_must_be_an_existing_directory(tmp_path: Path, make: str | None, problem: str) -> None:
    if make == "file":
        (tmp_path / "loras").write_text("")
    with pytest.raises(ConfigError, match=rf"models\.m\.lora_dir.*{problem}"):
        load_config(_config(tmp_path, "loras"))


def test_adapters_are_subdirectories_with_an_adapter_config(tmp_path: Path) -> None:
    sql = _adapter(tmp_path, "sql-lora")
    _adapter(tmp_path, "chat.v2")
    (tmp_path / "empty").mkdir()  # no adapter_config.json: not an adapter
    (tmp_path / "notes.txt").write_text("")
    _adapter(tmp_path, ".hidden")
    assert adapters(tmp_path) == {"chat.v2": str(tmp_path / "chat.v2"), "sql-lora": str(sql)}
    assert adapter_path(tmp_path, "sql-lora") == str(sql)
    for name in ("empty", "notes.txt", ".hidden", "../" + tmp_path.name + "/sql-lora", "sql-lora/", "nope"):
        assert adapter_path(tmp_path, name) is None, name
    assert adapters(tmp_path / "gone") == {}
