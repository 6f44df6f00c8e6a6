"""Operator commands against a running router's admin API: `mvllm ps`, `status`, `drain`,
`undrain`, `reload`, `load`, `unload`, `sleep` and `wake` (`mvllm top`, the dashboard, is mvllm/tui/cli.py).

`--router URL` (env MVLLM_ROUTER, default http://127.0.0.1:8888) picks the router; `--key`
(env MVLLM_ADMIN_KEY) is sent as `Authorization: Bearer`. Exit status: 0 done, 1 error. Every call
goes through `mvllm.client.AsyncClient`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from mvllm.client import APIConnectionError, AsyncClient, MvllmError
from mvllm.client.endpoint import default_key, default_router

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_HEALTHY_NODE = 2
# Admin reads answer at once; model actions pass their own, longer limit.
ADMIN_TIMEOUT_S = 5.0


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--router",
        metavar="URL",
        default=None,
        help="the router's base URL (default: $MVLLM_ROUTER, else http://127.0.0.1:8888)",
    )
    p.add_argument("--key", default=None, help="admin key, sent as a bearer token (default: $MVLLM_ADMIN_KEY)")
    p.add_argument("--json", action="store_true", help="print the router's JSON answer instead of a table")
    return p


def register(subparsers: Any) -> None:
    common = common_options()
    ps = subparsers.add_parser("ps", parents=[common], help="nodes and models of a running router, as tables")
    ps.set_defaults(func=lambda a: run_command(a, _ps))

    st = subparsers.add_parser("status", parents=[common], help="is the router up, how many nodes are healthy")
    st.set_defaults(func=lambda a: run_command(a, _status))

    for name, what in (("drain", "take no new requests (in-flight ones finish)"), ("undrain", "take requests again")):
        p = subparsers.add_parser(name, parents=[common], help=f"{what}: a node, at run time")
        p.add_argument("node", help="node name, as `mvllm ps` shows it")
        if name == "drain":
            p.add_argument("--wait", action="store_true", help="wait until the node has no request in flight")
            p.add_argument("--timeout", type=float, default=300.0, help="limit of --wait, seconds (default 300)")
        p.set_defaults(func=lambda a, name=name: run_command(a, _drain if name == "drain" else _undrain))

    rl = subparsers.add_parser("reload", parents=[common], help="re-read servers.toml now (an invalid file is refused)")
    rl.set_defaults(func=lambda a: run_command(a, _reload))

    helps = {
        "load": "load a model on an agent and wait until it is ready",
        "unload": "stop a model's engine on an agent",
        "sleep": "put a model to sleep on an agent (vLLM sleep mode)",
        "wake": "wake a sleeping model",
    }
    for action, text in helps.items():
        p = subparsers.add_parser(action, parents=[common], help=text)
        p.add_argument("model", help="model name, as clients send it")
        p.add_argument("--node", help="the agent to act on (default: the router picks)")
        if action == "sleep":
            p.add_argument(
                "--level",
                type=int,
                choices=(1, 2),
                default=None,
                help="1: weights to CPU RAM; 2: discarded (default: the model's sleep_level_on_idle on its agent)",
            )
        p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
        p.set_defaults(func=lambda a, action=action: run_command(a, _model_action(action)))



def _client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.router or default_router(), admin_key=args.key or default_key(), timeout=ADMIN_TIMEOUT_S)


def run_command(args: argparse.Namespace, command: Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]) -> int:
    async def run() -> int:
        async with _client(args) as client:
            try:
                return await command(client, args)
            except APIConnectionError as exc:
                print_error(str(exc))
            except MvllmError as exc:
                print_error(_explain(exc))
            return EXIT_ERROR

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130


def _explain(exc: MvllmError) -> str:
    if exc.status == 401:
        return f"{exc.message} (give an admin key with --key or MVLLM_ADMIN_KEY)"
    if exc.status == 403:
        return f"{exc.message} (this key is not an admin key, or the router takes admin calls from its own host only)"
    return exc.message


def print_error(message: str) -> None:
    print(f"mvllm: error: {message}", file=sys.stderr)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


async def _ps(client: AsyncClient, args: argparse.Namespace) -> int:
    from mvllm.ctl.render import ps_text

    fleet = await client.fleet()
    if args.json:
        print_json({"router": fleet.router, "nodes": [n.raw for n in fleet.nodes], "models": [asdict(m) for m in fleet.models]})
    else:
        print(ps_text(fleet))
    return EXIT_OK


async def _status(client: AsyncClient, args: argparse.Namespace) -> int:
    from mvllm.client import FleetView
    from mvllm.ctl.render import status_text

    health = await client.health()
    fleet: FleetView | None
    try:
        fleet = await client.fleet()
    except MvllmError:
        fleet = None  # no admin rights: /health alone still answers "is it up"
    if args.json:
        print_json({"url": client.base_url, "health": health.raw, "router": fleet.router if fleet else None})
    else:
        print(status_text(client.base_url, health.raw, fleet))
    if health.nodes and not health.healthy_nodes:
        return EXIT_NO_HEALTHY_NODE
    return EXIT_OK


async def _drain(client: AsyncClient, args: argparse.Namespace) -> int:
    node = await client.drain(args.node)
    entry, left = node.raw, node.in_flight
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while left > 0:
            if time.monotonic() > deadline:
                print_error(f"node {args.node} still has {left} request(s) in flight after {args.timeout:.0f}s")
                return EXIT_ERROR
            await asyncio.sleep(0.5)
            now = next((n for n in await client.nodes() if n.name == args.node), None)
            entry, left = (now.raw, now.in_flight) if now else ({"in_flight": 0}, 0)
    if args.json:
        print_json(entry)
    else:
        tail = f"; {left} request(s) in flight finish there" if left else "; no request in flight"
        print(f"node {args.node} drained: no new requests go there{tail}")
    return EXIT_OK


async def _undrain(client: AsyncClient, args: argparse.Namespace) -> int:
    before = next((n for n in await client.nodes() if n.name == args.node), None)
    node = await client.undrain(args.node)
    if args.json:
        print_json(node.raw)
    elif before is not None and not before.draining:
        print(f"node {args.node} was not drained: it takes requests already")
    else:
        print(f"node {args.node} undrained: it takes requests again")
    return EXIT_OK


async def _reload(client: AsyncClient, args: argparse.Namespace) -> int:
    result = await client.reload()
    if args.json:
        print_json(result.raw)
    else:
        print(f"config {result.config} applied: {result.message}")
    return EXIT_OK


def _model_action(action: str) -> Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]:
    async def command(client: AsyncClient, args: argparse.Namespace) -> int:
        from mvllm.ctl.progress import Progress, run_model_action

        outcome = await run_model_action(
            client,
            action,
            args.model,
            node=args.node,
            level=getattr(args, "level", None) if action == "sleep" else None,
            timeout=args.timeout,
            progress=None if args.json else Progress(sys.stderr),
        )
        if args.json:
            print_json({"ok": outcome.ok, "message": outcome.message, "elapsed_s": round(outcome.elapsed, 3),
                         "result": outcome.result, "log_tail": outcome.log_tail})  # fmt: skip
        elif outcome.ok:
            print(outcome.message)
        else:
            # One line: the agent's message names the cause; the log is `mvllm logs`'s to show.
            print_error(outcome.message)
            if outcome.log_tail and "mvllm logs" not in outcome.message:
                node = f" --node {args.node}" if args.node else ""
                print(f"the engine log: mvllm logs {args.model}{node}", file=sys.stderr)
        return EXIT_OK if outcome.ok else EXIT_ERROR

    return command
