"""Helpers of the router's integration tests: a servers.toml writer, the real router on a free
127.0.0.1 port (in this process, so tests can look at its registry), bounded waits, clients."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from openai import AsyncOpenAI

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from tests.procs import Proc, Sim, free_port, wait_http_ok

MODEL = "sim-model"
# Short simulated timings: tests stay fast, and still stream over many chunks.
QUICK_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "2", "--max-num-seqs", "8"]

# Quick loops and a long breaker cooldown, so that ejection stays observable within a test.
FAST = {
    "scrape_interval": 0.1,
    "scrape_timeout": 0.5,
    "health_check_interval": 0.2,
    "health_check_timeout": 1.0,
    "models_refresh_interval": 0.5,
    "connect_timeout": 1.0,
    "first_byte_timeout": 10.0,
    "request_timeout": 30.0,
    "breaker_cooldown": 30.0,
    "retry_backoff_base": 0.005,
    "retry_backoff_max": 0.02,
}


def node(url: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"url": url}
    if name:
        entry["name"] = name
    entry.update(extra)
    return entry


def write_config(path: Path, nodes: list[dict[str, Any]], *, router: dict | None = None, **config: Any) -> Path:
    doc: dict[str, Any] = {"servers": {"servers": nodes}, "config": {**FAST, **config}}
    if router:
        doc["router"] = router
    # Write then rename, as editors do, so a watcher never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(tomli_w.dumps(doc).encode())
    tmp.replace(path)
    return path


@contextlib.asynccontextmanager
async def router_for(
    tmp_path: Path, nodes: list[dict[str, Any]], *, watch: bool = False, router: dict | None = None, **config: Any
) -> AsyncIterator[RunningRouter]:
    path = write_config(tmp_path / "servers.toml", nodes, router=router, **config)
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=watch) as r:
        yield r


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what or check}")
        await asyncio.sleep(interval)


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
