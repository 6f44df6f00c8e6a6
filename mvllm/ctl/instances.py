"""`mvllm instance start|ls|rm` (ad-hoc engines for models outside any catalog) and `mvllm assign`
(a catalog model's devices, memory share, max length at run time), through a router's admin API."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from mvllm.client import AsyncClient
from mvllm.ctl.cli import EXIT_OK, common_options, print_json, run_command


def register(subparsers: Any) -> None:
    common = common_options()
    inst = subparsers.add_parser("instance", help="ad-hoc engines: start one for any model, list, remove")
    sub = inst.add_subparsers(dest="instance_command", metavar="SUBCOMMAND")
    inst.set_defaults(func=lambda a: inst.print_help() or 2)

    start = sub.add_parser(
        "start", parents=[common], help="start an engine for MODEL with custom vLLM flags",
        description="Start an ad-hoc engine for MODEL (HF id or path on the agent's host) on an agent. "
        "Flags must be in the agent's [adhoc] allow-list; the instance stops when its ttl is over.",
    )  # fmt: skip
    start.add_argument("model", help="HF id or path, as `vllm serve MODEL` takes it")
    start.add_argument("--node", help="the agent to start it on (default: the one with the most free GPU memory)")
    start.add_argument("--name", help="instance name, also the name clients send as `model` (default: made up)")
    start.add_argument("--served-model-name", action="append", metavar="NAME", help="names clients send (repeatable)")
    start.add_argument(
        "--param", "-p", action="append", default=[], metavar="FLAG=VALUE",
        help="a vLLM flag, e.g. max_model_len=8192, enforce_eager=true, dtype=float16 (repeatable)",
    )  # fmt: skip
    start.add_argument("--devices", help="GPU indices, e.g. 0,1 (default: the freest GPUs)")
    start.add_argument("--memory-gib", type=float, help="memory budget per GPU, GiB")
    start.add_argument("--ttl", type=float, help="seconds until it is stopped (once idle); 0 = never (default: the agent's)")
    start.add_argument("--no-wait", action="store_true", help="return once it is starting, not ready")
    start.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    start.set_defaults(func=lambda a: run_command(a, _start))

    ls = sub.add_parser("ls", parents=[common], help="the ad-hoc instances of every agent")
    ls.add_argument("--node", help="only this agent")
    ls.set_defaults(func=lambda a: run_command(a, _ls))

    rm = sub.add_parser("rm", parents=[common], help="drain, stop and forget an ad-hoc instance")
    rm.add_argument("name", help="instance name, as `mvllm instance ls` shows it")
    rm.add_argument("--node", help="the agent it runs on (needed only when several have that name)")
    rm.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    rm.set_defaults(func=lambda a: run_command(a, _rm))

    assign = subparsers.add_parser(
        "assign", parents=[common], help="change a catalog model's devices, memory or max length (saved in agent.toml)",
        description="Change a catalog model of an agent at run time; the agent writes it to agent.toml "
        "(previous file kept as agent.toml.bak). Without --restart a running engine keeps its old "
        "settings until its next start.",
    )  # fmt: skip
    assign.add_argument("model", help="model name, as clients send it, or its catalog name")
    assign.add_argument("--devices", help="GPU indices, e.g. 0,1 (tensor parallel over them)")
    assign.add_argument("--gpu-memory", type=float, metavar="FRACTION", help="gpu_memory_utilization, e.g. 0.7")
    assign.add_argument("--memory-gib", type=float, help="memory budget per GPU in GiB (instead of --gpu-memory)")
    assign.add_argument("--max-model-len", help="max context length, e.g. 16384 or 16k")
    assign.add_argument("--max-num-seqs", type=int, help="max concurrent sequences")
    assign.add_argument(
        "--extra-arg", action="append", metavar="ARG", dest="extra_args",
        help="replaces the entry's extra_args: one argument per use, e.g. --extra-arg=--enforce-eager",
    )  # fmt: skip
    assign.add_argument("--restart", action="store_true", help="restart a running engine now (after draining)")
    assign.add_argument("--node", help="the agent (needed when several have the model)")
    assign.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds (default 900)")
    assign.set_defaults(func=lambda a: run_command(a, _assign))


def parse_param(text: str) -> tuple[str, Any]:
    """`FLAG=VALUE` with the value read as JSON when it is JSON (true, 8192, 0.5), else as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected FLAG=VALUE")
    name, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if isinstance(value, (dict, list)) or value is None:
        value = raw
    return name.strip(), value


