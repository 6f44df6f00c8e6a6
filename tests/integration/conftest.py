"""Fixtures shared by integration tests: a real redis-server per test (tests/redis_support.py) and
OpenAI clients of a router that are closed when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from tests.redis_support import RedisServer, require_redis_server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port; `.kill()` / `.start()` for outages."""
    server = RedisServer(require_redis_server(), tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def oai() -> AsyncIterator[Callable[..., AsyncOpenAI]]:
    """Make openai clients (router url, key); all closed at the end of the test."""
    made: list[AsyncOpenAI] = []

    def make(router_url: str, key: str = "unused") -> AsyncOpenAI:
        made.append(AsyncOpenAI(base_url=router_url + "/v1", api_key=key, max_retries=0, timeout=30))
        return made[-1]

    yield make
    for c in made:
        await c.close()
