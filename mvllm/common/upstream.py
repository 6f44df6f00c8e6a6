"""The relays' HTTP/1.1 client (router/proxy.py and agent/proxy.py): keep-alive connections pooled
per origin on asyncio.Protocol, each request sent in one write, answers parsed by httptools (C).

Why not aiohttp's client: per request it runs a task to write the body and a timer per read, per
chunk a StreamReader wake-up; in the relay's profile that was a quarter of the router's CPU. Here a
body piece is handed on from `data_received` itself (`Response.pump`), joined per socket read,
with no task wake-up per piece; the consumer's coroutine only wakes at the end, on a failure, or to
wait for a slow client (backpressure: the node's socket stops being read meanwhile).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# Idle pooled connections are dropped after this many seconds, below the 5 s after which vLLM's
# uvicorn (and the sim) closes them: a request sent on a connection the engine is closing fails.
KEEPALIVE_S = 4.0
# Unread body bytes buffered before the node's socket stops being read (pull mode: readany/read).
_PULL_HIGH = 256 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class UpstreamError(OSError):
    """The node's answer failed before it was complete. `reused`: the request went out on a pooled
    connection; `answered`: some of the answer had arrived (so the node did see the request)."""

    reused: bool = False
    answered: bool = False


class UpstreamConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, name unknown)."""


class UpstreamClosedError(UpstreamError):
    """The node closed or reset the connection before its answer was complete."""


class UpstreamProtocolError(UpstreamError):
    """The node's bytes are not HTTP/1.1."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """Connect, first byte, idle read or total time ran out."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """connect: to open a connection; first_byte: until the answer begins and, until
    Response.set_read_timeout changes it, between reads; total: the whole attempt."""

    connect: float | None = None
    first_byte: float | None = None
    total: float | None = None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a node's base URL points: the pool's key, the address, TLS, the Host header, a path prefix."""

    key: tuple[str, str, int]
    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str
    prefix: str


# A sink takes one body piece (written to the client at once); False asks for a pause (the
# client's buffer is full). It may raise (the client went away): the pump raises that.
Sink = Callable[[bytes], bool]


class _Conn(asyncio.Protocol):
    """One connection to a node and the answer in progress on it."""

    __slots__ = (
        "answered", "body_bytes", "busy", "complete", "exc", "head", "headers", "headers_done", "idle_since",
        "keep_alive", "last_read", "loop", "origin", "parser", "paused", "pieces", "pool", "read_timeout",
        "read_timer", "reason", "reused", "sink", "status", "total_timer", "transport", "until_eof", "waiter",
    )

    def __init__(self, pool: Upstream, origin: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # a request is in progress on it
        self.idle_since = 0.0
        self.reused = False
        self.waiter: asyncio.Future[None] | None = None
        self.read_timer: asyncio.TimerHandle | None = None
        self.total_timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.headers_done = False
        self.complete = False
        self.until_eof = False
        self.keep_alive = True
        self.head = False
        self.answered = False
        self.exc: BaseException | None = None
        self.pieces: list[bytes] = []
        self.body_bytes = 0
        self.sink: Sink | None = None
        self.paused = False
        self.read_timeout: float | None = None
        self.last_read = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's is no asyncio.Transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for (after an answer, or on an idle connection): the stream is off.
            self._drop()
            return
        self.last_read = self.loop.time()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"the node's answer is not valid HTTP/1.1 ({exc})"))
            return
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamProtocolError("the node switched protocols"))
            return
        pieces = self.pieces
        if not pieces:
            return
        sink = self.sink
        if sink is not None and not self.complete:
            piece = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self.body_bytes = 0
            try:
                room = sink(piece)
            except Exception as exc:  # the client went away: the pump raises it
                self._fail(exc)
                return
            if not room:
                self._pause()
        else:
            if self.body_bytes > _PULL_HIGH and not self.complete:
                self._pause()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timers()
        if not self.busy:
            self.pool._forget(self)
            return
        if self.complete:
            return
        if self.headers_done and self.until_eof and exc is None:
            self.complete = True  # an answer delimited by the connection's end
            self._wake()
            return
        what = "mid-answer" if self.headers_done else "before answering"
        err = UpstreamClosedError(f"the node closed the connection {what}" + (f" ({exc})" if exc else ""))
        self._fail(err)

    def pause_writing(self) -> None:
        pass  # one request head at a time: nothing to hold back

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")  # in pieces when the status line is torn

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            return  # an interim answer (100 Continue ...): the real one follows
        self.status = status
        self.headers_done = True
        headers = self.headers
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        if self.head:
            self.complete = True
            self.keep_alive = False  # the parser would wait for the body a HEAD answer never has
        elif status in (204, 304):
            pass  # no body: the parser completes the message at once
        elif "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "").lower():
            self.until_eof = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if not self.headers_done:
            self.headers = CIMultiDict()  # the interim answer's headers are not the answer's
            self.reason = ""
            return
        self.complete = True
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        self._wake()

    # -- state changes ------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            if isinstance(exc, UpstreamError):
                exc.reused = self.reused
                exc.answered = self.answered
            self.exc = exc
        self._drop()
        self._wake()

    def _drop(self) -> None:
        """Close the connection (the node aborts a request in progress on it)."""
        self.keep_alive = False
        self._cancel_timers()
        if self.transport is not None:
            self.transport.close()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.last_read = self.loop.time()  # a paused node sends nothing: that wait is not its idleness
            if self.transport is not None:
                self.transport.resume_reading()

    def _cancel_timers(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None

    def set_read_timeout(self, seconds: float | None) -> None:
        self.read_timeout = seconds
        self.last_read = self.loop.time()
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        if seconds is not None and not self.complete:
            # One timer per `seconds`, not one per read: it looks at the time of the last read.
            self.read_timer = self.loop.call_at(self.last_read + seconds, self._read_due)

    def _read_due(self) -> None:
        self.read_timer = None
        timeout = self.read_timeout
        if timeout is None or self.complete or self.exc is not None:
            return
        now = self.loop.time()
        if self.paused:
            due = now + timeout  # waiting for the client, not for the node
        else:
            due = self.last_read + timeout
            if now >= due:
                what = "no byte of the answer" if not self.answered else "no further byte"
                self._fail(UpstreamTimeoutError(f"{what} from the node in {timeout:g} s"))
                return
        self.read_timer = self.loop.call_at(due, self._read_due)

    def _total_due(self, seconds: float) -> None:
        self.total_timer = None
        if not self.complete:
            self._fail(UpstreamTimeoutError(f"the node's answer took more than {seconds:g} s"))

    async def wait(self) -> None:
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    def finish(self) -> None:
        """The answer is all read: the connection goes back to the pool, or is closed."""
        if not self.busy:
            return
        self._cancel_timers()
        ok = self.complete and self.exc is None and self.keep_alive and not self.pieces
        self.busy = False
        if ok and self.transport is not None and not self.transport.is_closing():
            self._reset()
            self.pool._put(self)
        else:
            self._drop()


class Response:
    """A node's answer: status and headers, its body read (`read`, `readany`) or pumped to a sink."""

    __slots__ = ("_conn", "content_length", "headers", "reason", "reused", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.reused = conn.reused
        length = conn.headers.get("content-length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def at_eof(self) -> bool:
        """Whether the whole body has been handed out."""
        conn = self._conn
        return conn is None or (conn.complete and not conn.pieces)

    def set_read_timeout(self, seconds: float | None) -> None:
        """From now on each wait for the node's bytes lasts at most `seconds`."""
        if self._conn is not None:
            self._conn.set_read_timeout(seconds)

    async def readany(self) -> bytes:
        """The body bytes that have arrived (waiting for some), b"" at the end; raises
        UpstreamError when the answer broke."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            pieces = conn.pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                conn.body_bytes = 0
                if conn.complete:
                    self._done()
                else:
                    conn._resume()
                return data
            if conn.exc is not None:
                self._done()
                raise conn.exc
            if conn.complete:
                self._done()
                return b""
            await conn.wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while True:
            data = await self.readany()
            if not data:
                return b"".join(parts)
            parts.append(data)

    async def pump(self, sink: Sink, drain: Callable[[], Awaitable[None]]) -> bytes:
        """Hand each body piece to `sink` as it arrives, straight from the socket's read; when the
        sink asks for a pause, await `drain` (the client's buffer emptying) with the node's socket
        unread. Returns the answer's last piece, not given to the sink (the caller writes it with
        the end of its own answer, in one write), at the end of the body; raises what broke it."""
        conn = self._conn
        if conn is None:
            return b""
        conn.sink = sink
        try:
            while True:
                if conn.exc is not None:
                    self._done()
                    raise conn.exc
                pieces = conn.pieces
                if conn.complete:
                    last = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    pieces.clear()
                    self._done()
                    return last
                if pieces:  # arrived before the pump began
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    pieces.clear()
                    conn.body_bytes = 0
                    if not sink(data):
                        conn._pause()
                if conn.paused:
                    await drain()
                    conn._resume()
                    continue
                await conn.wait()
        finally:
            conn.sink = None

    def close(self) -> None:
        """Drop the connection: a node's request still in progress on it is aborted."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._drop()
            conn.busy = False

    def release(self) -> None:
        """Done with the answer: its connection is pooled again if it was read to its end, else closed."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish()

    def _done(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish()


class Upstream:
    """Pools of keep-alive connections, one per origin (scheme, host, port), and the requests on them."""

    def __init__(self, keepalive: float = KEEPALIVE_S) -> None:
        self.keepalive = keepalive
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._origins: dict[str, Origin] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def origin(self, base_url: str) -> Origin:
        found = self._origins.get(base_url)
        if found is None:
            parts = urlsplit(base_url)
            secure = parts.scheme == "https"
            host = parts.hostname or "127.0.0.1"
            port = parts.port or (443 if secure else 80)
            if secure and self._ssl is None:
                self._ssl = ssl.create_default_context()
            default = (secure and port == 443) or (not secure and port == 80)
            shown = f"[{host}]" if ":" in host else host
            found = Origin(
                (parts.scheme, host, port), host, port, self._ssl if secure else None,
                shown if default else f"{shown}:{port}", parts.path.rstrip("/"),
            )
            if len(self._origins) > 4096:
                self._origins.clear()  # bounded: node URLs come from config, but configs change
            self._origins[base_url] = found
        return found

    async def request(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        timeouts: Timeouts,
    ) -> Response:
        """Send one request to `base_url` + `target` and wait for the answer's status and headers
        (up to first_byte). Raises UpstreamError (UpstreamConnectError, UpstreamClosedError, UpstreamProtocolError,
        UpstreamTimeoutError) with `reused` set; a cancelled wait drops the connection."""
        origin = self.origin(base_url)
        head = request_head(method, origin, target, headers, body)
        loop = asyncio.get_running_loop()
        conn = self._take(origin, loop)
        if conn is None:
            conn = await self._connect(origin, loop, timeouts.connect)
        conn.busy = True
        if method == "HEAD":
            conn.head = True
        if timeouts.total:
            conn.total_timer = loop.call_later(timeouts.total, conn._total_due, timeouts.total)
        assert conn.transport is not None
        conn.transport.write(head + body if body else head)
        conn.set_read_timeout(timeouts.first_byte)
        try:
            while not conn.headers_done:
                if conn.exc is not None:
                    raise conn.exc
                await conn.wait()
        except BaseException:
            conn._drop()
            conn.busy = False
            raise
        return Response(conn)

    def _take(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        idle = self._idle.get(origin.key)
        if not idle:
            return None
        now = loop.time()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closing
            transport = conn.transport
            if transport is None or transport.is_closing() or now - conn.idle_since >= self.keepalive:
                conn._drop()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, origin: Origin, loop: asyncio.AbstractEventLoop, timeout: float | None) -> _Conn:
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, origin, loop), origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeoutError(f"could not connect to {origin.host_header} within {timeout:g} s") from None
        except OSError as exc:
            raise UpstreamConnectError(f"could not connect to {origin.host_header}: {exc}") from exc
        return conn

    def _put(self, conn: _Conn) -> None:
        if self._closed:
            conn._drop()
            return
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(conn.origin.key, []).append(conn)
        if self._sweep is None:
            self._sweep = conn.loop.call_later(self.keepalive, self._expire, conn.loop)

    def _forget(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.origin.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for `keepalive` seconds, before the node closes them."""
        self._sweep = None
        now = loop.time()
        left = False
        for idle in self._idle.values():
            fresh = [c for c in idle if now - c.idle_since < self.keepalive and c.transport is not None]
            for c in idle:
                if c not in fresh:
                    c._drop()
            idle[:] = fresh
            left = left or bool(fresh)
        if left:
            oldest = min(c.idle_since for idle in self._idle.values() for c in idle)
            self._sweep = loop.call_at(oldest + self.keepalive, self._expire, loop)

    def idle_count(self, base_url: str) -> int:
        """Idle pooled connections to `base_url`'s origin."""
        return len(self._idle.get(self.origin(base_url).key, ()))

    async def close(self) -> None:
        """Close the idle connections; connections in use close when their requests end."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for conn in idle:
                conn._drop()
        self._idle.clear()


def request_head(method: str, origin: Origin, target: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The request line and headers of one request, as sent (the body follows them in the same write)."""
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in headers)
    if body or method not in _NO_BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    # One line feed per line: a header name or value holding one would smuggle a header in.
    if head.count(b"\n") != len(lines) + 1:
        raise UpstreamProtocolError("a request header holds a line break")
    return head
