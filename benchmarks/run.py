"""Run the benchmark scenarios and print one table: `python -m benchmarks.run [--quick] [--only ...] [--out FILE]`.

Each scenario starts the processes it needs on 127.0.0.1 and stops them; a scenario that fails is
reported in the table and the next one runs. With --out, the results (machine, versions, command,
table, target checks) replace the marked results block of FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.harness import nginx_version, raise_nofile_limit, router_cli_available
from benchmarks.report import Row, ScenarioResult, environment, render_report, write_results
from benchmarks.scenarios import EXTRA, NAMES, Context


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short legs (whole run under 3 minutes)")
    p.add_argument("--only", default=",".join(NAMES), help=f"comma-separated scenarios among {', '.join(NAMES)} (default), and {', '.join(EXTRA)}")
    p.add_argument("--out", type=Path, help="write the results block into this Markdown file (docs/benchmarks.md)")
    p.add_argument("--json", type=Path, help="also dump rows and checks as JSON here")
    p.add_argument("--keep-logs", action="store_true", help="keep each scenario's temp dir (process logs, configs)")
    p.add_argument("--no-router", action="store_true", help="skip the router legs (measure direct and nginx only)")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in NAMES + EXTRA]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)} (choose among {', '.join(NAMES + EXTRA)})")
    if args.out and any(s in EXTRA for s in args.only):
        # The results block of --out is the default scenarios' table; the relay table has its own section.
        p.error(f"--out writes the default scenarios' results block: leave {', '.join(EXTRA)} out of --only")
    return args


async def run_all(ctx: Context, names: Sequence[str]) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    for name in names:
        module = importlib.import_module(f"benchmarks.scenarios.{name}")
        t0 = time.monotonic()
        ctx.log(f"== {name}")
        try:
            results.append(await module.run(ctx))
        except Exception as exc:  # one broken scenario must not hide the others' numbers
            traceback.print_exc()
            res = ScenarioResult(name, rows=[Row(name, "FAILED", extra=f"{type(exc).__name__}: {exc}"[:700])])
            res.seconds = time.monotonic() - t0
            results.append(res)
        ctx.log(f"== {name} done in {time.monotonic() - t0:.0f} s")
    return results


def _install_loop() -> None:
    # The load generator shares the CPUs with what it measures: the cheaper its loop, the better.
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile_limit()
    # SIGTERM unwinds like Ctrl-C, so every harness stops what it started.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.no_router:
        router_ok, reason = False, "--no-router given"
    else:
        router_ok, reason = router_cli_available()
    ctx = Context(quick=args.quick, keep_logs=args.keep_logs, router_ok=router_ok, router_reason=reason)
    if not router_ok:
        ctx.log(f"router not available: {reason}")
    _install_loop()
    loadavg = os.getloadavg()  # other work on the machine skews every figure: say how much there was
    t0 = time.monotonic()
    results = asyncio.run(run_all(ctx, args.only))
    total = time.monotonic() - t0
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render_report(results, environment(nginx_version(), loadavg), command.strip(), total)
    print(text)
    if args.out:
        write_results(args.out, text)
        ctx.log(f"results written to {args.out}")
    if args.json:
        doc = {
            "command": command,
            "seconds": total,
            "scenarios": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
