"""Loading `[auth]` and the keys file: typed results, and errors naming file, key and fix."""

import hashlib
from pathlib import Path

import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.access.config import AuthConfig, load_auth, load_auth_from_file, load_keys_file
from mvllm.router.access.keys import authorize
from mvllm.router.access.limits import LimitSpec, QueueSpec, QuotaSpec

SECRET_A = "sk-team-a-0123456789abcdef"
SECRET_B = "sk-team-b-fedcba9876543210"
SECRET_ENV = "sk-from-env-00112233445566"
AGENT_TOKEN = "agent-token-aabbccddeeff0011"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def test_full_config(tmp_path):
    servers = write(
        tmp_path / "servers.toml",
        """
[auth]
keys_file = "secrets/keys.toml"
protect_metrics = true
agent_token_env = "MVLLM_AGENT_TOKEN"

[auth.limits]
requests_per_second = 50
burst = 100
max_concurrent = 64
tokens_per_minute = 200000
queue_timeout = 2.5

[[servers]]
name = "ignored here"
""",
    )
    write(
        tmp_path / "secrets" / "keys.toml",
        f"""
[[keys]]
name = "team-a"
key = "{SECRET_A}"
models = ["llama-*"]
limits = {{ requests_per_second = 5, burst = 10, max_concurrent = 4, tokens_per_minute = 10000 }}
quota = {{ requests_total = 10000, requests_per_day = 1000 }}

[[keys]]
name = "ops"
key_sha256 = "{sha(SECRET_B).upper()}"
role = "admin"

[[keys]]
name = "ci"
key_env = "CI_KEY"
enabled = false
""",
    )
    env = {"MVLLM_AGENT_TOKEN": AGENT_TOKEN, "CI_KEY": SECRET_ENV}
    cfg = load_auth_from_file(servers, env=env)
    assert cfg.protect_metrics is True
    assert cfg.agent_token == AGENT_TOKEN
    assert cfg.limits == LimitSpec(requests_per_second=50.0, burst=100, max_concurrent=64, tokens_per_minute=200000)
    assert cfg.queue == QueueSpec(timeout=2.5, max_queued=256)
    assert cfg.keys_file == (tmp_path / "secrets" / "keys.toml").resolve()
    a, ops, ci = cfg.keys
    assert (a.name, a.role, a.enabled, a.models, a.hint) == ("team-a", "user", True, ("llama-*",), "sk-te…")
    assert a.limits == LimitSpec(requests_per_second=5.0, burst=10, max_concurrent=4, tokens_per_minute=10000)
    assert a.quota == QuotaSpec(requests_total=10000, requests_per_day=1000)
    assert (ops.role, ops.models, ops.limits, ops.quota) == ("admin", ("*",), None, None)
    assert ops.hint == "sha256:" + sha(SECRET_B)[:8] + "…"
    assert ci.enabled is False

    store = cfg.key_store()
    assert store.protect_metrics
    assert store.lookup(SECRET_A) is a
    assert store.lookup(SECRET_B) is ops
    assert store.lookup(SECRET_ENV) is ci
    assert authorize(store, {"Authorization": f"Bearer {SECRET_B}"}, "/admin/nodes").allowed
    assert authorize(store, {"Authorization": f"Bearer {SECRET_ENV}"}, "/v1/models").status == 401

    text = repr(cfg) + str(cfg) + repr(store) + "".join(map(repr, cfg.keys))
    for secret in (SECRET_A, SECRET_B, SECRET_ENV, AGENT_TOKEN):
        assert secret not in text
    assert "agent_token=<set>" in text


def test_inline_keys_and_no_auth(tmp_path):
    path = tmp_path / "servers.toml"
    assert load_auth(None, path) == AuthConfig()
    assert load_auth({}, path).key_store().open
    cfg = load_auth({"keys": [{"name": "solo", "key": SECRET_A}], "limits": {"max_concurrent": 3}}, path)
    assert [k.name for k in cfg.keys] == ["solo"]
    assert cfg.limits == LimitSpec(max_concurrent=3)
    assert cfg.keys_file is None and cfg.agent_token is None
    # Limits alone: open auth, global limits still apply.
    cfg = load_auth({"limits": {"requests_per_second": 10}}, path)
    assert cfg.key_store().open and cfg.limits.requests_per_second == 10


