"""`mvllm logs MODEL [-f] [--node N] [--tail N]`: an engine's log from its agent, through the
router's admin API; `mvllm logs --stats` and `mvllm logs --cleanup [--days N]` for the log files
of the router and every agent."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from mvllm.client import AsyncClient
from mvllm.ctl.cli import EXIT_ERROR, EXIT_OK, common_options, print_error, print_json, run_command


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "logs",
        parents=[common_options()],
        help="an engine's log (-f follows it), or the log files' sizes (--stats) and cleanup (--cleanup)",
        description="Print the last lines of MODEL's engine log from the agent that runs it; with -f, "
        "keep printing what the engine writes (Ctrl-C ends). --stats lists the log files of the router "
        "and of every agent; --cleanup removes those older than --days (or each one's log_retention_days).",
    )
    p.add_argument("model", nargs="?", help="model name, as clients send it, or its catalog name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("--node", help="the agent (needed when several run the model)")
    p.add_argument("--tail", type=int, default=100, help="lines to print first (default 100)")
    p.add_argument("--interval", type=float, default=1.0, help="-f: seconds between polls (default 1)")
    p.add_argument("--stats", action="store_true", help="log files of the router and every agent, with sizes")
    p.add_argument("--cleanup", action="store_true", help="remove log files older than --days")
    p.add_argument("--days", type=float, help="--cleanup: age limit (default: each part's log_retention_days)")
    p.set_defaults(func=lambda a: run_command(a, _logs))


async def _logs(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.stats:
        return _print_stats(await client.logs_stats(), args.json)
    if args.cleanup:
        return _print_cleanup(await client.logs_cleanup(args.days), args.json)
    if not args.model:
        print_error("give a MODEL (or --stats / --cleanup)")
        return EXIT_ERROR
    if args.tail < 0 or args.interval <= 0:
        print_error("--tail must be >= 0 and --interval > 0")
        return EXIT_ERROR
    doc = await client.model_logs(args.model, args.node, tail=args.tail)
    if args.json and not args.follow:
        print_json(doc)
        return EXIT_OK
    _write(doc["text"])
    if not args.follow:
        return EXIT_OK
    node, cursor = doc["node"], doc["cursor"]  # stay on the agent we started with
    while True:
        if not doc.get("more"):
            await asyncio.sleep(args.interval)
        doc = await client.model_logs(args.model, node, cursor=cursor)
        if doc.get("skipped"):
            print("mvllm: (the log was rotated more than once since the last read; some lines are missing)", file=sys.stderr)
        _write(doc["text"])
        cursor = doc["cursor"]


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_stats(doc: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print_json(doc)
        return EXIT_OK
    rows = [("router", doc["router"])] + [(f"agent {k}", v) for k, v in doc.get("agents", {}).items()]
    for who, part in rows:
        if "error" in part:
            print(f"{who}: {part['error']}")
            continue
        total = part.get("total", {})
        where = part.get("log_dir") or part.get("log_file") or "no log file"
        print(f"{who}: {total.get('files', 0)} file(s), {_size(total.get('bytes', 0))} ({where})")
        for f in part.get("files", []):
            print(f"  {_size(f['bytes']):>10}  {f['path']}{'  (active)' if f.get('active') else ''}")
    total = doc.get("total", {})
    print(f"total: {total.get('files', 0)} file(s), {_size(total.get('bytes', 0))}")
    return EXIT_OK


def _print_cleanup(doc: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print_json(doc)
        return EXIT_OK
    rows = [("router", doc["router"])] + [(f"agent {k}", v) for k, v in doc.get("agents", {}).items()]
    for who, part in rows:
        if "error" in part or "skipped" in part:
            print(f"{who}: {part.get('error') or 'skipped: ' + part['skipped']}")
            continue
        removed = part.get("removed", [])
        print(f"{who}: removed {len(removed)} file(s) older than {part.get('days'):g} days, {_size(part.get('freed_bytes', 0))}")
        for r in removed:
            print(f"  {r['path']}")
    return EXIT_OK
