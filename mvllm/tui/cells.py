"""What each dashboard table row and the header line show, as Rich text, from the fleet view and
the /metrics window. Pure: the widgets only place these cells."""

from __future__ import annotations

import time

from rich.text import Text

from mvllm.client.fleet import FleetView, GpuView, ModelView, NodeView, fmt_bytes, fmt_num, fmt_pct
from mvllm.client.keyview import key_row
from mvllm.tui.rates import Window

NODE_COLUMNS = ("node", "kind", "state", "breaker", "models", "run", "wait", "cap", "score", "in-flight", "kv%")
MODEL_COLUMNS = ("model", "awake", "asleep", "loadable", "replicas", "run", "queue")
GPU_COLUMNS = ("node", "gpu", "memory", "util", "temp", "power")

_STATE_STYLE = {
    "up": "green",
    "unknown": "yellow",
    "stale": "yellow",
    "down": "bold red",
    "ejected": "bold red",
    "removed": "dim",
}
_BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def _names(items: list[str], limit: int = 40) -> str:
    s = ", ".join(items)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def node_cells(n: NodeView) -> tuple[Text, ...]:
    state = n.state_text
    base = state.split(",")[0]
    state_text = Text(base, style=_STATE_STYLE.get(base, ""))
    if n.draining and not n.removed:
        state_text.append(", draining" + (f" ({n.drained_by})" if n.drained_by else ""), style="magenta")
    # Stale numbers keep their last value, dimmed and marked "?", never shown as fresh zeros.
    num_style = "dim" if n.stale else ""
    score = "–" if n.score is None else f"{n.score:.2f}"
    return (
        Text(n.name, style="bold"),
        Text(n.kind, style="cyan" if n.is_agent else ""),
        state_text,
        Text(n.breaker.replace("_", "-"), style=_BREAKER_STYLE.get(n.breaker, "")),
        Text(_names(n.models) or "–"),
        Text(fmt_num(n.running, n.stale), style=num_style, justify="right"),
        Text(fmt_num(n.waiting, n.stale), style=num_style, justify="right"),
        Text(fmt_num(n.capacity), justify="right"),
        Text(score + ("?" if n.stale and n.score is not None else ""), style=num_style, justify="right"),
        Text(str(n.in_flight), justify="right"),
        # The engine's KV cache in use: a full one evicts prefixes (and gets no affinity traffic).
        Text(fmt_pct(n.kv_cache_usage, n.stale), style=num_style or _kv_style(n.kv_cache_usage), justify="right"),
    )


def _kv_style(usage: float | None) -> str:
    if usage is None:
        return "dim"
    return "" if usage < 0.7 else "yellow" if usage < 0.9 else "bold red"


def model_cells(m: ModelView) -> tuple[Text, ...]:
    awake = Text(_names([f"{s} (released)" if s in m.released else s for s in m.awake], 30), style="green")
    if m.starting:
        awake.append((", " if awake.plain else "") + _names([f"{s} ({m.loading_text(s)})" for s in m.starting], 60), style="yellow")
    if m.stopping:
        awake.append((", " if awake.plain else "") + _names([f"{s} (unloading)" for s in m.stopping], 30), style="yellow")
    if m.failed:
        awake.append((", " if awake.plain else "") + _names([f"{s} (failed)" for s in m.failed], 30), style="bold red")
    return (
        Text(m.name, style="bold"),
        awake if awake.plain else Text("–", style="dim"),
        Text(_names(m.asleep, 30) or "–", style="blue" if m.asleep else "dim"),
        Text(_names(m.loadable, 30) or "–", style="" if m.loadable else "dim"),
        Text(m.replicas_text, justify="right", style="bold" if m.replicas > 1 else ""),
        Text(fmt_num(m.running), justify="right"),
        Text(fmt_num(m.queue), justify="right", style="bold yellow" if m.queue else ""),
    )


def bar(fraction: float | None, width: int = 10) -> Text:
    if fraction is None:
        return Text("?" * width, style="dim")
    filled = round(fraction * width)
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    t = Text("█" * filled, style=style)
    t.append("░" * (width - filled), style="dim")
    return t


