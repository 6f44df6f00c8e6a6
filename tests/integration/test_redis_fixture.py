"""The redis-server fixture itself: a real server that can be killed and restarted on its port, and
a missing binary skipped locally but failed in CI (pytest run as a subprocess to see both)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.procs import REPO
from tests.redis_support import RedisServer, ping

PROBE = "tests/integration/test_cluster_store.py::test_event_log_is_shared_and_capped"


def test_fixture_serves_kills_and_restarts(redis_server: RedisServer):
    assert ping(redis_server.port) and redis_server.url.endswith(f":{redis_server.port}/0")
    redis_server.kill()
    assert not ping(redis_server.port) and not redis_server.running
    redis_server.start()
    assert ping(redis_server.port)


def run_probe(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MVLLM_TEST_REDIS_SERVER"] = "/nonexistent/redis-server"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_redis_server_skips_locally_with_a_reason():
    result = run_probe(ci=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "redis-server not installed" in result.stdout


def test_missing_redis_server_fails_in_ci():
    result = run_probe(ci="true")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "CI must provide it" in result.stdout
