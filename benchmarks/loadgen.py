"""Asyncio load generator for OpenAI chat completions: closed loop (N workers) and open loop (Poisson).

One pooled aiohttp ClientSession carries every request of a run; each request yields one
`RequestRecord` (start, time to first token, end, status, error kind, serving node). Every run is
bounded by a request count and/or a duration, and every request by its own timeout.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.stats import RequestRecord, RunStats, poisson_arrivals, run_stats

NODE_HEADER = "x-mvllm-node"
_JSON = {"content-type": "application/json"}


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """The request every call of a run sends; its body is encoded once, not per request."""

    model: str
    max_tokens: int = 16
    stream: bool = True
    prompt: str = "Say something."
    path: str = "/v1/chat/completions"
    extra: tuple[tuple[str, Any], ...] = ()

    def body(self) -> bytes:
        doc: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        doc.update(self.extra)
        return json.dumps(doc).encode()


@dataclass
class LoadResult:
    """Records of one run, plus the run's own bounds (the open loop's time base is its schedule)."""

    records: list[RequestRecord]
    started: float
    finished: float
    offered: int = 0  # requests the schedule asked for (open loop); 0 for closed loop
    skipped: int = 0  # arrivals not sent because max_in_flight was reached (open loop)
    notes: list[str] = field(default_factory=list)

    def stats(self, wall_s: float | None = None) -> RunStats:
        return run_stats(self.records, wall_s)


def make_session(max_connections: int = 4096, connect_timeout: float = 5.0) -> aiohttp.ClientSession:
    """One session for a whole run. The connector's default cap of 100 connections would turn a
    1,000-stream test into a 100-stream one, so it is raised; keep-alive stays on."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=60,
        enable_cleanup_closed=False,
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
    # auto_decompress off: no answer here is compressed, and it keeps the client's cost minimal.
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def _has_content(data: bytes) -> bool:
    """True when an SSE data payload carries generated text (not the role-only first chunk)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return False
    choices = doc.get("choices") if isinstance(doc, dict) else None
    if not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict) and delta.get("content"):
        return True
    return bool(choice.get("text"))  # /v1/completions streams `text`


def _error_kind(exc: BaseException) -> str:
    # Order matters: these aiohttp classes inherit from one another.
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnect"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "broken_stream"
    if isinstance(exc, aiohttp.ClientOSError):
        return "reset"
    if isinstance(exc, aiohttp.ClientError):
        return "client_" + type(exc).__name__
    return "exc_" + type(exc).__name__


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    stream: bool,
    sink: list[RequestRecord],
    *,
    timeout: float = 60.0,
) -> None:
    """Send one chat completion and append its record to `sink` (also when cancelled: "unfinished")."""
    start = time.monotonic()
    ttft: float | None = None
    status: int | None = None
    node: str | None = None
    error: str | None = None
    try:
        # ClientTimeout.total covers connect, send and the whole body read, so a hung stream ends.
        async with session.post(url, data=body, headers=_JSON, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            status = resp.status
            node = resp.headers.get(NODE_HEADER)
            if status != 200:
                await resp.read()  # drain, so the connection goes back to the pool
                error = f"http_{status}"
            elif not stream:
                payload = await resp.read()
                ttft = time.monotonic() - start
                if b'"choices"' not in payload:
                    error = "bad_body"
            else:
                done = False
                # Read to EOF even after [DONE]: a response left unread closes its connection.
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                    elif data.startswith(b'{"error"'):
                        error = "stream_error"
                    elif ttft is None and _has_content(data):
                        ttft = time.monotonic() - start
                if error is None and not done:
                    error = "incomplete"
    except asyncio.CancelledError:
        sink.append(RequestRecord(start, time.monotonic(), ttft, status, "unfinished", node))
        raise
    except Exception as exc:
        error = _error_kind(exc)
    sink.append(RequestRecord(start, time.monotonic(), ttft, status, error, node))


async def closed_loop(
    session: aiohttp.ClientSession,
    base_url: str,
    req: ChatRequest,
    concurrency: int,
    *,
    count: int | None = None,
    duration: float | None = None,
    timeout: float = 60.0,
    ramp_s: float = 0.0,
) -> LoadResult:
    """`concurrency` workers each send a request, wait for its end, and send the next, until
    `count` requests were sent or `duration` seconds passed (at least one of them is required).
    `ramp_s` staggers the workers' first requests evenly (1,000 connects at once overflow accept
    queues and measure SYN retries, not the server)."""
    if count is None and duration is None:
        raise ValueError("closed_loop needs count or duration")
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    url = base_url.rstrip("/") + req.path
    body = req.body()
    records: list[RequestRecord] = []
    started = time.monotonic()
    deadline = started + duration if duration is not None else float("inf")
    sent = 0

    async def worker(i: int) -> None:
        nonlocal sent
        if ramp_s > 0:
            await asyncio.sleep(ramp_s * i / concurrency)
        while time.monotonic() < deadline and (count is None or sent < count):
            sent += 1
            await one_request(session, url, body, req.stream, records, timeout=timeout)

    # The outer bound: the last requests may start just before the deadline and run their timeout.
    bound = (duration if duration is not None else timeout * (count or 1)) + ramp_s + timeout + 5
    tasks = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=bound)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    return LoadResult(records, started, time.monotonic())


async def open_loop(
    session: aiohttp.ClientSession,
    base_url: str,
    req: ChatRequest,
    rate: float,
    duration: float,
    *,
    seed: int = 0,
    timeout: float = 60.0,
    drain_timeout: float = 30.0,
    max_in_flight: int = 4000,
    on_tick: Callable[[float], None] | None = None,
) -> LoadResult:
    """Requests arrive as a Poisson process of `rate`/s for `duration` s (seeded: the same seed gives
    the same schedule), whatever the answers do. After the last arrival, in-flight requests get
    `drain_timeout` s to finish; the rest are cancelled and recorded as "unfinished"."""
    url = base_url.rstrip("/") + req.path
    body = req.body()
    rng = random.Random(seed)
    schedule = poisson_arrivals(rate, duration, iter(rng.random, None))
    records: list[RequestRecord] = []
    in_flight: set[asyncio.Task[None]] = set()
    skipped = 0
    started = time.monotonic()
    for offset in schedule:
        delay = started + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if on_tick is not None:
            on_tick(offset)
        if len(in_flight) >= max_in_flight:
            skipped += 1  # the client's own safety bound, reported, never silently dropped
            continue
        task = asyncio.ensure_future(one_request(session, url, body, req.stream, records, timeout=timeout))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    remaining = started + duration - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
    if in_flight:
        _, pending = await asyncio.wait(set(in_flight), timeout=drain_timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    result = LoadResult(records, started, time.monotonic(), offered=len(schedule), skipped=skipped)
    return result