def error_of(auth, tmp_path, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_auth(auth, tmp_path / "servers.toml", env=env or {})
    return info.value


def test_short_key_is_an_error_that_says_why(tmp_path):
    err = error_of({"keys": [{"name": "a", "key": "sk-short-123"}]}, tmp_path)
    assert err.key == "auth.keys[0].key"
    assert err.path == str(tmp_path / "servers.toml")
    assert "too short (12 characters, at least 16)" in str(err)
    assert "brute force" in str(err) and "secrets.token_urlsafe" in str(err)
    assert "sk-short-123" not in str(err)
    err = error_of({"keys": [{"name": "a", "key_env": "K"}]}, tmp_path, env={"K": "tiny-secret"})
    assert err.key == "auth.keys[0].key_env" and "$K is too short" in str(err)
    assert "tiny-secret" not in str(err)
    err = error_of({"agent_token": "abc"}, tmp_path)
    assert err.key == "auth.agent_token" and "too short" in str(err)


@pytest.mark.parametrize(
    ("auth", "key", "words"),
    [
        ({"keys": [{"name": "a", "key": SECRET_A}, {"name": "a", "key": SECRET_B}]}, "auth.keys[1].name", "already used by auth.keys[0]"),
        ({"keys": [{"name": "a", "key": SECRET_A}, {"name": "b", "key_sha256": sha(SECRET_A)}]}, "auth.keys[1].key_sha256", "same key as auth.keys[0] ('a')"),
        ({"keys": [{"name": "a"}]}, "auth.keys[0].key", "exactly one of key, key_sha256 or key_env"),
        ({"keys": [{"name": "a", "key": SECRET_A, "key_sha256": sha(SECRET_B)}]}, "auth.keys[0].key", "found key, key_sha256"),
        ({"keys": [{"name": "a", "key_sha256": "abc"}]}, "auth.keys[0].key_sha256", "64 hex digits"),
        ({"keys": [{"name": "a", "key_env": "NOPE"}]}, "auth.keys[0].key_env", "NOPE is not set"),
        ({"keys": [{"key": SECRET_A}]}, "auth.keys[0].name", "required"),
        ({"keys": [{"name": "bad name", "key": SECRET_A}]}, "auth.keys[0].name", "not a valid key name"),
        ({"keys": [{"name": "a", "key": SECRET_A, "role": "root"}]}, "auth.keys[0].role", "'user', 'admin'"),
        ({"keys": [{"name": "a", "key": SECRET_A, "modles": ["x"]}]}, "auth.keys[0].modles", "unknown key"),
        ({"keys": [{"name": "a", "key": SECRET_A, "models": [""]}]}, "auth.keys[0].models", "empty pattern"),
        ({"keys": [{"name": "a", "key": "sk-has space-0123456789"}]}, "auth.keys[0].key", "printable ASCII"),
        ({"keys": [{"name": "a", "key": SECRET_A, "limits": {"burst": 3}}]}, "auth.keys[0].limits.burst", "needs requests_per_second"),
        ({"keys": [{"name": "a", "key": SECRET_A, "limits": {"queue_timeout": 3}}]}, "auth.keys[0].limits.queue_timeout", "[auth.limits]"),
        ({"keys": [{"name": "a", "key": SECRET_A, "limits": {"requests_per_second": 0}}]}, "auth.keys[0].limits.requests_per_second", "must be > 0"),
        ({"keys": [{"name": "a", "key": SECRET_A, "quota": {"requests_per_day": 0}}]}, "auth.keys[0].quota.requests_per_day", ">= 1"),
        ({"keys": {"name": "a"}}, "auth.keys", "array of tables"),
        ({"keys": []}, "auth.keys", "open to anyone"),
        ({"limits": {"max_queued": 5}}, "auth.limits.max_queued", "needs queue_timeout"),
        ({"protect_metrics": "yes"}, "auth.protect_metrics", "true or false"),
        ({"agent_token": AGENT_TOKEN, "agent_token_env": "X"}, "auth.agent_token", "not both"),
        ({"keys_file": ""}, "auth.keys_file", "is empty"),
        ({"key_file": "keys.toml"}, "auth.key_file", "unknown key"),
    ],
)
def test_config_errors_name_the_key(tmp_path, auth, key, words):
    err = error_of(auth, tmp_path)
    assert err.key == key
    assert words in str(err)
    for secret in (SECRET_A, SECRET_B, AGENT_TOKEN):
        assert secret not in str(err)


def test_non_string_secret_is_not_echoed(tmp_path):
    err = error_of({"keys": [{"name": "a", "key": [SECRET_A]}]}, tmp_path)
    assert err.key == "auth.keys[0].key" and "got a list" in str(err)
    assert SECRET_A not in str(err)


def test_keys_file_errors(tmp_path):
    servers = tmp_path / "servers.toml"
    with pytest.raises(ConfigError) as info:
        load_auth({"keys_file": "missing.toml"}, servers, env={})
    assert info.value.path == str((tmp_path / "missing.toml").resolve())
    assert "file not found" in str(info.value)

    # A keys file with every key commented out must not open the router.
    write(tmp_path / "keys.toml", '# [[keys]]\n# name = "a"\n')
    with pytest.raises(ConfigError, match="open to anyone") as info:
        load_auth({"keys_file": "keys.toml"}, servers, env={})
    assert info.value.path.endswith("keys.toml")

    write(tmp_path / "keys.toml", f'[[keys]]\nname = "a"\nkey = "{SECRET_A}"\n\n[auth]\nx = 1\n')
    with pytest.raises(ConfigError, match="unknown key") as info:
        load_keys_file(tmp_path / "keys.toml", env={})
    assert info.value.key == "auth"

    # A duplicate across servers.toml and the keys file is caught too, naming where the first is.
    write(tmp_path / "keys.toml", f'[[keys]]\nname = "a"\nkey = "{SECRET_B}"\n')
    with pytest.raises(ConfigError, match=r"already used by auth.keys\[0\]") as info:
        load_auth({"keys_file": "keys.toml", "keys": [{"name": "a", "key": SECRET_A}]}, servers, env={})
    assert info.value.key == "keys[0].name" and info.value.path.endswith("keys.toml")


def test_example_keys_file_loads(tmp_path):
    example = Path(__file__).resolve().parents[2] / "keys.example.toml"
    env = {"MVLLM_KEY_OPS": "sk-ops-" + "1" * 25, "MVLLM_KEY_CI": "sk-ci-" + "0" * 26}
    keys = load_keys_file(example, env=env)
    assert {k.role for k in keys} == {"user", "admin"}
    assert all(len(k.digest) == 32 for k in keys)
