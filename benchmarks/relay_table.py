"""The relay scenario's rows as one target-by-measure table: `python -m benchmarks.relay_table RUN.json`.

RUN.json is what `python -m benchmarks.run --only relay --json RUN.json` wrote; the table is the
one of docs/benchmarks.md ("Relay cost"): CPU per request and per chunk, added p50 at c=1,
throughput against direct, errors.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.scenarios.relay import LEGS, PACED_TOKENS

_CPU = re.compile(r"CPU ([0-9.]+) ms/req")


@dataclass
class LegFigures:
    reqs: int = 0
    errors: int = 0
    rps: float = 0.0
    p50_ms: float | None = None
    cpu_ms: float | None = None


@dataclass
class TargetFigures:
    legs: dict[str, LegFigures] = field(default_factory=dict)


def parse_case(case: str) -> tuple[str, str] | None:
    """ "mvllm agent stream16 c=32" -> ("mvllm agent", "stream16 c=32"), by the legs' known names."""
    for leg in LEGS:
        if case.endswith(" " + leg.name):
            return case[: -len(leg.name) - 1], leg.name
    return None


def collect(doc: dict) -> dict[str, TargetFigures]:
    out: dict[str, TargetFigures] = {}
    for sc in doc.get("scenarios", []):
        if sc.get("name") != "relay":
            continue
        for row in sc.get("rows", []):
            parsed = parse_case(row.get("case", ""))
            if parsed is None:
                continue
            target, leg = parsed
            m = _CPU.search(row.get("extra") or "")
            out.setdefault(target, TargetFigures()).legs[leg] = LegFigures(
                reqs=row.get("reqs") or 0,
                errors=row.get("errors") or 0,
                rps=row.get("rps") or 0.0,
                p50_ms=row.get("e2e_p50"),
                cpu_ms=float(m.group(1)) if m else None,
            )
    return out


def _f(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def render(figs: dict[str, TargetFigures]) -> str:
    head = [
        "target",
        "CPU/req json c=32",
        "CPU/req stream 16 c=32",
        f"CPU/req stream {PACED_TOKENS} (~2 s)",
        "CPU/chunk",
        "added p50 c=1",
        "req/s vs direct json c=32",
        "stream 16",
        "errors / requests",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for target, t in figs.items():
        base = figs.get("sim direct" if target in ("sim direct", "mvllm agent") else "direct")
        lines.append("| " + " | ".join(_cells(target, t, None if base is t else base)) + " |")
    return "\n".join(lines)


def _cells(target: str, t: TargetFigures, base: TargetFigures | None) -> list[str]:
    j1, j32, s16, s64 = (leg.name for leg in LEGS)
    legs = t.legs

    def cpu(leg: str) -> float | None:
        return legs[leg].cpu_ms if leg in legs else None

    def vs(leg: str) -> str:
        if base is None or leg not in legs or leg not in base.legs or not base.legs[leg].rps:
            return "–"
        return f"{legs[leg].rps / base.legs[leg].rps:.2f}×"

    added = None
    if base is not None and j1 in legs and j1 in base.legs:
        a, b = legs[j1].p50_ms, base.legs[j1].p50_ms
        added = None if a is None or b is None else a - b
    c64 = cpu(s64)
    return [
        target,
        _f(cpu(j32), 3),
        _f(cpu(s16), 3),
        _f(c64, 2),
        _f(None if c64 is None else c64 / PACED_TOKENS, 4),
        "–" if added is None else f"{added:+.2f}",
        vs(j32),
        vs(s16),
        f"{sum(x.errors for x in legs.values())} / {sum(x.reqs for x in legs.values())}",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    print(render(collect(json.loads(Path(args[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
