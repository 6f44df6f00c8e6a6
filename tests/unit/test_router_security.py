"""Pure pieces of the router's security wiring: usage found in an answer's tail, path and header
hygiene, loopback checks, the model list per key, and the [auth] / api_key config keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.access.config import AuthConfig, load_auth
from mvllm.router.access.gate import AuthGate, is_loopback_address, is_loopback_host, visible_models
from mvllm.router.access.guard import header_problem, path_problem
from mvllm.router.access.keys import ApiKey, hash_key
from mvllm.router.access.usage_tail import TAIL_BYTES, find_usage, usage_tokens
from mvllm.router.config import parse_config

KEY = "sk-unit-test-0123456789abcdef"


# -- usage --------------------------------------------------------------------------------------------


def test_usage_of_a_json_body() -> None:
    body = {
        "id": "chatcmpl-1",
        "choices": [{"message": {"content": 'he said "usage": {"total_tokens": 999}'}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
        "prompt_logprobs": None,
    }
    assert find_usage(json.dumps(body).encode()) == 12


def test_usage_of_a_stream_tail() -> None:
    chunks = [
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert find_usage(b"".join(chunks)) == 7
    assert find_usage(chunks[0] + chunks[2]) is None  # only nulls: no usage reported
    assert find_usage(b'data: {"choices":[],"usage":{"prompt_tok') is None  # cut off


def test_usage_forms_and_odd_values() -> None:
    assert usage_tokens({"input_tokens": 2, "output_tokens": 3}) == 5  # the Responses API
    assert usage_tokens({"prompt_tokens": 4}) == 4  # embeddings
    assert usage_tokens({"total_tokens": -1, "prompt_tokens": 2, "completion_tokens": True}) == 2
    assert usage_tokens({"total_tokens": "12"}) is None
    assert usage_tokens([1, 2]) is None
    assert find_usage(b"") is None
    assert find_usage(b'"usage": 12') is None
    # Only the end of a big answer is searched.
    big = b'{"usage": {"total_tokens": 5}, "data": "' + b"x" * (TAIL_BYTES + 10) + b'"}'
    assert find_usage(big) is None


# -- guard --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/v1/../sleep", "/v1/./x", "/v1/x/..", "/..", "/v1/\x00x", "/v1/chat\r\nX: y", "/v1/\x7f"],
)
def test_paths_refused(path: str) -> None:
    assert path_problem(path) is not None


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models/org/model.v2", "/v1/..x/.y", "/v1/café", "/"])
def test_paths_accepted(path: str) -> None:
    assert path_problem(path) is None


def test_header_values_must_be_utf8() -> None:
    assert header_problem({"X-A": "plain", "X-B": "café"}) is None
    problem = header_problem({"X-Note": "caf\udce9"})  # how aiohttp keeps bytes that are not UTF-8
    assert problem is not None and "X-Note" in problem


# -- loopback, exposure, model lists ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("::ffff:127.0.0.1", True), ("10.0.0.1", False),
     ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("", False), (None, False), ("not-an-ip", False)],
)
def test_loopback_addresses(address: str | None, expected: bool) -> None:
    assert is_loopback_address(address) is expected


def test_exposure_warning_only_without_keys_beyond_loopback() -> None:
    open_gate = AuthGate(AuthConfig())
    assert is_loopback_host("localhost") and not is_loopback_host("0.0.0.0") and not is_loopback_host("")
    for host in ("127.0.0.1", "localhost", "::1"):
        assert open_gate.exposure_warning(host) is None
    for host in ("0.0.0.0", "", "::", "192.0.2.7", "gpu-box"):
        warning = open_gate.exposure_warning(host)
        assert warning is not None and "no API key" in warning
    keyed = AuthGate(AuthConfig(keys=(ApiKey("k", hash_key(KEY), "sk-un…"),)))
    assert keyed.exposure_warning("0.0.0.0") is None


def test_visible_models_follow_the_allow_list() -> None:
    cards = [{"id": "llama-3"}, {"id": "qwen-7b"}, {"id": "llama-3-lora"}, {"no": "id"}]
    assert visible_models(None, cards) == cards
    key = ApiKey("k", hash_key(KEY), "sk-un…", models=("llama-*",))
    assert [c["id"] for c in visible_models(key, cards)] == ["llama-3", "llama-3-lora"]
    assert visible_models(ApiKey("n", hash_key(KEY), "sk-un…", models=()), cards) == []


# -- config ------------------------------------------------------------------------------------------------


def test_auth_table_node_api_keys_and_client_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {
        "router": {"client_timeout": 5},
        "servers": {"servers": [
            {"url": "http://a:8000", "api_key": "node-secret"},
            {"url": "http://b:8000", "api_key_env": "NODE_B_KEY"},
            {"url": "http://c:8000"},
        ]},
        "auth": {"keys": [{"name": "u", "key": KEY}], "agent_token": "agent-token-0123456789"},
        "agents": [{"url": "http://gpu:7070"}, {"url": "http://gpu2:7070", "token": "own-agent-token"}],
    }
    monkeypatch.setenv("NODE_B_KEY", "from-env-0000")
    cfg = parse_config(data, tmp_path / "servers.toml")
    assert cfg.client_timeout == 5
    assert [k.name for k in cfg.auth.keys] == ["u"]
    tokens = {n.url: n.token for n in cfg.nodes}
    assert tokens == {
        "http://a:8000": "node-secret",
        "http://b:8000": "from-env-0000",
        "http://c:8000": None,
        "http://gpu:7070": "agent-token-0123456789",  # [auth] agent_token: the default of agents
        "http://gpu2:7070": "own-agent-token",
    }
    assert "node-secret" not in repr(cfg) and KEY not in repr(cfg) and "agent-token" not in repr(cfg)


@pytest.mark.parametrize(
    ("server", "words"),
    [
        ({"url": "http://a:1", "api_key": "has space"}, "printable ASCII"),
        ({"url": "http://a:1", "api_key": 12}, "expected a string"),
        ({"url": "http://a:1", "api_key": "x", "api_key_env": "Y"}, "not both"),
        ({"url": "http://a:1", "api_key_env": "MVLLM_UNSET_VAR_XYZ"}, "not set"),
    ],
)
def test_node_api_key_errors(server: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"servers": {"servers": [server]}}, Path("servers.toml"))
    assert words in str(info.value) and "servers.servers[0]" in str(info.value)
    assert "has space" not in str(info.value)  # a secret is never echoed


def test_reserved_key_name_and_unknown_auth_keys() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        load_auth({"keys": [{"name": "global", "key": KEY}]}, "servers.toml")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"auth": {"kyes_file": "k.toml"}}, Path("servers.toml"))
