"""Per-key state that outlives a restart, as pure objects: the usage file's document (quota
counters, tokens, denials, runtime enable/disable) with its JSON codec, and the policy of runtime
overrides of a key's `enabled`. The file I/O and the save loop are in usage_store.py.

The usage file (`[auth] usage_file`, default usage.json next to servers.toml), version 1:

    {"version": 1, "saved_at": 1718000000.0,
     "keys": {"team-a": {"requests_total": 120, "requests_today": 7, "day": "2025-06-10",
                         "tokens": 48000, "denied": {"requests_per_day": 2},
                         "override": {"enabled": false, "key": "1a2b3c4d5e6f7a8b",
                                      "file_enabled": true, "at": 1718000000.0}}}}

`day` is the UTC date `requests_today` counts for (a later day reads as 0). `override.key` is a
fingerprint of the key's SHA-256 (never the key, nor its hash): it tells whether the secret under
that name is still the one the override was set on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mvllm.router.access.keys import ApiKey
from mvllm.router.access.limits import LIMIT_NAMES, SECONDS_PER_DAY, KeyUsage

USAGE_FILE_VERSION = 1
_EPOCH = dt.date(1970, 1, 1)


def key_fingerprint(key: ApiKey) -> str:
    """16 hex digits derived from the key's SHA-256: same secret, same fingerprint; reveals nothing."""
    return hashlib.sha256(b"mvllm-usage-file:" + key.digest).hexdigest()[:16]