def gpu_cells(g: GpuView) -> tuple[Text, ...]:
    mem = bar(g.memory_fraction)
    mem.append(f" {fmt_bytes(g.memory_used)}/{fmt_bytes(g.memory_total)}")
    util = "–" if g.utilization_pct is None else f"{g.utilization_pct:.0f}%"
    temp = "–" if g.temperature_c is None else f"{g.temperature_c:.0f}°C"
    power = "–" if g.power_w is None else f"{g.power_w:.0f}W"
    return (
        Text(g.node),
        Text(f"{g.index} {_names([g.name], 16)}"),
        mem,
        Text(util, justify="right"),
        Text(temp, justify="right"),
        Text(power, justify="right"),
    )


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms < 10_000 else f"{seconds:.0f} s"


def fmt_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def totals_text(url: str, fleet: FleetView | None, win: Window | None, problem: str | None) -> Text:
    """Two lines: the router (address, version, uptime) and the fleet's totals."""
    t = Text()
    t.append(" mvllm ", style="bold reverse")
    t.append(f" {url}", style="bold")
    if fleet is not None:
        r = fleet.router
        t.append(f"  v{r.get('version', '?')}  up {fmt_uptime(r.get('uptime_s'))}  policy {r.get('policy', '?')}")
        c = r.get("cluster")
        if isinstance(c, dict):  # several routers on one Redis: the whole of them
            t.append(f"  │  {c.get('routers', '?')} routers, {c.get('in_flight', 0)} in flight")
            if c.get("redis") != "ok":
                t.append("  Redis down: per-router limits", style="bold yellow")
    if problem:
        t.append(f"  {problem}", style="bold red")
    t.append("\n")
    if fleet is None:
        t.append(" waiting for the router's first answer…", style="dim")
        return t
    tot = fleet.totals
    up_style = "green" if tot.nodes_up == tot.nodes_total and tot.nodes_total else "bold red"
    t.append(" nodes ")
    t.append(f"{tot.nodes_up}/{tot.nodes_total} up", style=up_style)
    if tot.draining:
        t.append(f" ({tot.draining} draining)", style="magenta")
    if tot.stale:
        t.append(f" ({tot.stale} stale)", style="yellow")
    t.append("  │  ")
    if win is None:
        t.append("– req/s  │  p50 –  p99 –  │  errors –", style="dim")
    else:
        t.append(f"{win.rps:.1f} req/s", style="bold")
        t.append(f"  │  p50 {fmt_ms(win.p50)}  p99 {fmt_ms(win.p99)}  │  ")
        t.append(f"errors {win.errors:.0f}", style="bold red" if win.errors else "")
        t.append(f" (total {win.errors_total:.0f})", style="dim")
    t.append(f"  │  in flight {tot.in_flight}  running {fmt_num(tot.running)}  waiting {fmt_num(tot.waiting)}")
    t.append(f"  capacity {tot.capacity}")
    return t


def event_text(event: dict) -> Text:
    """One /admin/events entry as one log line (the same words the console mode prints)."""
    level = str(event.get("level", "INFO"))
    style = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red", "DEBUG": "dim"}.get(level, "")
    ts = time.strftime("%H:%M:%S", time.localtime(float(event.get("time") or 0)))
    t = Text(f"{ts} ", style="dim")
    t.append(f"{level:<7} ", style=style)
    t.append(f"{event.get('logger', '')}: ", style="dim")
    t.append(str(event.get("message", "")), style=style if level != "INFO" else "")
    return t


def key_cells(entry: dict) -> tuple[Text, ...]:
    """One row of the keys panel (an entry of /admin/keys): a disabled key and a used-up quota in red."""
    name, role, enabled, today, total, tokens, limits, models = key_row(entry)
    quota = entry.get("quota") or {}
    left = entry.get("quota_left") or {}

    def style_of(limit: str) -> str:
        return "bold red" if limit in quota and left.get(limit, 1) <= 0 else ""

    return (
        Text(name, style="bold"),
        Text(role, style="magenta" if role == "admin" else ""),
        Text(enabled, style="green" if entry.get("enabled") else "bold red"),
        Text(today, style=style_of("requests_per_day"), justify="right"),
        Text(total, style=style_of("requests_total"), justify="right"),
        Text(tokens, justify="right"),
        Text(limits, style="dim" if limits == "-" else ""),
        Text(models),
    )

