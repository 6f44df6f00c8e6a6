"""Environment variables that override config keys of the router and the agent, read and
type-checked in one place. Precedence: command-line flag > environment > config file > default.

A `.env` file (python-dotenv's format) in the working directory and beside the config file fills in
variables that the real environment leaves unset, as vllm-server's `.env` did: MVLLM_* settings,
HF_TOKEN, HF_ENDPOINT, proxies (which then reach every engine).

An empty variable counts as unset; an invalid value is a ConfigError that names the variable.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from mvllm.common.logfiles import LEVELS
from mvllm.common.tomlconf import ConfigError


@dataclass(frozen=True)
class EnvVar:
    name: str
    key: str  # the config key (or command-line option) it stands for
    kind: str  # str, path, port, int, float, level
    help: str


ROUTER_ENV = (
    EnvVar("MVLLM_CONFIG", "config", "path", "servers.toml to use (as `--config`)"),
    EnvVar("MVLLM_HOST", "host", "str", "`[router] host`, the listen address"),
    EnvVar("MVLLM_PORT", "port", "port", "`[router] port`, the listen port"),
    EnvVar("MVLLM_LOG_LEVEL", "log_level", "level", "`[router] log_level`: debug, info, warning, error"),
    EnvVar("MVLLM_LOG_FILE", "log_file", "path", "`[router] log_file`"),
    EnvVar("MVLLM_LOG_MAX_BYTES", "log_max_bytes", "int", "`[router] log_max_bytes`"),
    EnvVar("MVLLM_LOG_BACKUPS", "log_backups", "int", "`[router] log_backups`"),
    EnvVar("MVLLM_LOG_RETENTION_DAYS", "log_retention_days", "float", "`[router] log_retention_days`"),
    EnvVar("MVLLM_REDIS_URL", "redis_url", "str", "`[cluster] redis_url`: the Redis several routers share"),
)

AGENT_ENV = (
    EnvVar("MVLLM_AGENT_CONFIG", "config", "path", "agent.toml to use (as `--config`)"),
    EnvVar("MVLLM_AGENT_HOST", "host", "str", "`host`, the listen address"),
    EnvVar("MVLLM_AGENT_PORT", "port", "port", "`port`, the listen port"),
    EnvVar("MVLLM_AGENT_TOKEN", "token", "str", "`token` (kept out of the engines' environment)"),
    EnvVar("MVLLM_LOG_LEVEL", "log_level", "level", "`log_level` (shared with the router)"),
    EnvVar("MVLLM_AGENT_LOG_DIR", "log_dir", "path", "`log_dir`, where engine logs go"),
    EnvVar("MVLLM_AGENT_LOG_FILE", "log_file", "path", "`log_file`, the agent's own log"),
    EnvVar("MVLLM_AGENT_LOG_MAX_BYTES", "log_max_bytes", "int", "`log_max_bytes`"),
    EnvVar("MVLLM_AGENT_LOG_BACKUPS", "log_backups", "int", "`log_backups`"),
    EnvVar("MVLLM_AGENT_ENGINE_LOG_MAX_BYTES", "engine_log_max_bytes", "int", "`engine_log_max_bytes`"),
    EnvVar("MVLLM_AGENT_LOG_RETENTION_DAYS", "log_retention_days", "float", "`log_retention_days`"),
)


def _error(var: EnvVar, problem: str) -> ConfigError:
    return ConfigError(f"environment variable {var.name}", None, problem)


def _value(var: EnvVar, raw: str) -> Any:
    if var.kind in ("str",):
        return raw
    if var.kind == "path":
        return Path(raw).expanduser()
    if var.kind == "level":
        if raw.lower() not in LEVELS:
            raise _error(var, f"expected one of {', '.join(LEVELS)}, got {raw!r}")
        return raw.lower()
    if var.kind in ("int", "port"):
        try:
            value = int(raw)
        except ValueError:
            raise _error(var, f"expected an integer, got {raw!r}") from None
        low, high = (1, 65535) if var.kind == "port" else (0, None)
        if value < low or (high is not None and value > high):
            raise _error(var, f"must be within {low}..{high}, got {value}" if high else f"must be >= {low}, got {value}")
        return value
    if var.kind == "float":
        try:
            number = float(raw)
        except ValueError:
            raise _error(var, f"expected a number, got {raw!r}") from None
        if number < 0:
            raise _error(var, f"must be >= 0, got {number}")
        return number
    raise AssertionError(var.kind)


def read_env(variables: tuple[EnvVar, ...], environ: Mapping[str, str]) -> dict[str, Any]:
    """{config key: typed value} of the variables set (non-empty) in `environ`."""
    out: dict[str, Any] = {}
    for var in variables:
        raw = environ.get(var.name, "").strip()
        if raw:
            out[var.key] = _value(var, raw)
    return out


DOTENV_NAME = ".env"


def load_dotenv(directory: Path, environ: MutableMapping[str, str]) -> Path | None:
    """Set the variables of `directory/.env` that `environ` lacks; returns the file if one was read.
    A variable already set (even to an empty string) wins: the real environment is the operator's
    latest word. Unreadable or malformed lines are python-dotenv's to skip, with its warning."""
    path = directory / DOTENV_NAME
    if not path.is_file():
        return None
    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read it: {exc}") from None
    for name, value in values.items():
        if value is not None and name not in environ:
            environ[name] = value
    return path


def load_dotenvs(config: Path | None, environ: MutableMapping[str, str]) -> list[Path]:
    """`.env` of the working directory, then the one beside `config` (when that is another
    directory); the first file read wins for a variable both set."""
    loaded: list[Path] = []
    cwd = Path.cwd()
    first = load_dotenv(cwd, environ)
    if first is not None:
        loaded.append(first)
    if config is not None:
        directory = config.expanduser().resolve().parent
        if directory != cwd.resolve():
            second = load_dotenv(directory, environ)
            if second is not None:
                loaded.append(second)
    return loaded
