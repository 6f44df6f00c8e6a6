"""Entry point of the `mvllm` command: one subcommand per part, each registered by its own package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mvllm import __version__

# (subcommand module, exposing `register(subparsers)`). A part adds its line when it lands, so the
# CLI never offers a command that does nothing. Imports stay lazy in each module's handler.
_COMMAND_MODULES: list[str] = [
    "mvllm.launch",
    "mvllm.agent.cli",
    "mvllm.sim.cli",
    "mvllm.ctl.cli",
    "mvllm.tui.cli",
    "mvllm.ctl.instances",
    "mvllm.ctl.logs",
    "mvllm.ctl.keys",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mvllm",
        description="One OpenAI-compatible endpoint over a fleet of vLLM servers.",
    )
    parser.add_argument("--version", action="version", version=f"mvllm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    # Only commands that declare they take pass-through flags (the simulator accepts any vLLM flag)
    # may receive unknown arguments; everywhere else they are an error.
    if unknown and not getattr(args, "accepts_unknown_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown_args = unknown
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
