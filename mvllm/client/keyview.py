"""The API keys as the operator sees them, from the router's /admin/keys entries: one row of texts
per key, shared by `mvllm keys` and the dashboard's keys panel. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY_COLUMNS = ("name", "role", "enabled", "today", "total", "tokens", "limits", "models")


def short_num(n: float) -> str:
    """1234 → 1234, 12345 → 12.3k, 1234567 → 1.23M: short enough for a table cell."""
    if n < 10_000:
        return str(int(n))
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.2f}M"


def enabled_text(entry: Mapping[str, Any]) -> str:
    """yes / no, with "(admin)" when a runtime enable/disable overrides the keys file."""
    text = "yes" if entry.get("enabled") else "no"
    return text + " (admin)" if entry.get("override") else text


def used_text(used: int, cap: int | None) -> str:
    return f"{used}/{cap}" if cap is not None else str(used)


def limits_text(entry: Mapping[str, Any]) -> str:
    """The key's rate limits, compactly: `5 rps (burst 10), 4 conc, 10000 tpm`, or `-`."""
    limits = entry.get("limits") or {}
    parts = []
    if limits.get("requests_per_second") is not None:
        burst = f" (burst {limits['burst']})" if limits.get("burst") is not None else ""
        parts.append(f"{limits['requests_per_second']:g} rps{burst}")
    if limits.get("max_concurrent") is not None:
        parts.append(f"{limits['max_concurrent']} conc")
    if limits.get("tokens_per_minute") is not None:
        parts.append(f"{limits['tokens_per_minute']} tpm")
    return ", ".join(parts) or "-"


def key_row(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """One key's cells, in KEY_COLUMNS order: today and total as `used/quota` when a quota is set."""
    usage = entry.get("usage") or {}
    quota = entry.get("quota") or {}
    models = entry.get("models") or []
    return (
        str(entry.get("name", "?")),
        str(entry.get("role", "?")),
        enabled_text(entry),
        used_text(int(usage.get("requests_today", 0)), quota.get("requests_per_day")),
        used_text(int(usage.get("requests_total", 0)), quota.get("requests_total")),
        short_num(int(usage.get("tokens", 0))),
        limits_text(entry),
        "*" if models == ["*"] else (", ".join(models) or "none"),
    )