def _devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise SystemExit(f"mvllm: error: --devices {text!r}: expected GPU indices like 0,1") from None


def _ttl(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    left = seconds - time.time()
    return f"{left:.0f}s" if left > 0 else "due"


async def _start(client: AsyncClient, args: argparse.Namespace) -> int:
    params = dict(parse_param(p) for p in args.param)
    doc = await client.start_instance(
        args.model, node=args.node, params=params, wait=not args.no_wait, timeout=args.timeout, name=args.name,
        served_model_name=args.served_model_name, devices=_devices(args.devices), ttl=args.ttl,
        memory_gib=args.memory_gib,
    )  # fmt: skip
    if args.json:
        print_json(doc)
        return EXIT_OK
    served = ", ".join(doc.get("served_model_names") or [])
    expires = f", expires in {_ttl(doc.get('expires_at'))}" if doc.get("expires_at") else ", no expiry"
    print(f"{doc['name']} on {doc.get('node')}: {doc['state']} (GPU {doc.get('devices')}{expires}); send model = {served}")
    return EXIT_OK


def instances_text(items: list[dict[str, Any]]) -> str:
    """The table of `mvllm instance ls`."""
    rows = [("NAME", "NODE", "MODEL", "STATE", "SERVED AS", "GPUS", "EXPIRES IN", "PARAMS")]
    for i in items:
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in (i.get("requested_params") or {}).items()) or "-"
        rows.append((
            i.get("name", "?"), i.get("node", "?"), i.get("model", "?"), i.get("state", "?"),
            ", ".join(i.get("served_model_names") or []), ",".join(str(d) for d in i.get("devices") or []),
            _ttl(i.get("expires_at")), params,
        ))  # fmt: skip
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _ls(client: AsyncClient, args: argparse.Namespace) -> int:
    doc = await client.instances(node=args.node)
    if args.json:
        print_json(doc)
        return EXIT_OK
    items = doc.get("instances") or []
    print(instances_text(items) if items else "no ad-hoc instance")
    for node, why in (doc.get("errors") or {}).items():
        print(f"(agent {node} not asked: {why})")
    return EXIT_OK


async def _rm(client: AsyncClient, args: argparse.Namespace) -> int:
    doc = await client.remove_instance(args.name, node=args.node, timeout=args.timeout)
    if args.json:
        print_json(doc)
    else:
        print(f"{args.name} on {doc.get('node')}: removed")
    return EXIT_OK


async def _assign(client: AsyncClient, args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.devices is not None:
        changes["devices"] = _devices(args.devices)
    if args.gpu_memory is not None:
        changes["gpu_memory_utilization"] = args.gpu_memory
    if args.memory_gib is not None:
        changes["memory_gib"] = args.memory_gib
    if args.max_model_len is not None:
        raw = args.max_model_len
        changes["max_model_len"] = int(raw) if raw.isdigit() else raw
    if args.max_num_seqs is not None:
        changes["max_num_seqs"] = args.max_num_seqs
    if args.extra_args is not None:
        changes["extra_args"] = args.extra_args
    doc = await client.assign(args.model, node=args.node, restart=args.restart, timeout=args.timeout, **changes)
    if args.json:
        print_json(doc)
        return EXIT_OK
    applied = {
        "now": "in effect now",
        "next_start": "in effect at its next start (the running engine keeps its settings; --restart to restart it)",
        "restarted": "engine restarted with it",
    }.get(doc.get("applied"), doc.get("applied"))
    saved = doc.get("saved") or {}
    where = f"saved to {saved.get('path')}" if saved.get("saved") else f"NOT saved: {saved.get('reason')}"
    entry = doc.get("pending") or doc.get("catalog") or {}  # pending: the entry its next start uses
    if entry.get("gpu_memory_utilization") is not None:
        budget = f"gpu_memory_utilization {entry['gpu_memory_utilization']}"
    elif entry.get("memory_gib") is not None:
        budget = f"{entry['memory_gib']:g} GiB/GPU"
    else:
        budget = f"{(entry.get('memory_bytes') or 0) / 1024**3:.1f} GiB/GPU"
    print(f"{doc.get('name')} on {doc.get('node')}: devices {entry.get('devices')}, {budget}, "
          f"max_model_len {entry.get('max_model_len')}; {applied}; {where}")  # fmt: skip
    return EXIT_OK
