"""The router's command line: the flags of `mvllm run`. The command itself is registered by
mvllm.launch, which puts the dashboard in front of the router (mvllm.router.serve does the work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The `run` subcommand's parser, without its handler."""
    p = subparsers.add_parser(
        "run",
        help="start the router (the built-in demo when no servers.toml is found)",
        description=(
            "Start the router: one OpenAI-compatible endpoint over the vLLM servers of servers.toml. "
            "The config is --config FILE, else ./servers.toml, else ~/.config/mvllm/servers.toml; "
            "without any, or with --demo, it starts a demo of three simulated engines."
        ),
    )
    p.add_argument(
        "--config", metavar="FILE", help="servers.toml to use, default $MVLLM_CONFIG (watched: edits apply without restart)"
    )
    p.add_argument("--host", help="listen address (default: $MVLLM_HOST, else [router] host, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (default: $MVLLM_PORT, else [router] port, else 8888)")
    p.add_argument(
        "--console",
        action="store_true",
        help="plain log lines on the console instead of the full-screen dashboard (the default without a TTY)",
    )
    p.add_argument("--demo", action="store_true", help="start the demo even if a servers.toml exists")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="router processes on one port (default: [router] workers, else 1); > 1 needs [cluster] redis_url",
    )
    p.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)  # set by the parent of workers
    p.add_argument(
        "--log-level",
        default=None,
        choices=("debug", "info", "warning", "error"),
        help="default: $MVLLM_LOG_LEVEL, else [router] log_level, else info",
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
