"""Nodes never reached are not "up": with three nodes that cannot be reached (an unresolvable host,
two closed ports), /health counts none healthy, `mvllm status` says so and exits 2, and /ready
answers 503 in OpenAI form; once a live engine appears on one of those ports, /ready answers 200."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp

from mvllm.router.app import RunningRouter
from mvllm.router.appkeys import SCRAPER_KEY
from mvllm.sim.inprocess import start_sim
from tests.integration.router_support import router_for
from tests.integration.security_support import quick_sim
from tests.procs import free_port
from tests.support import node, wait_until_async


async def mvllm_status(r: RunningRouter) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mvllm", "status", "--router", r.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_unreached_nodes_are_not_up_and_ready_waits_for_one_seen_healthy(tmp_path: Path) -> None:
    closed = [free_port(), free_port()]
    nodes = [
        node("http://mvllm-no-such-host.invalid:8000", "ghost"),
        node(f"http://127.0.0.1:{closed[0]}", "c0", models=["sim-model"]),
        node(f"http://127.0.0.1:{closed[1]}", "c1", models=["sim-model"]),
    ]
    # Checks far apart: the nodes stay "unknown" (one failed check, not yet down) for the test.
    async with router_for(tmp_path, nodes, health_check_interval=30, health_check_timeout=1.0) as r, aiohttp.ClientSession() as s:
        async with s.get(r.url + "/health") as resp:
            doc = await resp.json()
            assert resp.status == 200 and doc["nodes"] == 3 and doc["healthy_nodes"] == 0, doc
        async with s.get(r.url + "/ready") as resp:
            assert resp.status == 503
            err = (await resp.json())["error"]
            assert err["code"] == "not_ready" and err["message"] and err["type"]
        code, out = await mvllm_status(r)
        assert code == 2, out
        assert "0/3" in out and "3/3" not in out, out

        # An engine comes up on one of the ports: its next check sees it, and the router is ready.
        sim = await start_sim(quick_sim(), port=closed[0])
        try:
            r.app[SCRAPER_KEY].probe_soon(r.state.registry.nodes())  # check now, not in 30 s
            t0 = time.monotonic()

            async def ready() -> bool:
                async with s.get(r.url + "/ready") as resp:
                    return resp.status == 200

            await wait_until_async(ready, timeout=15, what="/ready turns 200")
            assert time.monotonic() - t0 < 15
            code, out = await mvllm_status(r)
            assert code == 0 and "1/3" in out, out
        finally:
            await sim.close()
