"""The HTTP calls that control one engine (vLLM's endpoints, VLLM.md), and reading the tail of its log.

No policy here: the supervisor and the engine's record (mvllm.agent.process) decide when; these are the means.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp

from mvllm.agent.errors import EngineError

_CONTROL_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3, sock_connect=2)


def read_log_tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of an engine log, read from its end (blocking: use a thread)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max(4096, lines * 400)))
            data = f.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


def read_log_from(path: Path, offset: int, limit: int = 256 * 1024) -> tuple[bytes, int]:
    """What an engine log holds after `offset` (at most `limit` bytes) and the offset after it;
    from the start again when the file is shorter (rotated). Blocking: use a thread."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read(limit)
    except OSError:
        return b"", offset
    return data, offset + len(data)


def log_size(path: Path) -> int:
    """The size of an engine log now, 0 when there is none (blocking: use a thread)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


class EngineClient:
    """vLLM's HTTP endpoints as the agent uses them, over the agent's pooled session. `name` is the
    catalog name (for messages), `url` the engine's base URL."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def ready(self, url: str, served_model_names: list[str]) -> bool:
        """`/health` is 200 and one of its served names is listed by `/v1/models`."""
        try:
            async with self.session.get(f"{url}/health", timeout=_PROBE_TIMEOUT) as resp:
                if resp.status != 200:
                    return False
            async with self.session.get(f"{url}/v1/models", timeout=_PROBE_TIMEOUT) as resp:
                if resp.status != 200:
                    return False
                data = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return False
        listed = {m.get("id") for m in data.get("data", []) if isinstance(m, dict)}
        return bool(set(served_model_names) & listed)

    async def call(self, name: str, url: str, method: str, path: str, body: dict | None = None) -> str:
        try:
            async with self.session.request(method, f"{url}{path}", json=body, timeout=_CONTROL_TIMEOUT) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise EngineError(f"{name}: {method} {path} -> {resp.status} {text[:300]}")
                return text
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineError(f"{name}: {method} {path} failed: {exc!r}") from None

    async def is_sleeping(self, name: str, url: str) -> bool:
        text = await self.call(name, url, "GET", "/is_sleeping")
        try:
            return bool(json.loads(text).get("is_sleeping"))
        except (ValueError, AttributeError):
            raise EngineError(f"{name}: /is_sleeping answered {text[:200]!r}") from None

    async def expect_sleeping(self, name: str, url: str, want: bool, timeout: float = 5.0) -> None:
        """vLLM answers 200 before every worker is done (0.11's FIXME): confirm with /is_sleeping."""
        deadline = time.monotonic() + timeout
        while await self.is_sleeping(name, url) != want:
            if time.monotonic() >= deadline:
                raise EngineError(f"{name}: /is_sleeping still says {not want}")
            await asyncio.sleep(0.1)

    async def sleep(self, name: str, url: str, level: int) -> None:
        await self.call(name, url, "POST", f"/sleep?level={level}&mode=wait")
        await self.expect_sleeping(name, url, True)

    async def wake(self, name: str, url: str, level: int) -> None:
        if level == 2:
            # Level 2 discarded the weights: reallocate them, load them again, then the KV cache.
            await self.call(name, url, "POST", "/wake_up?tags=weights")
            await self.call(name, url, "POST", "/collective_rpc", {"method": "reload_weights"})
            await self.call(name, url, "POST", "/wake_up?tags=kv_cache")
        else:
            await self.call(name, url, "POST", "/wake_up")
        await self.expect_sleeping(name, url, False)

    async def load_lora(self, name: str, url: str, lora: str, path: str) -> None:
        try:
            await self.call(name, url, "POST", "/v1/load_lora_adapter", {"lora_name": lora, "lora_path": path})
        except EngineError as exc:
            if "already" not in str(exc).lower():  # vLLM: 400 "... has already been loaded"
                raise

    async def unload_lora(self, name: str, url: str, lora: str) -> None:
        await self.call(name, url, "POST", "/v1/unload_lora_adapter", {"lora_name": lora})
