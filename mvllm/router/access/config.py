"""Loading `[auth]` (from servers.toml) and the keys file into typed objects, with errors that
name the file, the key and the fix; secrets are checked, hashed and never echoed."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvllm.common.tomlconf import ConfigError, Section, load_toml
from mvllm.router.access.keys import ApiKey, KeyStore, digest_hint, hash_key, key_hint
from mvllm.router.access.limits import LimitSpec, QueueSpec, QuotaSpec

MIN_SECRET_CHARS = 16
# Where per-key usage (quota counters, runtime enable/disable) is kept, next to servers.toml.
DEFAULT_USAGE_FILE = "usage.json"
DEFAULT_MAX_QUEUED = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# "global" is the scope of the router-wide limits in LimitSet.counters() and /metrics.
RESERVED_NAMES = frozenset({"global"})
_GEN_HINT = "generate one with: python -c \"import secrets; print('sk-' + secrets.token_urlsafe(32))\""


@dataclass(frozen=True, repr=False)
class AuthConfig:
    """Everything `[auth]` and the keys file say. `agent_token` is a secret: kept for sending, never shown."""

    keys: tuple[ApiKey, ...] = ()
    protect_metrics: bool = False
    agent_token: str | None = None
    limits: LimitSpec = field(default_factory=LimitSpec)
    queue: QueueSpec = field(default_factory=QueueSpec)
    keys_file: Path | None = None  # absolute; watch it for hot reload
    usage_file: Path | None = None  # absolute; None: usage kept in memory only (router/access/usage_store.py)

    def key_store(self) -> KeyStore:
        return KeyStore(self.keys, protect_metrics=self.protect_metrics)

    def __repr__(self) -> str:
        return (
            f"AuthConfig(keys={[k.name for k in self.keys]!r}, protect_metrics={self.protect_metrics}, "
            f"agent_token={'<set>' if self.agent_token else None}, limits={self.limits!r}, "
            f"queue={self.queue!r}, keys_file={self.keys_file!r}, usage_file={self.usage_file!r})"
        )

    __str__ = __repr__


def load_auth(
    auth: Mapping[str, Any] | None,
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
) -> AuthConfig:
    """Read the `[auth]` table of servers.toml at `path` (None or {} when absent: open, no limits).

    `keys_file` is relative to the directory of `path`. `env` defaults to os.environ. Raises
    ConfigError. Plaintext keys are hashed and not kept; inline ones (`[[auth.keys]]`) stay in the
    caller's `auth` mapping, so the caller should drop the parsed TOML once loaded.
    """
    env = os.environ if env is None else env
    path = Path(path)
    if auth is None:
        return AuthConfig()
    s = Section(auth, path, "auth")
    protect_metrics = s.bool("protect_metrics", False)
    agent_token = _read_secret(s, "agent_token", "agent_token_env", env, required=False)
    limits, queue = _read_limits(s, "limits", allow_queue=True) if s.has("limits") else (None, QueueSpec())
    keys_file_name = s.str("keys_file")
    usage_file = _read_usage_file(s, path, env)
    inline_declared = s.has("keys")
    inline = s.raw("keys", [])
    s.check_unknown()

    seen = _Seen()
    keys: list[ApiKey] = parse_keys(inline, path, "auth.keys", env=env, seen=seen)
    keys_file: Path | None = None
    if keys_file_name is not None:
        if not keys_file_name.strip():
            raise s.error("keys_file", "is empty; give a path relative to this file, or remove the line")
        keys_file = (path.parent / keys_file_name).resolve()
        keys += load_keys_file(keys_file, env=env, seen=seen)
    if not keys and (keys_file is not None or inline_declared):
        # Fail closed: a keys file whose entries are all commented out must not turn auth off.
        where, what = (keys_file, "keys") if keys_file is not None else (path, "auth.keys")
        raise ConfigError(
            where,
            what,
            "no [[keys]] defined, which would leave the router open to anyone; add a key, "
            "or remove keys_file / auth.keys to run without auth on purpose",
        )
    return AuthConfig(
        keys=tuple(keys),
        protect_metrics=protect_metrics,
        agent_token=agent_token,
        limits=limits or LimitSpec(),
        queue=queue,
        keys_file=keys_file,
        usage_file=usage_file,
    )


def _read_usage_file(s: Section, path: Path, env: Mapping[str, str]) -> Path | None:
    """`usage_file`: a path relative to servers.toml, or false for memory only. The default,
    usage.json, goes to systemd's $STATE_DIRECTORY when it is set (the unit's /etc is read-only),
    else beside servers.toml."""
    if not s.has("usage_file"):
        # systemd may list several directories, colon-separated: the first is ours.
        state_dir = env.get("STATE_DIRECTORY", "").split(":")[0].strip()
        return (Path(state_dir or path.parent) / DEFAULT_USAGE_FILE).resolve()
    value = s.raw("usage_file", DEFAULT_USAGE_FILE)
    if value is False:
        return None
    if not isinstance(value, str) or not value.strip():
        raise s.error(
            "usage_file",
            f"expected a file name relative to this file (default {DEFAULT_USAGE_FILE!r}), or false to keep "
            f"per-key usage in memory only; got {value!r}",
        )
    return (path.parent / value).resolve()


def load_auth_from_file(servers_toml: str | Path, *, env: Mapping[str, str] | None = None) -> AuthConfig:
    """Read only `[auth]` of a servers.toml (the router's own loader checks the other tables)."""
    data = load_toml(servers_toml)
    return load_auth(data.get("auth"), servers_toml, env=env)


class _Seen:
    """Names and digests met so far, across servers.toml and the keys file, to report duplicates."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.digests: dict[bytes, str] = {}


def load_keys_file(path: str | Path, *, env: Mapping[str, str] | None = None, seen: _Seen | None = None) -> list[ApiKey]:
    """The `[[keys]]` of a keys file (nothing else is allowed in it)."""
    env = os.environ if env is None else env
    data = load_toml(path)
    s = Section(data, path, "")
    entries = s.raw("keys", [])
    s.check_unknown()
    return parse_keys(entries, path, "keys", env=env, seen=seen)


def parse_keys(
    entries: Any,
    path: str | Path,
    prefix: str,
    *,
    env: Mapping[str, str] | None = None,
    seen: _Seen | None = None,
) -> list[ApiKey]:
    """`[[keys]]` entries (a list of tables) into ApiKeys; `prefix` names the array in errors."""
    env = os.environ if env is None else env
    seen = seen if seen is not None else _Seen()
    if not isinstance(entries, list):
        raise ConfigError(path, prefix, "expected an array of tables: write each key as [[keys]] with name = ...")
    keys = []
    for i, entry in enumerate(entries):
        keys.append(_parse_key(entry, path, f"{prefix}[{i}]", env, seen))
    return keys


def _parse_key(entry: Any, path: str | Path, where: str, env: Mapping[str, str], seen: _Seen) -> ApiKey:
    s = Section(entry, path, where)
    name = s.str("name", required=True)
    assert name is not None
    if not _NAME_RE.match(name):
        raise s.error(
            "name",
            f"{name!r} is not a valid key name: use 1-64 of letters, digits and _ . @ : - "
            "(names appear in metrics labels and log lines)",
        )
    if name in RESERVED_NAMES:
        raise s.error("name", f"'{name}' is reserved (it names the router's global limits in counters); pick another")
    if name in seen.names:
        raise s.error("name", f"'{name}' is already used by {seen.names[name]}; key names must be unique")

    sources = [f for f in ("key", "key_sha256", "key_env") if s.has(f)]
    if len(sources) != 1:
        raise s.error(
            "key",
            f"key '{name}' needs exactly one of key, key_sha256 or key_env"
            + (f" (found {', '.join(sources)})" if sources else ""),
        )
    if sources[0] == "key_sha256":
        value = s.raw("key_sha256")
        if not isinstance(value, str) or not _HEX64_RE.match(value):
            raise s.error("key_sha256", "expected 64 hex digits, the SHA-256 of the key (printf %s KEY | sha256sum)")
        digest = bytes.fromhex(value)
        hint = digest_hint(digest)
    else:
        secret = _read_secret(s, "key", "key_env", env, required=True)
        assert secret is not None
        digest = hash_key(secret)
        hint = key_hint(secret)
        # A str cannot be wiped; holding no reference is what Python allows. The parsed TOML this
        # entry came from still holds it until its owner drops it (load_keys_file drops its own).
        del secret
    if digest in seen.digests:
        raise s.error(
            sources[0],
            f"key '{name}' is the same key as {seen.digests[digest]}; each key must be unique, "
            "so that a request maps to one name, role and set of limits",
        )

    enabled = s.bool("enabled", True)
    role = s.choice("role", "user", ("user", "admin"))
    models = s.str_list("models", ["*"])
    assert models is not None
    for pattern in models:
        if not pattern.strip():
            raise s.error("models", "contains an empty pattern; use \"*\" for every model")
    limits = None
    if s.has("limits"):
        limits, _ = _read_limits(s, "limits", allow_queue=False)
    quota = None
    if s.has("quota"):
        quota = _read_quota(s.section("quota"))
    s.check_unknown()

    seen.names[name] = where
    seen.digests[digest] = f"{where} ('{name}')"
    return ApiKey(
        name=name,
        digest=digest,
        hint=hint,
        enabled=enabled,
        role=role,
        models=tuple(models),
        limits=limits,
        quota=quota,
    )


def _read_secret(
    s: Section, field: str, env_field: str, env: Mapping[str, str], *, required: bool
) -> str | None:
    """A secret given inline (`field`) or by environment variable name (`env_field`); never echoed."""
    if s.has(field) and s.has(env_field):
        raise s.error(field, f"give either {field} or {env_field}, not both")
    if s.has(env_field):
        var = s.str(env_field)
        assert var is not None
        if not _ENV_NAME_RE.match(var):
            raise s.error(env_field, f"{var!r} is not an environment variable name")
        value = env.get(var)
        if value is None:
            raise s.error(env_field, f"environment variable {var} is not set; export it before starting mvllm")
        origin = f"the value of ${var}"
        key = env_field
    elif s.has(field):
        value = s.raw(field)
        if not isinstance(value, str):
            # Type only: the value itself may be a secret, so it is not shown.
            raise s.error(field, f"expected a string, got a {type(value).__name__}")
        origin = "the value"
        key = field
    else:
        if required:
            raise s.error(field, "required")
        return None
    if not value or not all("!" <= c <= "~" for c in value):
        raise s.error(key, f"{origin} must be printable ASCII without spaces (it travels in an HTTP header as is)")
    if len(value) < MIN_SECRET_CHARS:
        raise s.error(
            key,
            f"{origin} is too short ({len(value)} characters, at least {MIN_SECRET_CHARS}): a short key "
            "can be guessed by trying keys against the router, and recovered from its SHA-256 by brute "
            f"force if the hash leaks; {_GEN_HINT}",
        )
    return value


def _read_limits(parent: Section, name: str, *, allow_queue: bool) -> tuple[LimitSpec | None, QueueSpec]:
    s = parent.section(name)
    rps = s.float("requests_per_second", None)
    if rps is not None and rps <= 0:
        raise s.error("requests_per_second", f"must be > 0, got {rps}; remove the line for no limit")
    burst = s.int("burst", None, min=1)
    if burst is not None and rps is None:
        raise s.error("burst", "needs requests_per_second (burst is the size of its token bucket)")
    max_concurrent = s.int("max_concurrent", None, min=1)
    tpm = s.int("tokens_per_minute", None, min=1)
    queue = QueueSpec()
    if allow_queue:
        timeout = s.float("queue_timeout", 0.0, min=0.0, max=3600.0)
        max_queued = s.int("max_queued", None, min=1)
        assert timeout is not None
        if max_queued is not None and timeout == 0:
            raise s.error("max_queued", "needs queue_timeout > 0 (how long a request may wait)")
        queue = QueueSpec(timeout=timeout, max_queued=max_queued or (DEFAULT_MAX_QUEUED if timeout > 0 else 0))
    else:
        for q in ("queue_timeout", "max_queued"):
            if s.has(q):
                raise s.error(q, "the wait queue is set for the whole router, in [auth.limits]")
    s.check_unknown()
    spec = LimitSpec(requests_per_second=rps, burst=burst, max_concurrent=max_concurrent, tokens_per_minute=tpm)
    return (None if spec.empty else spec), queue


def _read_quota(s: Section) -> QuotaSpec | None:
    total = s.int("requests_total", None, min=1)
    per_day = s.int("requests_per_day", None, min=1)
    s.check_unknown()
    if total is None and per_day is None:
        return None
    return QuotaSpec(requests_total=total, requests_per_day=per_day)


def read_node_api_key(s: Section, env: Mapping[str, str] | None = None) -> str | None:
    """A static node's own key (`api_key` or `api_key_env` in its [servers] entry), for a vLLM
    started with `--api-key`. Any printable ASCII without spaces: the router does not choose it."""
    env = os.environ if env is None else env
    if s.has("api_key") and s.has("api_key_env"):
        raise s.error("api_key", "give either api_key or api_key_env, not both")
    if s.has("api_key_env"):
        var = s.str("api_key_env")
        assert var is not None
        if not _ENV_NAME_RE.match(var):
            raise s.error("api_key_env", f"{var!r} is not an environment variable name")
        value = env.get(var)
        if value is None:
            raise s.error("api_key_env", f"environment variable {var} is not set; export it before starting mvllm")
        key, origin = "api_key_env", f"the value of ${var}"
    elif s.has("api_key"):
        value = s.raw("api_key")
        if not isinstance(value, str):
            raise s.error("api_key", f"expected a string, got a {type(value).__name__}")
        key, origin = "api_key", "the value"
    else:
        return None
    if not value or not all("!" <= c <= "~" for c in value):
        raise s.error(key, f"{origin} must be printable ASCII without spaces (it travels in an HTTP header as is)")
    return value
