"""`mvllm agent`: run the node agent of one GPU host (engines on demand behind a token-guarded API)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the node agent: load, sleep and evict vLLM engines on one GPU host",
        description="Run the mvllm node agent: an OpenAI /v1 gatekeeper and lifecycle API over "
        "the vLLM engines of this host, started on demand from the catalog in agent.toml.",
    )
    p.add_argument("--config", "-c", default="agent.toml", help="agent config file (default: agent.toml)")
    p.add_argument("--host", help="listen address (overrides the config's `host`)")
    p.add_argument("--port", type=int, help="listen port (overrides the config's `port`, default 7070)")
    p.add_argument(
        "--reap-stale",
        action="store_true",
        help="stop engine processes left behind by a previous agent (they are only reported otherwise)",
    )
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from mvllm.agent.app import create_app
    from mvllm.agent.config import check_listen, load_config
    from mvllm.common.tomlconf import ConfigError

    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config(Path(args.config))
        if args.host:
            cfg.host = args.host
        if args.port is not None:
            cfg.port = args.port
        check_listen(cfg)
    except ConfigError as exc:
        print(f"mvllm agent: {exc}", file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        logging.getLogger("mvllm.agent").warning("%s", warning)
    app = create_app(cfg, reap_stale=args.reap_stale)
    # handler_cancellation: a client that disconnects cancels its relay, which closes the engine
    # request too. shutdown_timeout bounds how long open client connections may delay the stop.
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        access_log=None,
        print=lambda msg: print(f"mvllm agent listening on http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True),
    )
    return 0
