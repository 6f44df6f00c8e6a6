"""`mvllm top`: the full-screen dashboard of a running router, which it reads over HTTP like any
client (`--router URL`, `--key`, as the operator commands of mvllm/ctl take them)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mvllm.client.endpoint import default_key, default_router

EXIT_OK = 0
EXIT_ERROR = 1


def register(subparsers: Any) -> None:
    top = subparsers.add_parser("top", help="the full-screen dashboard of a running router")
    top.add_argument(
        "--router",
        metavar="URL",
        default=None,
        help="the router's base URL (default: $MVLLM_ROUTER, else http://127.0.0.1:8888)",
    )
    top.add_argument(
        "--key", default=None, help="admin key, sent as a bearer token (default: $MVLLM_ADMIN_KEY)"
    )
    top.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds (default 1)")
    top.set_defaults(func=run_top)


def run_top(args: argparse.Namespace) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            "mvllm: error: mvllm top needs a terminal; `mvllm ps` prints the same facts as tables",
            file=sys.stderr,
        )
        return EXIT_ERROR
    # Textual loads only for this command: every other `mvllm` command starts without it.
    from mvllm.tui.app import DashboardApp

    app = DashboardApp(
        args.router or default_router(), key=args.key or default_key(), refresh_interval=args.interval
    )
    app.run()
    return EXIT_OK
