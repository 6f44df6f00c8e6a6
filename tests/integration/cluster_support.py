"""Helpers of the multi-router tests: servers.toml with `[cluster] redis_url` and a keys file, and
several `mvllm run` subprocesses on one Redis (tests/redis_support.py), started at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from mvllm.common.tomlconf import load_toml
from tests.integration.security_support import RouterProc, router_process, write_keys
from tests.support import write_servers


def cluster_config(
    tmp_path: Path,
    nodes: list[dict[str, Any]],
    redis_url: str | None,
    *,
    keys: list[dict[str, Any]] | None = None,
    cluster: dict[str, Any] | None = None,
    name: str = "servers.toml",
    **config: Any,
) -> Path:
    """servers.toml (and keys.toml) for routers sharing the Redis at `redis_url`."""
    auth = None
    if keys is not None:
        write_keys(tmp_path / "keys.toml", keys)
        auth = {"keys_file": "keys.toml"}
    path = write_servers(tmp_path / name, nodes, auth=auth, **config)
    doc = load_toml(path)
    section = dict(cluster or {})
    if redis_url is not None:
        section["redis_url"] = redis_url
    if section:
        doc["cluster"] = section
    path.write_text(tomli_w.dumps(doc))
    return path


@contextlib.asynccontextmanager
async def routers(tmp_path: Path, config_path: Path, n: int = 2, **kw: Any) -> AsyncIterator[list[RouterProc]]:
    """`n` router subprocesses with one config, each on its own port."""
    async with contextlib.AsyncExitStack() as stack:
        procs = await asyncio.gather(*(stack.enter_async_context(router_process(tmp_path, config_path, **kw)) for _ in range(n)))
        yield list(procs)


async def post(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = None
        return resp.status, data


async def load_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/load-stats") as resp:
        return await resp.json()
