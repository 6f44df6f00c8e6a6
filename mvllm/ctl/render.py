"""Plain-text tables of the fleet for the CLI (`mvllm ps`, `mvllm status`). Pure: strings in, text out."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from mvllm.client.fleet import FleetView, fmt_bytes, fmt_num, fmt_pct


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [c.ljust(widths[i]) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _join(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "-"


def nodes_table(fleet: FleetView) -> str:
    rows = []
    for n in fleet.nodes:
        state = n.state_text + (f" ({n.drained_by})" if n.draining and n.drained_by and not n.removed else "")
        load = f"{fmt_num(n.running, n.stale)}/{fmt_num(n.waiting, n.stale)}/{fmt_num(n.capacity)}"
        score = "-" if n.score is None else f"{n.score:.2f}" + ("?" if n.stale else "")
        kv = fmt_pct(n.kv_cache_usage, n.stale).replace("–", "-")
        rows.append([n.name, n.kind, state, n.breaker.replace("_", "-"), load, score, kv, str(n.in_flight), _join(n.models)])
    return table(["NODE", "KIND", "STATE", "BREAKER", "RUN/WAIT/CAP", "SCORE", "KV%", "IN-FLIGHT", "MODELS"], rows)


def models_table(fleet: FleetView) -> str:
    # A FAILED column only while some model failed: a failed engine serves nothing, so it is not awake.
    any_failed = any(m.failed for m in fleet.models)
    rows = []
    for m in fleet.models:
        awake = [
            *(f"{s} (released)" if s in m.released else s for s in m.awake),
            *(f"{s} ({m.loading_text(s)})" for s in m.starting),
            *(f"{s} (unloading)" for s in m.stopping),
        ]
        failed = [_join(m.failed)] if any_failed else []
        rows.append(
            [m.name, _join(awake), _join(m.asleep), *failed, _join(m.loadable), m.replicas_text, fmt_num(m.running), fmt_num(m.queue)]
        )
    headers = ["MODEL", "AWAKE", "ASLEEP", *(["FAILED"] if any_failed else []), "LOADABLE", "REPLICAS", "RUNNING", "QUEUE"]
    return table(headers, rows)


def gpus_table(fleet: FleetView) -> str:
    rows = []
    for g in fleet.gpus:
        frac = g.memory_fraction
        mem = f"{fmt_bytes(g.memory_used)}/{fmt_bytes(g.memory_total)}" + (f" ({frac * 100:.0f}%)" if frac is not None else "")
        util = "-" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
        temp = "-" if g.temperature_c is None else f"{g.temperature_c:.0f}C"
        rows.append([g.node, str(g.index), g.name, mem, util, temp])
    return table(["NODE", "GPU", "NAME", "MEMORY", "UTIL", "TEMP"], rows)


def ps_text(fleet: FleetView) -> str:
    parts = [nodes_table(fleet) if fleet.nodes else "no nodes configured"]
    if fleet.models:
        parts.append(models_table(fleet))
    if fleet.gpus:
        parts.append(gpus_table(fleet))
    stale = [n for n in fleet.nodes if n.stale and not n.removed]
    if stale:
        parts.append("\n".join(f"? {n.name}: stale data ({n.stale_reason})" for n in stale))
    return "\n\n".join(parts)


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def status_text(url: str, health: Mapping[str, Any], fleet: FleetView | None) -> str:
    lines = [f"router   {url}  {health.get('status', '?')}"]
    if fleet is None:
        lines.append(f"nodes    {health.get('healthy_nodes', '?')}/{health.get('nodes', '?')} healthy")
        lines.append(f"models   {health.get('models', '?')}")
        return "\n".join(lines)
    r = fleet.router
    lines[0] += f"  (mvllm {r.get('version', '?')}, up {_uptime(r.get('uptime_s'))}, policy {r.get('policy', '?')})"
    t = fleet.totals
    extra = [f"{t.draining} draining"] if t.draining else []
    if t.stale:
        extra.append(f"{t.stale} stale")
    lines.append(f"nodes    {t.nodes_up}/{t.nodes_total} up" + (f" ({', '.join(extra)})" if extra else ""))
    lines.append(f"models   {len(fleet.models)}")
    lines.append(f"load     {t.in_flight} in flight, running {fmt_num(t.running)}, waiting {fmt_num(t.waiting)}, capacity {t.capacity}")
    config = r.get("config")
    lines.append(f"config   {config or '(none: demo or built-in)'}")
    last = r.get("last_reload")
    if isinstance(last, Mapping):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("at") or 0)))
        result = "applied" if last.get("ok") else "REJECTED"
        lines.append(f"reload   {when} {result}: {last.get('message', '')}")
    return "\n".join(lines)
