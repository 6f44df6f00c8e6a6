"""`assign`'s pure parts and its rewrite of agent.toml: the request body, the table changes, a catalog
entry written back to the table the loader reads, and the file saved atomically with a backup."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w
import tomllib

from mvllm.agent.assign import parse_body, spec_table
from mvllm.agent.catalog_file import apply_changes, save_model_changes, updated_document
from mvllm.agent.config import load_config, model_from_table, parse_config
from mvllm.agent.errors import BadRequest
from mvllm.common.tomlconf import ConfigError

DOC = {
    "port": 7071,
    "token_env": "MVLLM_TEST_AGENT_TOKEN_UNUSED",
    "engine": "sim",
    "sim_gpus": [{"memory_gib": 24}, {"memory_gib": 24}],
    "idle_timeout": 300,
    "models": {
        "a": {"model": "org/a", "devices": [0], "tensor_parallel_size": 1, "memory_gib": 10, "extra_args": ["--seed", "1"]},
        "b": {"model": "org/b", "gpu_memory_utilization": 0.4, "lora_adapters": {"sql": "./loras/sql"}},
    },
}


@pytest.fixture
def agent_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MVLLM_TEST_AGENT_TOKEN_UNUSED", "t0k3n")
    path = tmp_path / "agent.toml"
    path.write_text("# operator's comment\n" + tomli_w.dumps(DOC))
    return path


def test_body_fields_are_checked_by_name() -> None:
    assert parse_body({"devices": "0,1", "gpu_memory_utilization": 0.7, "restart": True}) == (
        {"devices": [0, 1], "gpu_memory_utilization": 0.7},
        True,
    )
    assert parse_body({"devices": 1}) == ({"devices": [1]}, False)
    assert parse_body({"max_model_len": None}) == ({"max_model_len": None}, False)  # back to the engine default
    for body, word in [({"gpus": [0]}, "gpus"), ({}, "nothing to change"), ({"restart": "yes"}, "restart"),
                       ({"devices": "0,x"}, "devices"), ({"devices": None}, "cannot be removed")]:  # fmt: skip
        with pytest.raises(BadRequest, match=word):
            parse_body(body)


def test_changes_set_and_remove_keys_and_keep_one_budget() -> None:
    table = {"model": "m", "devices": [0], "tensor_parallel_size": 1, "memory_gib": 10, "max_model_len": 4096}
    out = apply_changes(table, {"devices": [0, 1], "gpu_memory_utilization": 0.7, "max_model_len": None})
    assert out == {"model": "m", "devices": [0, 1], "tensor_parallel_size": 2, "gpu_memory_utilization": 0.7}
    assert apply_changes(out, {"memory_gib": 8}) == {"model": "m", "devices": [0, 1], "tensor_parallel_size": 2, "memory_gib": 8}
    assert table["memory_gib"] == 10  # the input is left alone
    assert "tensor_parallel_size" not in apply_changes({"model": "m"}, {"devices": [1]})


def test_a_catalog_entry_reads_back_from_its_table(agent_toml: Path) -> None:
    cfg = load_config(agent_toml)
    for name, spec in cfg.models.items():
        again = model_from_table(cfg, name, spec_table(spec))
        # Every field, so that a field added to ModelSpec later must be written by spec_table too.
        skip = {"shape", "shape_source"}  # read from config.json at load, not from the table
        for f in dataclasses.fields(spec):
            if f.name not in skip:
                assert getattr(again, f.name) == getattr(spec, f.name), f.name


def test_model_from_table_runs_the_loaders_checks(agent_toml: Path) -> None:
    cfg = load_config(agent_toml)
    with pytest.raises(ConfigError, match="sim_gpus") as e:
        model_from_table(cfg, "a", {**spec_table(cfg.models["a"]), "devices": [2], "tensor_parallel_size": 1})
    assert e.value.key == "models.a.devices"
    with pytest.raises(ConfigError, match="also served by"):
        model_from_table(cfg, "a", {**spec_table(cfg.models["a"]), "served_model_name": ["b"]})
    with pytest.raises(ConfigError) as e:
        model_from_table(cfg, "a", {**spec_table(cfg.models["a"]), "gpu_memory_utilization": 2.0})
    assert e.value.key == "models.a.gpu_memory_utilization"


def test_updated_document_touches_only_the_entry() -> None:
    doc = updated_document(DOC, "a", {"devices": [1]}, {})
    assert doc["models"]["a"]["devices"] == [1] and doc["models"]["b"] == DOC["models"]["b"]
    assert {k: v for k, v in doc.items() if k != "models"} == {k: v for k, v in DOC.items() if k != "models"}
    assert DOC["models"]["a"]["devices"] == [0]
    # An entry the file lacks is written whole.
    assert updated_document(DOC, "c", {"devices": [1]}, {"model": "org/c", "devices": [1]})["models"]["c"] == {
        "model": "org/c",
        "devices": [1],
    }


def validate(path: Path) -> Callable[[dict], object]:
    """The loader, as the agent passes it."""
    return lambda doc: parse_config(doc, path)


def test_save_writes_the_change_keeps_the_rest_and_a_backup(agent_toml: Path) -> None:
    before = agent_toml.read_text()
    mode = 0o640
    os.chmod(agent_toml, mode)
    res = save_model_changes(agent_toml, "a", {"devices": [1], "gpu_memory_utilization": 0.5}, {}, validate(agent_toml))
    assert res.saved and res.backup == str(agent_toml) + ".bak" and res.reason is None
    doc = tomllib.loads(agent_toml.read_text())
    assert doc["models"]["a"] == {"model": "org/a", "devices": [1], "tensor_parallel_size": 1, "gpu_memory_utilization": 0.5,
                                  "extra_args": ["--seed", "1"]}  # fmt: skip
    assert doc["models"]["b"]["lora_adapters"] == {"sql": "./loras/sql"}  # as written, still relative
    assert doc["token_env"] == DOC["token_env"] and doc["sim_gpus"] == DOC["sim_gpus"] and doc["idle_timeout"] == 300
    assert Path(res.backup).read_text() == before  # comments and all
    assert os.stat(agent_toml).st_mode & 0o777 == mode
    assert [p.name for p in agent_toml.parent.iterdir() if p.name.endswith(".tmp")] == []
    assert load_config(agent_toml).models["a"].devices == [1]


def test_save_refuses_a_document_the_loader_would_refuse(agent_toml: Path) -> None:
    before = agent_toml.read_text()
    res = save_model_changes(agent_toml, "a", {"devices": [7]}, {}, validate(agent_toml))
    assert not res.saved and "would not load again" in res.reason and "models.a.devices" in res.reason
    assert agent_toml.read_text() == before and not Path(str(agent_toml) + ".bak").exists()


def test_a_read_only_file_is_reported_and_left_alone(agent_toml: Path) -> None:
    before = agent_toml.read_text()
    os.chmod(agent_toml, 0o444)
    try:
        res = save_model_changes(agent_toml, "a", {"max_num_seqs": 8}, {}, validate(agent_toml))
    finally:
        os.chmod(agent_toml, 0o644)
    assert not res.saved and "read-only" in res.reason and "until the agent restarts" in res.reason
    assert agent_toml.read_text() == before
    assert [p.name for p in agent_toml.parent.iterdir()] == ["agent.toml"]


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    res = save_model_changes(tmp_path / "gone.toml", "a", {"max_num_seqs": 8}, {}, lambda doc: None)
    assert not res.saved and "file not found" in res.reason
