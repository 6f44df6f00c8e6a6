"""Helpers of the router's integration tests: the real router on a free 127.0.0.1 port (in this
process, so tests can look at its registry), simulated engines as `mvllm sim serve` subprocesses
or in this process, clients. The servers.toml writer, fast timings and waits are tests/support.py's."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from mvllm.sim.config import add_serve_arguments, config_from_args
from mvllm.sim.inprocess import RunningSim, start_sim
from tests.procs import Proc, Sim, free_port, wait_http_ok
from tests.support import write_servers

MODEL = "sim-model"
# Short simulated timings: tests stay fast, and still stream over many chunks.
QUICK_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "2", "--max-num-seqs", "8"]


@contextlib.asynccontextmanager
async def router_for(
    tmp_path: Path,
    nodes: list[dict[str, Any]],
    *,
    watch: bool = False,
    router: dict | None = None,
    policy: dict | None = None,
    **config: Any,
) -> AsyncIterator[RunningRouter]:
    path = write_servers(tmp_path / "servers.toml", nodes, router=router, policy=policy, **config)
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=watch) as r:
        yield r


def client(router: RunningRouter, **kw: Any) -> AsyncOpenAI:
    # max_retries=0: the SDK's own retries would hide what the router does.
    return AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=kw.pop("timeout", 30.0), **kw)


def node_state(router: RunningRouter, name: str) -> dict[str, Any]:
    from mvllm.router.stats import load_stats_snapshot

    for n in load_stats_snapshot(router.state)["nodes"]:
        if n["name"] == name:
            return n
    raise KeyError(name)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


@contextlib.asynccontextmanager
async def engines(
    *extras: Sequence[str], model: str = MODEL, env: dict[str, str] | None = None
) -> AsyncIterator[list[RunningSim]]:
    """The engines `sims` would start, served in this event loop instead (no process start-up): the
    same flags give the same SimConfig. For tests that need an engine, not a process to kill."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    started: list[RunningSim] = []
    try:
        for extra in extras:
            config = config_from_args(parser.parse_args([model, *QUICK_SIM, *extra]), {**os.environ, **(env or {})})
            started.append(await start_sim(config))
        yield started
    finally:
        for sim in started:
            await sim.close()


@contextlib.contextmanager
def sims(
    tmp_path: Path, *extras: Sequence[str], model: str = MODEL, env: dict[str, str] | None = None
) -> Iterator[list[Sim]]:
    """Start one `mvllm sim serve` per `extras` entry, all at once, and wait until each is healthy."""
    started: list[tuple[Proc, int]] = []
    try:
        for i, extra in enumerate(extras):
            port = free_port()
            args = ["sim", "serve", model, "--host", "127.0.0.1", "--port", str(port), *QUICK_SIM, *extra]
            started.append((Proc(args, tmp_path / f"sim{i}-{port}.log", env or {}).start(), port))
        for proc, port in started:
            try:
                wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc.popen)
            except BaseException:
                print(proc.log()[-4000:], file=sys.stderr)
                raise
        yield [Sim(proc, port, model) for proc, port in started]
    finally:
        for proc, _ in started:
            proc.stop()
