"""`mvllm top`, registered by mvllm/tui/cli.py: its flags, the environment defaults it shares with
the operator commands, and its refusal to run without a terminal."""

from __future__ import annotations

import pytest

from mvllm.cli import build_parser
from mvllm.client.endpoint import KEY_ENV, ROUTER_ENV, default_key, default_router
from mvllm.tui.cli import EXIT_ERROR, run_top


def test_top_parses_router_key_and_interval() -> None:
    args = build_parser().parse_args(["top", "--router", "http://10.0.0.5:8888", "--key", "k", "--interval", "2.5"])
    assert args.func is run_top
    assert (args.router, args.key, args.interval) == ("http://10.0.0.5:8888", "k", 2.5)


def test_router_and_key_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROUTER_ENV, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert default_router() == "http://127.0.0.1:8888" and default_key() is None
    monkeypatch.setenv(ROUTER_ENV, "http://gpu-box:9000")
    monkeypatch.setenv(KEY_ENV, "sk-admin")
    assert default_router() == "http://gpu-box:9000" and default_key() == "sk-admin"


def test_top_without_a_terminal_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    # Under pytest stdin is not a terminal.
    assert run_top(build_parser().parse_args(["top"])) == EXIT_ERROR
    assert "mvllm top needs a terminal" in capsys.readouterr().err
