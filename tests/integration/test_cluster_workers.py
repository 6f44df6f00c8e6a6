"""`mvllm run --workers N` as real processes: two workers on one port sharing a real redis-server
serve, show the whole router in /load-stats, hold a key's rate across both, and die with their
parent (SIGTERM or SIGKILL of it); without `[cluster] redis_url`, --workers 2 exits 2 naming it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import psutil

from tests.integration.cluster_support import cluster_config, load_stats, post
from tests.integration.security_support import ADMIN_KEY, MSG, USER_KEY, in_process_sims, key_entry, quick_sim
from tests.procs import Proc, free_port, http_get
from tests.redis_support import RedisServer
from tests.support import node, wait_until_async


def _workers_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def test_workers_2_without_redis_url_exits_2_naming_it(tmp_path: Path) -> None:
    path = cluster_config(tmp_path, [node("http://127.0.0.1:9", "a")], None)
    proc = Proc(["run", "--config", str(path), "--console", "--workers", "2", "--port", str(free_port())], tmp_path / "r.log").start()
    assert proc.popen is not None
    assert proc.popen.wait(timeout=30) == 2
    assert "[cluster] redis_url" in proc.log()
    proc.stop()


async def test_two_workers_on_one_port_serve_as_one_router_and_die_with_their_parent(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("slow", USER_KEY, limits={"requests_per_second": 5})]
    port = free_port()
    async with in_process_sims(quick_sim()) as (sim,):
        path = cluster_config(tmp_path, [node(sim.url, "a")], redis_server.url, keys=keys)
        proc = Proc(["run", "--config", str(path), "--console", "--workers", "2", "--port", str(port)], tmp_path / "r.log").start()
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:

                async def both_up() -> bool:
                    try:
                        doc = await load_stats(s, url)
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        return False
                    return len(doc.get("cluster", {}).get("routers", [])) == 2 and bool(doc["models"])

                await wait_until_async(both_up, timeout=30, interval=0.2, what="two workers in /load-stats")
                workers = _workers_of(proc.pid)
                assert len(workers) == 2
                pids = {w.pid for w in workers}
                assert {r["pid"] for r in (await load_stats(s, url))["cluster"]["routers"]} == pids

                # Connections are spread over both workers, and the key's rate holds across them.
                await asyncio.sleep(1.1)
                results = []
                for _ in range(20):  # a fresh connection each: the kernel picks a worker per connection
                    async with aiohttp.ClientSession() as one:
                        results.append(await post(one, url + "/v1/chat/completions", USER_KEY,
                                                  {"model": "sim-model", "messages": MSG, "max_tokens": 2}))  # fmt: skip
                ok = sum(1 for st, _ in results if st == 200)
                assert 5 <= ok <= 7, [st for st, _ in results]  # 5 at once, 1 more per 0.2 s spent sending

                async def both_served() -> bool:
                    routers = (await load_stats(s, url))["cluster"]["routers"]
                    taken = [r["admitted"] + r["denied"] for r in routers]
                    return sum(taken) == 20 and all(n > 0 for n in taken)

                await wait_until_async(both_served, timeout=5, interval=0.2, what="both workers took requests")

            # SIGKILL of the parent alone: the workers follow (no orphans).
            os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=10)  # type: ignore[union-attr]
            await wait_until_async(lambda: _gone(list(pids)), timeout=10, interval=0.1, what="workers gone with their parent")
        finally:
            proc.stop()


def test_a_dead_worker_is_replaced_and_sigterm_of_the_parent_stops_every_worker_and_exits_0(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    path = cluster_config(tmp_path, [node("http://127.0.0.1:9", "a")], redis_server.url)
    proc = Proc(["run", "--config", str(path), "--console", "--workers", "2", "--port", str(port)], tmp_path / "r.log").start()
    try:
        deadline = time.monotonic() + 30
        while len(_workers_of(proc.pid)) < 2 or not _answers(port):
            assert time.monotonic() < deadline, proc.log()[-3000:]
            time.sleep(0.1)
        # A worker that dies is replaced.
        first = _workers_of(proc.pid)[0].pid
        os.kill(first, signal.SIGKILL)
        while first in {w.pid for w in _workers_of(proc.pid)} or len(_workers_of(proc.pid)) < 2 or not _answers(port):
            assert time.monotonic() < deadline + 15, proc.log()[-3000:]
            time.sleep(0.1)
        assert f"(pid {first}) exited with -9: restarting it" in proc.log()
        pids = [w.pid for w in _workers_of(proc.pid)]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.popen.wait(timeout=30) == 0  # type: ignore[union-attr]
        assert _gone(pids)
    finally:
        proc.stop()


def _answers(port: int) -> bool:
    try:
        status, raw = http_get(f"http://127.0.0.1:{port}/health", timeout=1)
    except OSError:
        return False
    return status == 200 and json.loads(raw)["status"] == "ok"


def test_workers_that_cannot_listen_stop_the_router_with_status_1(tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    path = cluster_config(tmp_path, [node("http://127.0.0.1:9", "a")], redis_server.url)
    with socket.socket() as taken:  # the port held by a process without SO_REUSEPORT
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = Proc(["run", "--config", str(path), "--console", "--workers", "2", "--port", str(port)], tmp_path / "r.log").start()
        try:
            assert proc.popen is not None
            assert proc.popen.wait(timeout=60) == 1, proc.log()[-3000:]
            assert "cannot listen" in proc.log() and "stopping the router" in proc.log()
        finally:
            proc.stop()
