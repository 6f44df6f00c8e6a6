"""`.env` files fill in what the environment leaves unset: working directory first, then beside the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvllm.common.envvars import load_dotenv, load_dotenvs


def test_dotenv_sets_only_missing_variables(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text('MVLLM_PORT=9999\nHF_TOKEN="hf_abc"\n# comment\nexport HF_HOME=/data/hf\n')
    environ = {"MVLLM_PORT": "8000"}
    assert load_dotenv(tmp_path, environ) == tmp_path / ".env"
    assert environ == {"MVLLM_PORT": "8000", "HF_TOKEN": "hf_abc", "HF_HOME": "/data/hf"}


def test_no_dotenv_is_not_an_error(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert load_dotenv(tmp_path, environ) is None
    assert environ == {}


def test_working_directory_then_config_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work, conf = tmp_path / "work", tmp_path / "conf"
    work.mkdir()
    conf.mkdir()
    (work / ".env").write_text("A=from-work\n")
    (conf / ".env").write_text("A=from-conf\nB=from-conf\n")
    monkeypatch.chdir(work)
    environ: dict[str, str] = {}
    loaded = load_dotenvs(conf / "servers.toml", environ)
    assert loaded == [work / ".env", conf.resolve() / ".env"]
    assert environ == {"A": "from-work", "B": "from-conf"}


def test_config_in_working_directory_reads_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("A=1\n")
    monkeypatch.chdir(tmp_path)
    environ: dict[str, str] = {}
    assert load_dotenvs(Path("servers.toml"), environ) == [tmp_path / ".env"]
    assert environ == {"A": "1"}
