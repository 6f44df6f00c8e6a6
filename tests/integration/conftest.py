"""Fixtures shared by integration tests: a real redis-server per test (tests/redis_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_support import RedisServer, require_redis_server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port; `.kill()` / `.start()` for outages."""
    server = RedisServer(require_redis_server(), tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
