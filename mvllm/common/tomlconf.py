"""TOML loading with errors that name the file, the key and what was expected; `range_problem`,
the one wording of a number out of its bounds (config files, command-line flags, environment)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file that cannot be used; the message is meant for the operator, as is."""

    def __init__(self, path: str | Path | None, key: str | None, problem: str) -> None:
        where = str(path) if path else "<config>"
        if key:
            where += f": key '{key}'"
        super().__init__(f"{where}: {problem}")
        self.path = str(path) if path else None
        self.key = key
        self.problem = problem


def range_problem(
    value: float,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    within: bool = False,
    max_name: str | None = None,
    shown: object = None,
) -> str | None:
    """What is wrong with `value` against its bounds, None when nothing: "must be within [MIN, MAX]"
    (`within`), "must be > ABOVE", "must be >= MIN" or "must be <= MAX" (`max_name` says what MAX
    is: "must be <= request_timeout (300.0)"), then ", got V" (`shown`: V as the user wrote it).
    NaN fails `within` and `above` (their comparisons are false) and passes a plain min or max."""
    got = value if shown is None else shown
    if within and min is not None and max is not None:
        if not min <= value <= max:
            return f"must be within [{min}, {max}], got {got}"
        return None
    if above is not None and not value > above:
        return f"must be > {above}, got {got}"
    if min is not None and value < min:
        return f"must be >= {min}, got {got}"
    if max is not None and value > max:
        bound = f"{max_name} ({max})" if max_name else f"{max}"
        return f"must be <= {bound}, got {got}"
    return None


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not valid UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"invalid TOML: {exc}") from None


class Section:
    """Typed reads from one table of a TOML document, each failure naming its dotted key.

    Unknown keys are reported too, since a misspelt option silently ignored is the commonest
    config bug in the tools we replace.
    """

    def __init__(self, data: Any, path: str | Path | None, prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(path, prefix or None, f"expected a table, got {type(data).__name__}")
        self.data = data
        self.path = path
        self.prefix = prefix
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        self._seen.add(name)
        return self.data.get(name, default)

    def section(self, name: str, *, required: bool = False) -> Section:
        self._seen.add(name)
        if name not in self.data:
            if required:
                raise self.error(name, "missing table")
            return Section({}, self.path, self.key(name))
        return Section(self.data[name], self.path, self.key(name))

    def str(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(name, default)
        if value is None:
            if required:
                raise self.error(name, "required, expected a string")
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def int(self, name: str, default: int | None, *, min: int | None = None, max: int | None = None) -> int | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        self._check_range(name, value, min, max)
        return value

    def float(
        self, name: str, default: float | None, *, min: float | None = None, max: float | None = None
    ) -> float | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"expected a number, got {value!r}")
        self._check_range(name, value, min, max)
        return float(value)

    def str_list(self, name: str, default: list[str] | None = None) -> list[str] | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {value!r}")
        return list(value)

    def choice(self, name: str, default: Any, choices: tuple) -> Any:
        value = self.raw(name, default)
        if value not in choices:
            raise self.error(name, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            raise self.error(unknown[0], "unknown key (misspelt? see the example config for the valid keys)")

    def _check_range(self, name: str, value: float, lo: float | None, hi: float | None) -> None:
        problem = range_problem(value, min=lo, max=hi)
        if problem is not None:
            raise self.error(name, problem)
