"""The client's side of a relayed body: pieces written straight to an aiohttp client's transport from
the node's socket read (mvllm.common.upstream.Response.pump), framed as aiohttp framed the answer's
start, with a pause asked for while the client's buffer is full."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from aiohttp import web

# What asyncio and uvloop transports default to when a transport has no limits to tell.
_DEFAULT_HIGH_WATER = 64 * 1024


class WriteWatch(Protocol):
    """A slow-client watch: `writing` while a write waits for the client, `progress` per write done."""

    writing: bool
    progress: int


class _NoWatch:
    __slots__ = ("progress", "writing")

    def __init__(self) -> None:
        self.writing = False
        self.progress = 0


class ClientSink:
    """Writes body pieces to the client of `resp` (prepared, its first bytes written through aiohttp,
    so that the head is out) and keeps the last three (the engine's usage is in them). `observe`
    sees each piece (the router's stream Transcript)."""

    __slots__ = ("chunked", "high", "observe", "tail0", "tail1", "tail2", "transport", "watch", "writer")

    def __init__(
        self,
        request: web.BaseRequest,
        resp: web.StreamResponse,
        observe: Callable[[bytes], None] | None = None,
        watch: WriteWatch | None = None,
    ) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        self.transport = transport
        self.writer = request.writer
        # aiohttp chunks an unsized answer to an HTTP/1.1 client; pieces written past it must be too.
        self.chunked = "chunked" in resp.headers.get("Transfer-Encoding", "").lower()
        limits = getattr(transport, "get_write_buffer_limits", None)
        self.high = limits()[1] if limits is not None else _DEFAULT_HIGH_WATER
        self.observe = observe
        self.watch: WriteWatch = watch if watch is not None else _NoWatch()
        self.tail0 = self.tail1 = self.tail2 = b""

    def write(self, data: bytes) -> bool:
        """Write one piece; False when the client's buffer is past its high-water mark."""
        transport = self.transport
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        self.tail0, self.tail1, self.tail2 = self.tail1, self.tail2, data
        if self.observe is not None:
            self.observe(data)
        return transport.get_write_buffer_size() <= self.high

    def keep(self, data: bytes) -> None:
        """Count a piece written through aiohttp (the first, the last) in the tail and the observer."""
        if data:
            self.tail0, self.tail1, self.tail2 = self.tail1, self.tail2, data
            if self.observe is not None:
                self.observe(data)

    def tail(self) -> bytes:
        return self.tail0 + self.tail1 + self.tail2

    async def drain(self) -> None:
        """Wait for the client to take what is buffered (the watch drops one that takes nothing)."""
        watch = self.watch
        watch.writing = True
        await self.writer.drain()
        if self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        watch.writing = False
        watch.progress += 1
