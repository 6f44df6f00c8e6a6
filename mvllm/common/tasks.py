"""Background tasks owned by a block: the one shape every `cleanup_ctx` loop of router, agent and sim uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def background_task(coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> AsyncIterator[asyncio.Task]:
    """Run `coro` as a task for the duration of the block, then cancel it and wait until it has ended,
    so that no loop outlives the app that owns it."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
