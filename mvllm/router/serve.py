"""The router process: logging, config lookup (or the demo), the listening router, and a clean
stop on Ctrl-C / SIGTERM that also stops every engine the demo started. What runs in front of it
while it listens (the dashboard of `mvllm run`) is passed in by the caller, mvllm.launch: the
router never imports the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvllm.common.envvars import ROUTER_ENV, read_env
from mvllm.common.logfiles import file_logging
from mvllm.common.tomlconf import ConfigError
from mvllm.router.app import running_router
from mvllm.router.config import RouterConfig, apply_env, find_config, load_config
from mvllm.router.demo import DemoFleet
from mvllm.router.eventloop import run as run_loop
from mvllm.router.eventloop import tune_gc
from mvllm.router.workers import NEEDS_REDIS, WorkerSet, watch_parent

log = logging.getLogger("mvllm.router")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# What runs in front of a listening router until `stop` is set or it returns: (url, stop).
Frontend = Callable[[str, asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class ServeOptions:
    config: str | None = None
    host: str | None = None
    port: int | None = None
    demo: bool = False
    console: bool = True
    log_level: str | None = None  # None: MVLLM_LOG_LEVEL, else [router] log_level, else info
    workers: int | None = None  # None: [router] workers (router/workers.py)
    worker_of: int | None = None  # set in a worker: the parent's pid (SO_REUSEPORT, dies with it)


def setup_logging(level: str) -> None:
    """Plain console lines, one per event (the dashboard, when it lands, replaces them)."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("mvllm").setLevel(level.upper())


def main(opts: ServeOptions, frontend: Frontend | None = None) -> int:
    """Run the router until Ctrl-C / SIGTERM (or until `frontend` returns); the exit status."""
    try:
        env = read_env(ROUTER_ENV, os.environ)
    except ConfigError as exc:
        setup_logging(opts.log_level or "info")
        log.error("%s", exc)
        return 2
    setup_logging(opts.log_level or env.get("log_level") or "info")
    try:
        return run_loop(serve(opts, frontend))  # on uvloop when installed
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


async def serve(opts: ServeOptions, frontend: Frontend | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # Flag > MVLLM_* variable > file > default (env already checked by main).
    env = read_env(ROUTER_ENV, os.environ)
    path = None if opts.demo else find_config(opts.config or env.get("config"))
    if path is None:
        if (opts.workers or 1) > 1:
            log.error("%s (the demo has none)", NEEDS_REDIS)
            return 2
        log.info("no servers.toml found: starting the demo" if not opts.demo else "starting the demo")
        host = opts.host or env.get("host") or RouterConfig.host
        port = opts.port if opts.port is not None else env.get("port", RouterConfig.port)
        fleet = DemoFleet()
        try:
            started = await _unless_stopped(fleet.start(), stop)
        except RuntimeError as exc:
            log.error("%s", exc)
            return 1
        if not started:
            return 0  # Ctrl-C while the engines were starting (they are stopped already)
        try:
            config = replace(fleet.router_config(host, port), log=apply_env(RouterConfig(), os.environ).log)
            return await _serve_until_stopped(opts, config, None, host, port, stop, fleet, frontend)
        finally:
            await fleet.stop()

    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    host = opts.host or config.host
    port = opts.port if opts.port is not None else config.port
    workers = opts.workers if opts.workers is not None else config.workers
    if opts.worker_of is None and workers > 1:
        if not config.cluster.enabled:
            log.error("%s", NEEDS_REDIS)
            return 2
        if port == 0:
            log.error("--workers > 1 needs a fixed --port (the workers share it)")
            return 2
        level = opts.log_level or (config.log.level if config.log.level else None)
        return await WorkerSet(workers, path, host, port, level).run(stop, frontend)
    log.info("config %s: %d node(s)", path, len(config.nodes))
    return await _serve_until_stopped(opts, config, path, host, port, stop, None, frontend)


async def _unless_stopped(coro: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `coro` unless `stop` is set first (then cancel it); True when it completed."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True


async def _serve_until_stopped(
    opts: ServeOptions,
    config: RouterConfig,
    path: Path | None,
    host: str,
    port: int,
    stop: asyncio.Event,
    fleet: DemoFleet | None,
    frontend: Frontend | None,
) -> int:
    if not opts.log_level and config.log.level:
        logging.getLogger("mvllm").setLevel(config.log.level.upper())
    with contextlib.ExitStack() as stack:
        try:
            log_file = stack.enter_context(file_logging(config.log))
        except OSError as exc:
            log.error("cannot open the log file %s: %s", config.log.file, exc.strerror or exc)
            return 1
        if log_file is not None:
            log.info("logging to %s (rotated at %d bytes, %d kept)", log_file, config.log.max_bytes, config.log.backups)
        return await _listen(opts, config, path, host, port, stop, fleet, frontend)


async def _listen(
    opts: ServeOptions,
    config: RouterConfig,
    path: Path | None,
    host: str,
    port: int,
    stop: asyncio.Event,
    fleet: DemoFleet | None,
    frontend: Frontend | None,
) -> int:
    worker = opts.worker_of is not None
    try:
        async with (
            running_router(config, host=host, port=port, config_path=path, reuse_port=worker) as router,
            contextlib.AsyncExitStack() as stack,
        ):
            if opts.worker_of is not None:
                watcher = asyncio.ensure_future(watch_parent(opts.worker_of, stop))
                stack.callback(watcher.cancel)
            log.info("router listening on %s (OpenAI base URL %s/v1)", router.url, router.url)
            tune_gc()  # short, rare collector pauses from here on
            if fleet is not None:
                reason = "--demo given" if opts.demo else "no servers.toml found"
                print(fleet.banner(router.url, reason), flush=True)
            if frontend is not None:
                # A wildcard listen address is no address to connect to: the front end uses loopback.
                url = f"http://127.0.0.1:{router.port}" if host in ("", "0.0.0.0", "::") else router.url
                await frontend(url, stop)
            else:
                await stop.wait()
            log.info("stopping: in-flight requests get up to a few seconds to finish")
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
        return 1
    log.info("stopped")
    return 0
