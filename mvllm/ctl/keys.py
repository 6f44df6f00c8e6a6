"""`mvllm keys` (every API key with its usage and limits), `mvllm keys enable|disable NAME` (at run
time, no restart), `mvllm keys reset-usage NAME` and `mvllm keys reload`, through a router's
/admin/keys API. The row texts are mvllm/client/keyview.py's, shared with the dashboard's keys panel."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from mvllm.client import AsyncClient
from mvllm.client.keyview import KEY_COLUMNS, key_row
from mvllm.ctl.cli import EXIT_OK, common_options, print_json, run_command
from mvllm.ctl.render import table


def keys_text(doc: Mapping[str, Any]) -> str:
    """The table of `mvllm keys` (and a line on the usage file when it has a problem)."""
    if doc.get("open"):
        return "no API key is configured: the router is open (see docs/security.md)"
    text = table([c.upper() for c in KEY_COLUMNS], [key_row(e) for e in doc.get("keys") or []])
    problem = (doc.get("usage_file") or {}).get("error")
    if problem:
        text += f"\n(usage file: {problem})"
    return text


def _sub_common() -> argparse.ArgumentParser:
    """The common options again for the subcommands, without defaults: `mvllm keys --router URL
    disable NAME` keeps the URL given before the subcommand (argparse would reset it)."""
    p = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    p.add_argument("--router", metavar="URL", help="the router's base URL (default: $MVLLM_ROUTER, else http://127.0.0.1:8888)")
    p.add_argument("--key", help="admin key, sent as a bearer token (default: $MVLLM_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", help="print the router's JSON answer instead of a line")
    return p


def register(subparsers: Any) -> None:
    common = common_options()
    sub_common = _sub_common()
    keys = subparsers.add_parser(
        "keys", parents=[common], help="API keys: usage, limits; enable/disable at run time",
        description="Without a subcommand: every API key with its requests today and in total (as "
        "used/quota when a quota is set), tokens, limits and models. Needs an admin key.",
    )  # fmt: skip
    keys.set_defaults(func=lambda a: run_command(a, _list))
    sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    for action, text in (
        ("disable", "refuse a key's requests from now on (401 api_key_disabled), without a restart"),
        ("enable", "accept a key's requests again"),
        ("reset-usage", "zero a key's quota counters, tokens and denials"),
    ):
        p = sub.add_parser(action, parents=[sub_common], help=text)
        p.add_argument("name", help="key name, as `mvllm keys` shows it")
        p.set_defaults(func=lambda a, action=action: run_command(a, _key_action(action)))
    rl = sub.add_parser("reload", parents=[sub_common], help="re-read the keys file now (an invalid file is refused)")
    rl.set_defaults(func=lambda a: run_command(a, _reload))


async def _list(client: AsyncClient, args: argparse.Namespace) -> int:
    doc = await client.keys()
    if args.json:
        print_json(doc)
    else:
        print(keys_text(doc))
    return EXIT_OK


def _key_action(action: str) -> Any:
    async def command(client: AsyncClient, args: argparse.Namespace) -> int:
        if action == "reset-usage":
            entry = await client.reset_key_usage(args.name)
        else:
            entry = await client.set_key_enabled(args.name, action == "enable")
        if args.json:
            print_json(entry)
            return EXIT_OK
        if action == "reset-usage":
            print(f"key {args.name}: usage reset (today 0, total 0)")
            return EXIT_OK
        state = "enabled" if entry.get("enabled") else "disabled: its requests get 401 api_key_disabled"
        if entry.get("override"):
            note = "; at run time, overriding the keys file until the key's entry there changes"
        else:
            note = "; as the keys file says"
        print(f"key {args.name} {state}{note}")
        return EXIT_OK

    return command


async def _reload(client: AsyncClient, args: argparse.Namespace) -> int:
    result = await client.reload_keys()
    if args.json:
        print_json(result)
        return EXIT_OK
    parts = [f"{len(result.get('keys') or [])} key(s)"]
    for what in ("added", "removed", "changed"):
        names = result.get(what) or []
        if names:
            parts.append(f"{what}: {', '.join(names)}")
    print("keys reloaded: " + "; ".join(parts))
    return EXIT_OK
