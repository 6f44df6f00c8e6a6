"""`mvllm sim serve MODEL [flags]`: run the simulated engine on a port, with vLLM's startup and SIGTERM behaviour."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

from mvllm.sim.config import SimConfig, add_serve_arguments, config_from_args, ignored_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser("sim", help="simulated vLLM engine (no GPU needed)",
                                description="A drop-in stand-in for `vllm serve`.")
    sim_sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    serve = sim_sub.add_parser(
        "serve",
        help="serve MODEL with vLLM's OpenAI API, metrics, sleep and LoRA endpoints",
        description="Like `vllm serve MODEL`: any other vLLM flag is accepted and ignored (with a warning). "
        "Put MODEL first, as vLLM's docs do.",
        allow_abbrev=False,  # an unknown vLLM flag must never be taken for a prefix of one of ours
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve, accepts_unknown_args=True)


def _serve(args: argparse.Namespace) -> int:
    ignored = ignored_flags(getattr(args, "unknown_args", []) or [])
    if ignored:
        print(f"WARNING mvllm sim: ignoring flags it does not model: {' '.join(ignored)}",
              file=sys.stderr, flush=True)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"mvllm sim: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(cfg))


async def serve(cfg: SimConfig) -> int:
    """Bind at once (so the port is ours), listen after `--sim-startup-s` (connections are refused
    until then, as while vLLM loads), serve until SIGTERM/SIGINT, then drain in-flight requests for
    up to `--shutdown-timeout` seconds and return 0."""
    from aiohttp import web

    from mvllm.sim.app import build_app, check_kv_fits

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock = _bind(cfg.host, cfg.port)
    try:
        print(f"INFO:     Started server process [{os.getpid()}]", flush=True)
        if cfg.startup_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.startup_s)
            if stop.is_set():
                return 0
        try:
            check_kv_fits(cfg)
        except ValueError as exc:
            print(f"ValueError: {exc}", file=sys.stderr, flush=True)
            return 1
        app = build_app(cfg)
        # aiohttp reads a timeout of 0 as "no limit"; vLLM reads 0 as "abort now".
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=max(cfg.shutdown_timeout, 0.001),
                               handler_cancellation=True, access_log=None, keepalive_timeout=cfg.keepalive_s)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        print(
            f"INFO:     mvllm sim serving {cfg.model} as {', '.join(cfg.served_model_names)} on "
            f"http://{cfg.host}:{cfg.port} (max_num_seqs={cfg.max_num_seqs}, max_model_len={cfg.max_model_len}, "
            f"ttft={cfg.ttft_ms}ms, itl={cfg.itl_ms}ms)",
            flush=True,
        )
        print("INFO:     Application startup complete.", flush=True)
        await stop.wait()
        print("INFO:     Shutting down", flush=True)
        await runner.cleanup()
        return 0
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock
