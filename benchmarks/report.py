"""Result rows, target checks and their rendering as one Markdown table (terminal and docs alike)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.stats import RunStats

RESULTS_BEGIN = "<!-- results:begin (written by `python -m benchmarks.run --out`) -->"
RESULTS_END = "<!-- results:end -->"


@dataclass
class Row:
    """One line of the table. Times in milliseconds; None prints as a dash."""

    scenario: str
    case: str
    reqs: int | None = None
    errors: int | None = None
    rps: float | None = None
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    e2e_mean: float | None = None
    e2e_p50: float | None = None
    e2e_p99: float | None = None
    extra: str = ""

    @classmethod
    def from_stats(cls, scenario: str, case: str, st: RunStats, extra: str = "") -> Row:
        return cls(
            scenario,
            case,
            reqs=st.requests,
            errors=st.error_count,
            rps=st.throughput,
            ttft_p50=ms(st.ttft.p50),
            ttft_p99=ms(st.ttft.p99),
            e2e_mean=ms(st.e2e.mean),
            e2e_p50=ms(st.e2e.p50),
            e2e_p99=ms(st.e2e.p99),
            extra=extra,
        )


@dataclass
class Check:
    """A target of issue 7 and how this run did against it; `met` None = could not be measured."""

    target: str
    measured: str
    met: bool | None


@dataclass
class ScenarioResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def ms(seconds: float | None) -> float | None:
    if seconds is None or math.isnan(seconds):
        return None
    return seconds * 1000.0


def fmt(x: float | int | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


_HEADER = ("scenario", "case", "reqs", "err", "req/s", "ttft p50", "ttft p99", "e2e mean", "e2e p50", "e2e p99", "notes")


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * 8 + ["---"]) + "|",
    ]
    for r in rows:
        cells = [
            r.scenario,
            r.case,
            fmt(r.reqs),
            fmt(r.errors),
            fmt(r.rps, 0),
            fmt(r.ttft_p50, 2),
            fmt(r.ttft_p99, 2),
            fmt(r.e2e_mean, 2),
            fmt(r.e2e_p50, 2),
            fmt(r.e2e_p99, 2),
            r.extra.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_checks(checks: Sequence[Check]) -> str:
    if not checks:
        return ""
    lines = ["| target (issue 7) | measured | met |", "|---|---|---|"]
    for c in checks:
        met = "n/a" if c.met is None else ("yes" if c.met else "**no**")
        lines.append(f"| {c.target} | {c.measured} | {met} |")
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def _router_loop() -> str:
    try:
        from mvllm.router.eventloop import loop_name
    except ImportError:  # a router without it runs the standard loop
        return "asyncio"
    return loop_name()


def environment(nginx: str | None, loadavg_before: tuple[float, float, float] | None = None) -> list[tuple[str, str]]:
    import aiohttp
    import psutil

    try:
        import uvloop

        loop = "uvloop " + uvloop.__version__
    except ImportError:
        loop = "asyncio"
    mem = psutil.virtual_memory().total / 2**30
    return [
        ("machine", f"{os.cpu_count()} CPUs ({_cpu_model()}), {mem:.1f} GiB memory, {platform.system()} {platform.release()}"),
        ("python", sys.version.split()[0]),
        ("aiohttp", aiohttp.__version__),
        ("load generator loop", loop),
        ("router loop", _router_loop()),
        ("nginx", nginx or "not installed"),
        ("mvllm", _git_rev()),
        (
            "load average (1/5/15 min) before the run",
            " / ".join(f"{x:.2f}" for x in loadavg_before) if loadavg_before else "unknown",
        ),
    ]


def render_report(
    results: Sequence[ScenarioResult], env: Sequence[tuple[str, str]], command: str, total_s: float
) -> str:
    rows = [r for res in results for r in res.rows]
    checks = [c for res in results for c in res.checks]
    notes = [f"- {res.name}: {n}" for res in results for n in res.notes]
    parts = ["\n".join(f"- {k}: {v}" for k, v in env), f"- command: `{command}` ({total_s:.0f} s)", "", render_table(rows)]
    if checks:
        parts += ["", render_checks(checks)]
    if notes:
        parts += ["", "\n".join(notes)]
    return "\n".join(parts) + "\n"


def write_results(path: Path, block: str) -> None:
    """Put `block` between the results markers of `path` (the method text around stays as written);
    a file without markers gets the block appended inside new markers."""
    block = f"{RESULTS_BEGIN}\n{block.rstrip()}\n{RESULTS_END}"
    text = path.read_text() if path.exists() else ""
    start, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(RESULTS_END) :]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)
