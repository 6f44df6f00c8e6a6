"""The relays' HTTP/1.1 client (common/upstream.py) on real 127.0.0.1 sockets: against `mvllm sim`
(pool reuse and idle expiry below the engine's keep-alive, a connection the engine closed, abort on
close, backpressure) and against a server of canned bytes (framings, interim answers, bad bytes,
timeouts, a pooled connection closed as a request crosses it)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from mvllm.common.upstream import (
    Timeouts,
    Upstream,
    UpstreamClosedError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from tests.integration.router_support import MODEL, engines

T = Timeouts(connect=2, first_byte=5, total=30)
JSON = [("Content-Type", "application/json")]


def chat(max_tokens: int, stream: bool = False) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "stream": stream}
    )


async def running(up: Upstream, url: str) -> float:
    r = await up.request(url, "GET", "/metrics", [], b"", T)
    text = (await r.read()).decode()
    return sum(float(m) for m in re.findall(r"^vllm:num_requests_running\{[^}]*\} (\S+)", text, re.M))


async def test_pool_reuses_then_expires_idle_connections_before_the_engine_does():
    async with engines(["--sim-keepalive-s", "1.5"]) as (sim,):
        up = Upstream(keepalive=0.5)
        try:
            first = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(4), T)
            assert first.status == 200 and not first.reused
            assert orjson.loads(await first.read())["choices"][0]["message"]["content"]
            assert up.idle_count(sim.url) == 1  # read to its end: pooled at once
            second = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(4), T)
            assert second.reused and second.status == 200
            await second.read()
            await asyncio.sleep(0.8)  # past our keep-alive, before the engine's
            assert up.idle_count(sim.url) == 0  # closed by the sweep, not left for the engine to close
            third = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(4), T)
            assert not third.reused and third.status == 200
            await third.read()
        finally:
            await up.close()


async def test_a_connection_the_engine_closed_is_not_reused():
    async with engines(["--sim-keepalive-s", "0.3"]) as (sim,):
        up = Upstream(keepalive=10)  # longer than the engine's: the engine closes first
        try:
            r = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(2), T)
            await r.read()
            assert up.idle_count(sim.url) == 1
            await asyncio.sleep(0.8)
            assert up.idle_count(sim.url) == 0  # its close was seen: out of the pool
            r = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(2), T)
            assert r.status == 200 and not r.reused
            await r.read()
        finally:
            await up.close()


async def test_closing_mid_stream_makes_the_engine_abort():
    async with engines(["--sim-itl-ms", "20"]) as (sim,):
        up = Upstream()
        try:
            r = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(500, stream=True), T)
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            assert (await r.readany()).startswith(b"data: ")
            assert await running(up, sim.url) == 1
            r.close()
            for _ in range(50):
                if await running(up, sim.url) == 0:
                    break
                await asyncio.sleep(0.05)
            assert await running(up, sim.url) == 0
            assert up.idle_count(sim.url) == 1  # the /metrics reads' connection, not the closed one
        finally:
            await up.close()


async def test_pump_hands_on_every_piece_and_waits_for_drain_when_asked():
    async with engines(["--sim-itl-ms", "1"]) as (sim,):
        up = Upstream()
        try:
            r = await up.request(sim.url, "POST", "/v1/chat/completions", JSON, chat(60, stream=True), T)
            pieces = [await r.readany()]
            drains = 0

            def sink(data: bytes) -> bool:
                pieces.append(data)
                return False  # always "full": every piece is followed by a drain

            async def drain() -> None:
                nonlocal drains
                drains += 1
                await asyncio.sleep(0.002)

            last = await r.pump(sink, drain)
            body = b"".join(pieces) + last
            assert body.endswith(b"data: [DONE]\n\n")
            events = [e for e in body.split(b"\n\n") if e.startswith(b"data: {")]
            text = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events)
            assert text
            assert drains == len(pieces) - 1  # one drain per piece given to the sink
            assert r.at_eof() and up.idle_count(sim.url) == 1
        finally:
            await up.close()


# -- a server of canned bytes ----------------------------------------------------------------------


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    if length:
        await reader.readexactly(int(length.group(1)))
    return head


class Canned:
    """A TCP server on 127.0.0.1 whose handler writes what a test says; counts connections."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], object]) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)  # type: ignore[misc]
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client closed, or the test ended
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def canned() -> AsyncIterator[Callable[..., object]]:
    servers: list[Canned] = []

    async def start(script: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], object]) -> Canned:
        c = Canned(script)
        c.server = await asyncio.start_server(c._handle, "127.0.0.1", 0)
        servers.append(c)
        return c

    yield start
    for c in servers:
        assert c.server is not None
        c.server.close()


async def test_chunked_answer_split_anywhere_then_reused(canned):
    async def script(reader, writer, _n):
        while True:
            await _read_head(reader)
            raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            for i in range(0, len(raw), 7):  # torn at odd places
                writer.write(raw[i:i + 7])
                await writer.drain()
                await asyncio.sleep(0)

    server = await canned(script)
    up = Upstream()
    try:
        for i in range(3):
            r = await up.request(server.url, "GET", "/x", [], b"", T)
            assert r.status == 200 and r.reason == "OK" and r.headers.getall("x-a") == ["1", "2"]
            assert r.content_length is None and r.reused == (i > 0)
            assert await r.read() == b"hello world"
        assert server.connections == 1
    finally:
        await up.close()


async def test_interim_answer_skipped_and_connection_close_honoured(canned):
    async def script(reader, writer, _n):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    server = await canned(script)
    up = Upstream()
    try:
        r = await up.request(server.url, "POST", "/x", [], b"body", T)
        assert r.status == 201 and "x-interim" not in r.headers and r.content_length == 2
        assert await r.read() == b"ok"
        assert up.idle_count(server.url) == 0  # the node said close
    finally:
        await up.close()


async def test_body_delimited_by_the_connections_end(canned):
    async def script(reader, writer, _n):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()

    server = await canned(script)
    up = Upstream()
    try:
        r = await up.request(server.url, "GET", "/x", [], b"", T)
        assert await r.read() == b"part one, part two"
    finally:
        await up.close()


async def test_bad_bytes_and_cut_answers_are_errors(canned):
    async def script(reader, writer, n):
        await _read_head(reader)
        if n == 1:
            writer.write(b"SPDY/9 nonsense\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")  # then closed: cut
        await writer.drain()

    server = await canned(script)
    up = Upstream()
    try:
        with pytest.raises(UpstreamProtocolError):
            await up.request(server.url, "GET", "/x", [], b"", T)
        r = await up.request(server.url, "GET", "/x", [], b"", T)
        assert await r.readany() == b"abc"
        with pytest.raises(UpstreamClosedError) as info:
            await r.readany()
        assert info.value.answered and not info.value.reused
    finally:
        await up.close()


async def test_first_byte_idle_read_and_total_timeouts(canned):
    async def script(reader, writer, n):
        await _read_head(reader)
        if n == 1:
            await asyncio.sleep(5)  # never answers
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        await writer.drain()
        for _ in range(100 if n == 3 else 0):  # n == 3: a trickle, each piece inside the idle bound
            await asyncio.sleep(0.05)
            writer.write(b"1\r\nb\r\n")
            await writer.drain()
        await asyncio.sleep(5)

    server = await canned(script)
    up = Upstream()
    loop = asyncio.get_running_loop()
    try:
        t0 = loop.time()
        with pytest.raises(UpstreamTimeoutError):
            await up.request(server.url, "GET", "/x", [], b"", Timeouts(connect=1, first_byte=0.3))
        assert 0.25 < loop.time() - t0 < 2
        r = await up.request(server.url, "GET", "/x", [], b"", Timeouts(connect=1, first_byte=2))
        assert await r.readany() == b"a"
        r.set_read_timeout(0.3)
        t0 = loop.time()
        with pytest.raises(UpstreamTimeoutError):
            await r.read()
        assert 0.25 < loop.time() - t0 < 2
        r = await up.request(server.url, "GET", "/x", [], b"", Timeouts(connect=1, first_byte=0.3, total=0.8))
        t0 = loop.time()
        with pytest.raises(UpstreamTimeoutError):
            await r.read()  # never idle for 0.3 s, but past the total
        assert 0.6 < loop.time() - t0 < 2.5
    finally:
        await up.close()


async def test_pooled_connection_closed_as_the_request_crosses_it(canned):
    async def script(reader, writer, n):
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if n == 1:
            await _read_head(reader)  # the next request arrives, and the node closes instead
            return
        await asyncio.sleep(1)

    server = await canned(script)
    up = Upstream()
    try:
        r = await up.request(server.url, "GET", "/x", [], b"", T)
        assert await r.read() == b"ok"
        with pytest.raises(UpstreamClosedError) as info:
            await up.request(server.url, "GET", "/x", [], b"", T)
        assert info.value.reused and not info.value.answered  # safe to send again (the agent does)
        r = await up.request(server.url, "GET", "/x", [], b"", T)
        assert not r.reused and await r.read() == b"ok"
    finally:
        await up.close()
