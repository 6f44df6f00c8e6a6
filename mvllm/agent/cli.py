"""`mvllm agent`: run the node agent of one GPU host (engines on demand behind a token-guarded API)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mvllm.agent.config import AgentConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agent",
        help="run the node agent: load, sleep and evict vLLM engines on one GPU host",
        description="Run the mvllm node agent: an OpenAI /v1 gatekeeper and lifecycle API over "
        "the vLLM engines of this host, started on demand from the catalog in agent.toml.",
    )
    p.add_argument(
        "--config", "-c", default=None, help="agent config file (default: $MVLLM_AGENT_CONFIG, else agent.toml)"
    )
    p.add_argument("--host", help="listen address (overrides $MVLLM_AGENT_HOST and the config's `host`)")
    p.add_argument("--port", type=int, help="listen port (overrides $MVLLM_AGENT_PORT and the config's `port`, default 7070)")
    p.add_argument(
        "--reap-stale",
        action="store_true",
        help="stop engine processes left behind by a previous agent (they are only reported otherwise)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default: $MVLLM_LOG_LEVEL, else the config's log_level, else INFO",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mvllm.agent.config import apply_env, check_listen, load_config
    from mvllm.common.envvars import AGENT_ENV, read_env
    from mvllm.common.logfiles import file_logging
    from mvllm.common.tomlconf import ConfigError

    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, args.log_level or "INFO"), format=log_format, stream=sys.stderr)
    # Precedence: flag > MVLLM_AGENT_* / MVLLM_LOG_LEVEL > agent.toml > default.
    try:
        path = args.config or read_env(AGENT_ENV, os.environ).get("config") or "agent.toml"
        cfg = apply_env(load_config(Path(path)), os.environ)
        cfg = replace(cfg, host=args.host or cfg.host, port=cfg.port if args.port is None else args.port)
        check_listen(cfg)
    except ConfigError as exc:
        print(f"mvllm agent: {exc}", file=sys.stderr)
        return 2
    if not args.log_level and cfg.log.level:
        logging.getLogger().setLevel(cfg.log.level.upper())
    log = logging.getLogger("mvllm.agent")
    for warning in cfg.warnings:
        log.warning("%s", warning)
    for spec in cfg.models.values():
        est = spec.memory_estimate
        if est is not None and est.bytes is not None:
            log.info("%s: no memory budget given; estimated %.1f GiB per GPU (%s)", spec.name, est.bytes / 1024**3, est.basis)
        elif est is not None:
            log.warning("%s: no memory budget given and %s; planning with 0.9 of each GPU", spec.name, est.basis)
    with contextlib.ExitStack() as stack:
        try:
            log_file = stack.enter_context(file_logging(cfg.log, log_format))
        except OSError as exc:
            print(f"mvllm agent: cannot open the log file {cfg.log.file}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if log_file is not None:
            log.info("logging to %s (rotated at %d bytes, %d kept)", log_file, cfg.log.max_bytes, cfg.log.backups)
        return _serve(cfg, args.reap_stale)


def _serve(cfg: AgentConfig, reap_stale: bool) -> int:
    from aiohttp import web

    from mvllm.agent.app import create_app
    from mvllm.common.eventloop import loop_name, new_event_loop, tune_gc

    app = create_app(cfg, reap_stale=reap_stale)

    async def _tuned(_app: web.Application) -> None:
        tune_gc()  # after the agent's own start-up (its cleanup_ctx runs first): short, rare GC pauses

    app.on_startup.append(_tuned)
    logging.getLogger("mvllm.agent").info("event loop: %s", loop_name())
    # handler_cancellation: a client that disconnects cancels its relay, which closes the engine
    # request too. shutdown_timeout bounds how long open client connections may delay the stop.
    web.run_app(
        app,
        host=cfg.host,
        port=cfg.port,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        loop=new_event_loop(),  # uvloop when installed, as the router's
        access_log=None,
        print=lambda msg: print(f"mvllm agent listening on http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True),
    )
    return 0
