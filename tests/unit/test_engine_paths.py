"""Which engine paths `/proxy/{instance}/{path}` passes: those that carry no model and change nothing."""

from __future__ import annotations

import pytest

from mvllm.common.engine_paths import is_info_path


@pytest.mark.parametrize("path", ["health", "ping", "version", "load", "metrics", "v1/models", "v1/models/m1"])
def test_info_paths_pass(path: str) -> None:
    assert is_info_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "sleep", "wake_up", "collective_rpc", "is_sleeping", "reset_prefix_cache", "v1/load_lora_adapter",
        "v1/unload_lora_adapter", "v1/completions", "v1/chat/completions", "v1/models/", "v1/models/a/b",
        "v1/models/..", "x/v1/models/a", "", "health/../sleep",
    ],
)  # fmt: skip
def test_everything_else_stays_off(path: str) -> None:
    assert not is_info_path(path)