def day_to_date(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


def date_to_day(text: str) -> int:
    return (dt.date.fromisoformat(text) - _EPOCH).days


def utc_day(wall: float) -> int:
    return int(wall // SECONDS_PER_DAY)


@dataclass(frozen=True)
class KeyOverride:
    """An admin's enable/disable of a key at run time, and what the key was when it was set."""

    enabled: bool
    fingerprint: str  # key_fingerprint() of the key it was set on
    file_enabled: bool  # the key's `enabled` in the keys file then
    at: float  # wall-clock time it was set

    def holds_for(self, key: ApiKey) -> bool:
        """Still in force for `key` (its entry as the keys file has it now)? Not once the secret
        under that name changed, nor once the file's own `enabled` for it changed: either is a
        newer decision by whoever edits the file, and the file wins."""
        return self.fingerprint == key_fingerprint(key) and self.file_enabled == key.enabled


class KeyOverrides:
    """Runtime overrides by key name. Pure: the caller passes the keys as the file has them."""

    def __init__(self) -> None:
        self._by_name: dict[str, KeyOverride] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> KeyOverride | None:
        return self._by_name.get(name)

    def items(self) -> list[tuple[str, KeyOverride]]:
        return list(self._by_name.items())

    def set(self, key: ApiKey, enabled: bool, at: float) -> KeyOverride | None:
        """`key` (the file's entry) enabled or not from now on; setting what the file says clears it."""
        if enabled == key.enabled:
            self._by_name.pop(key.name, None)
            return None
        override = KeyOverride(enabled, key_fingerprint(key), key.enabled, at)
        self._by_name[key.name] = override
        return override

    def put(self, name: str, override: KeyOverride) -> None:
        """One read back from the usage file (`reconcile` then checks it against the keys)."""
        self._by_name[name] = override

    def reconcile(self, keys: Iterable[ApiKey]) -> list[str]:
        """Drop the overrides whose key is gone or changed (see KeyOverride.holds_for); their names."""
        by_name = {k.name: k for k in keys}
        dropped = [n for n, o in self._by_name.items() if n not in by_name or not o.holds_for(by_name[n])]
        for name in dropped:
            del self._by_name[name]
        return dropped

    def apply(self, keys: Iterable[ApiKey]) -> tuple[ApiKey, ...]:
        """The keys as they are in force: the file's, with the overrides' `enabled`."""
        out = []
        for key in keys:
            override = self._by_name.get(key.name)
            if override is not None and override.holds_for(key):
                key = replace(key, enabled=override.enabled)
            out.append(key)
        return tuple(out)


@dataclass(frozen=True)
class UsageDoc:
    """The usage file's content: per key name, its usage and its runtime override (if any)."""

    usage: Mapping[str, KeyUsage] = field(default_factory=dict)
    overrides: Mapping[str, KeyOverride] = field(default_factory=dict)
    saved_at: float | None = None

    def same_state(self, other: UsageDoc | None) -> bool:
        """Equal but for when it was saved (what decides whether a save is needed)."""
        return other is not None and (self.usage, self.overrides) == (other.usage, other.overrides)


def encode_usage(doc: UsageDoc) -> bytes:
    keys: dict[str, dict[str, Any]] = {}
    for name in sorted(set(doc.usage) | set(doc.overrides)):
        entry: dict[str, Any] = {}
        u = doc.usage.get(name)
        if u is not None:
            entry.update(
                requests_total=u.requests_total,
                requests_today=u.requests_today,
                day=day_to_date(u.day) if u.day is not None else None,
                tokens=u.tokens,
                denied=dict(sorted(u.denied.items())),
            )
        o = doc.overrides.get(name)
        if o is not None:
            entry["override"] = {"enabled": o.enabled, "key": o.fingerprint, "file_enabled": o.file_enabled, "at": o.at}
        keys[name] = entry
    out = {"version": USAGE_FILE_VERSION, "saved_at": doc.saved_at, "keys": keys}
    return (json.dumps(out, indent=1) + "\n").encode()


class UsageFileError(ValueError):
    """The usage file is not one this version can read (the message says what is wrong)."""


def _count(entry: Mapping[str, Any], field_name: str, where: str) -> int:
    value = entry.get(field_name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageFileError(f"{where}.{field_name}: expected a whole number >= 0, got {value!r}")
    return value


def decode_usage(data: bytes) -> UsageDoc:
    """Parse a usage file; raises UsageFileError naming the entry and field that is wrong."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise UsageFileError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise UsageFileError("expected a JSON object")
    if doc.get("version") != USAGE_FILE_VERSION:
        raise UsageFileError(f"version {doc.get('version')!r} is not {USAGE_FILE_VERSION} (written by another mvllm?)")
    keys = doc.get("keys", {})
    if not isinstance(keys, dict):
        raise UsageFileError("keys: expected an object of key name -> usage")
    saved_at = doc.get("saved_at")
    if saved_at is not None and (not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool) or not math.isfinite(saved_at)):
        raise UsageFileError(f"saved_at: expected a time, got {saved_at!r}")
    usage: dict[str, KeyUsage] = {}
    overrides: dict[str, KeyOverride] = {}
    for name, entry in keys.items():
        where = f"keys.{name}"
        if not isinstance(entry, dict):
            raise UsageFileError(f"{where}: expected an object")
        if "requests_total" in entry:
            day = entry.get("day")
            try:
                day_n = date_to_day(day) if day is not None else None
            except (TypeError, ValueError):
                raise UsageFileError(f"{where}.day: expected a date like 2025-06-10, got {day!r}") from None
            denied_raw = entry.get("denied", {})
            if not isinstance(denied_raw, dict):
                raise UsageFileError(f"{where}.denied: expected an object of limit name -> count")
            denied = {k: _count(denied_raw, k, f"{where}.denied") for k in denied_raw if k in LIMIT_NAMES}
            usage[name] = KeyUsage(
                requests_total=_count(entry, "requests_total", where),
                requests_today=_count(entry, "requests_today", where),
                day=day_n,
                tokens=_count(entry, "tokens", where),
                denied=denied,
            )
        o = entry.get("override")
        if o is not None:
            if not (
                isinstance(o, dict)
                and isinstance(o.get("enabled"), bool)
                and isinstance(o.get("file_enabled"), bool)
                and isinstance(o.get("key"), str)
                and isinstance(o.get("at", 0), (int, float))
            ):
                raise UsageFileError(f"{where}.override: expected {{enabled, key, file_enabled, at}}, got {o!r}")
            overrides[name] = KeyOverride(o["enabled"], o["key"], o["file_enabled"], float(o.get("at", 0)))
    return UsageDoc(usage, overrides, float(saved_at) if saved_at is not None else None)
