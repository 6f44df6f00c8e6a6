"""Scaffolding shared by the tests: fast timings for simulated engines and router loops, the
bounded waits, and the one servers.toml writer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

# A simulated engine that answers at once yet still streams token by token (SimConfig fields).
FAST_SIM: dict[str, float] = {"ttft_ms": 2.0, "itl_ms": 1.0, "prefill_ms_per_token": 0.0, "wake_ms": 0.0}
# The same for `mvllm sim serve` on a command line.
FAST_SIM_ARGS = ["--sim-ttft-ms", "2", "--sim-itl-ms", "1"]

# Quick router loops and a long breaker cooldown, so that ejection stays observable within a test.
FAST_ROUTER: dict[str, float] = {
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


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "", interval: float = 0.1) -> Any:
    """Poll `cond` until it is truthy (and return it); AssertionError once `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or cond}")
        time.sleep(interval)


async def wait_until_async(
    cond: Callable[[], Any], timeout: float = 10.0, what: str = "", interval: float = 0.05
) -> Any:
    """wait_until without blocking the event loop; `cond` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or cond}")
        await asyncio.sleep(interval)


def atomic_write(path: Path, text: str) -> Path:
    # Write then rename, as editors do, so a watcher never reads half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def node(url: str, name: str | None = None, **extra: Any) -> dict[str, Any]:
    """One static `[[servers.servers]]` entry."""
    entry: dict[str, Any] = {"url": url}
    if name:
        entry["name"] = name
    entry.update(extra)
    return entry


def write_servers(
    path: Path,
    nodes: list[dict[str, Any]] | None = None,
    *,
    agents: list[dict[str, Any]] | None = None,
    auth: dict[str, Any] | None = None,
    router: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    **config: Any,
) -> Path:
    """servers.toml with these static nodes and/or agents, FAST_ROUTER loops (`config` overrides
    them) and optional `[router]`, `[auth]` and `[policy]` tables."""
    doc: dict[str, Any] = {"config": {**FAST_ROUTER, **config}}
    if nodes is not None:
        doc["servers"] = {"servers": nodes}
    if agents is not None:
        doc["agents"] = agents
    if router:
        doc["router"] = router
    if auth is not None:
        doc["auth"] = auth
    if policy is not None:
        doc["policy"] = policy
    return atomic_write(path, tomli_w.dumps(doc))
