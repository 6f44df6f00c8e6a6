"""`mvllm sim serve MODEL [flags]`: run the simulated engine on a port, with vLLM's startup and SIGTERM behaviour."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time

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
        if cfg.startup_s > 0 and not await _startup_phases(cfg, stop):
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


# vLLM 0.25's startup lines the agent reads phases from (mvllm.agent.loadphase), at the share of
# --sim-startup-s each came at in a cold start on an H200 (imports ~25%, weights ~65%, ...).
_STARTUP_LINES: tuple[tuple[float, str, str], ...] = (
    (0.25, "APIServer", "[api_utils.py:273] non-default args: {{'model': '{model}', 'port': {port}}}"),
    (0.65, "EngineCore", "[model_runner.py:281] Loading model from scratch..."),
    (0.66, "EngineCore", "[default_loader.py:430] Loading weights took 0.01 seconds"),
    (0.69, "EngineCore", "[backends.py:1148] Dynamo bytecode transform time: 0.01 s"),
    (0.78, "EngineCore", "[monitor.py:53] torch.compile took 0.01 s in total"),
    (0.82, "EngineCore", "[gpu_worker.py:538] Available KV cache memory: {kv_gib:.2f} GiB"),
    (0.82, "EngineCore", "[kv_cache_utils.py:2146] GPU KV cache size: {kv_tokens:,} tokens"),
    (0.83, "EngineCore", "Capturing CUDA graphs (PIECEWISE): 100%|##########| 51/51"),
    (0.84, "EngineCore", "[model_runner.py:722] Graph capturing finished in 0 secs, took 0.00 GiB"),
    (1.00, "APIServer", "[api_server.py:616] Starting vLLM server on http://{host}:{port}"),
)


async def _startup_phases(cfg: SimConfig, stop: asyncio.Event) -> bool:
    """Print vLLM's startup lines spread over `--sim-startup-s`; False when SIGTERM came first."""
    kv_bytes = max(0, int(cfg.gpu_memory_gib * cfg.gpu_memory_utilization * 1024**3) - int(cfg.weights_gib * 1024**3))
    values = {
        "model": cfg.model, "host": cfg.host, "port": cfg.port,
        "kv_gib": kv_bytes / 1024**3, "kv_tokens": kv_bytes // max(1, cfg.kv_bytes_per_token),
    }  # fmt: skip
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for share, proc, text in _STARTUP_LINES:
        wait = t0 + share * cfg.startup_s - loop.time()
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return False
        stamp = time.strftime("%m-%d %H:%M:%S")
        print(f"({proc} pid={os.getpid()}) INFO {stamp} {text.format(**values)}", flush=True)
    return True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock
