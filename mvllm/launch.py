"""`mvllm run`, composed above the parts: the router (mvllm.router.serve) and, on a terminal
without --console, the dashboard (mvllm.tui) in front of it, reading it over HTTP like any
remote router. The router never imports the dashboard; this module is where they meet."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING, Any

from mvllm.router.cli import add_run_parser

if TYPE_CHECKING:
    from mvllm.router.serve import ServeOptions


def register(subparsers: Any) -> None:
    add_run_parser(subparsers).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported when run, like every command's work: `mvllm ps` need not load the router.
    from mvllm.router.serve import ServeOptions, main

    opts = ServeOptions(
        config=args.config,
        host=args.host,
        port=args.port,
        demo=args.demo,
        console=args.console,
        log_level=args.log_level,
        workers=args.workers,
        worker_of=args.worker_of,
    )
    return main(opts, dashboard if use_dashboard(opts) else None)


def use_dashboard(opts: ServeOptions) -> bool:
    """The dashboard on a terminal; plain log lines with --console or without a TTY (systemd, Docker)."""
    return not opts.console and sys.stdin.isatty() and sys.stdout.isatty()


async def dashboard(url: str, stop: asyncio.Event) -> None:
    """The dashboard on the router at `url`, embedded: it ends when `stop` is set, or stops the
    router when the operator quits it."""
    # Imported when shown: Textual costs CLI start-up time that plain runs should not pay.
    from mvllm.tui.app import run_dashboard

    await run_dashboard(url, key=os.environ.get("MVLLM_ADMIN_KEY") or None, embedded=True, stop=stop)
