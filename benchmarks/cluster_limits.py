"""CPU cost per request of the shared limits (ClusterStore over Redis) against the in-memory ones
(LimitSet), for the same limits: global rps, and per key rps, concurrency, tokens per minute and a
quota. One request = admit, settle the token usage, release.

    python -m benchmarks.cluster_limits [--redis-url redis://127.0.0.1:6379/0] [-n 5000]

Without --redis-url it starts a private redis-server on a free port (and stops it after).
Reports, per request: wall time, this process's CPU and the Redis server's CPU (INFO cpu).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from mvllm.router.access.limits import LimitSet, LimitSpec, QuotaSpec
from mvllm.router.access.shared import SharedLimits
from mvllm.router.cluster_scripts import QuotaCheck, RateCheck, SlotCheck, TokenCheck
from mvllm.router.cluster_store import ClusterStore

HUGE = 10**9  # limits that never deny: the cost of checking, not of refusing


@dataclass(frozen=True)
class Key:
    name: str
    limits: LimitSpec | None
    quota: QuotaSpec | None


def in_memory(n: int) -> tuple[float, float]:
    limits = LimitSet(LimitSpec(requests_per_second=HUGE, burst=HUGE))
    key = Key(
        "bench",
        LimitSpec(requests_per_second=HUGE, burst=HUGE, max_concurrent=HUGE, tokens_per_minute=HUGE),
        QuotaSpec(requests_per_day=HUGE),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        ticket = limits.ticket(key, 300)
        assert limits.admit(ticket).allowed
        limits.settle(ticket, 120)
        limits.release(ticket)
    return time.perf_counter() - wall, time.process_time() - cpu


def redis_cpu(url: str) -> float:
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def shared(url: str, n: int) -> tuple[float, float]:
    checks = [
        RateCheck("global", HUGE, HUGE),
        RateCheck("bench", HUGE, HUGE),
        SlotCheck("bench", HUGE),
        TokenCheck("bench", HUGE, 300),
        QuotaCheck("bench", requests_per_day=HUGE),
    ]
    async with ClusterStore(url, prefix="mvllm-bench:") as store:
        await store.admit(checks)  # scripts loaded, connection open: not part of the measure
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            admission = await store.admit(checks)
            assert admission.allowed
            await store.finish(admission, 120)
        return time.perf_counter() - wall, time.process_time() - cpu


async def router_path(url: str, n: int) -> tuple[float, float]:
    """What the router's gate does per request with [cluster] redis_url: SharedLimits (one ADMIT,
    one FINISH in the background) plus the local LimitSet's counting."""
    spec = LimitSpec(requests_per_second=HUGE, burst=HUGE)
    key = Key(
        "bench",
        LimitSpec(requests_per_second=HUGE, burst=HUGE, max_concurrent=HUGE, tokens_per_minute=HUGE),
        QuotaSpec(requests_per_day=HUGE),
    )
    limits = LimitSet(spec)
    async with ClusterStore(url, prefix="mvllm-bench-gate:") as store:
        gate = SharedLimits(store)
        await store.ping()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            ticket = limits.ticket(key, 300)
            outcome = await gate.admit(limits, spec, key, ticket)  # type: ignore[arg-type]
            assert outcome.decision is not None and outcome.decision.allowed and outcome.shared is not None
            limits.settle(ticket, 120)
            outcome.shared.used_tokens = 120
            limits.release(ticket)
            gate.finish(outcome.shared)
            await asyncio.sleep(0)
        await gate.drain(30)
        return time.perf_counter() - wall, time.process_time() - cpu


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError):
                    redis.Redis.from_url(url).ping()
                    break
                time.sleep(0.02)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url")
    parser.add_argument("-n", type=int, default=5000)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis())
        mem_wall, mem_cpu = in_memory(args.n)
        before = redis_cpu(url)
        red_wall, red_cpu = asyncio.run(shared(url, args.n))
        server = redis_cpu(url) - before
        before = redis_cpu(url)
        gate_wall, gate_cpu = asyncio.run(router_path(url, args.n))
        gate_server = redis_cpu(url) - before
    us = 1e6 / args.n
    print(f"requests: {args.n} (admit + settle + release; 2 scopes, 5 limits)")
    print(f"in memory (LimitSet):     wall {mem_wall * us:7.1f} us  cpu {mem_cpu * us:7.1f} us")
    print(
        f"shared (Redis, 2 trips):  wall {red_wall * us:7.1f} us  cpu {red_cpu * us:7.1f} us"
        f"  + redis-server cpu {server * us:7.1f} us"
    )
    print(
        f"router's gate (shared):   wall {gate_wall * us:7.1f} us  cpu {gate_cpu * us:7.1f} us"
        f"  + redis-server cpu {gate_server * us:7.1f} us"
    )


if __name__ == "__main__":
    main()
