"""Hostile input against the real router (in this process, or as a `mvllm run` subprocess where its
memory and pid are watched) with simulated engines on 127.0.0.1. Each case gets the right status in
OpenAI form (bytes that are not HTTP too), never a crash, and a normal request
is served right after it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from tests.integration.router_support import node_state
from tests.integration.security_support import (
    MSG,
    USER_KEY,
    assert_openai_error,
    auth_router,
    chat_body,
    engine_requests,
    http_request,
    in_process_sims,
    key_entry,
    quick_sim,
    raw_request,
    read_response,
    router_process,
    serve_app,
    serves_normally,
)
from tests.support import node, wait_until_async, write_servers

MIB = 1024 * 1024


async def test_malformed_json_wrong_types_missing_and_unknown_model(tmp_path: Path) -> None:
    async with in_process_sims(quick_sim()) as (sim,), auth_router(tmp_path, [node(sim.url, "a")]) as r:
        post = lambda body, **h: raw_request(r.port, http_request("POST", "/v1/chat/completions", body, h or None))  # noqa: E731
        cases: list[tuple[bytes, int, str]] = [
            (b"{nope", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_json"),
            (b'"just a string"', 400, "invalid_json"),
            (json.dumps({"model": 123, "messages": MSG}).encode(), 400, "invalid_model"),
            (json.dumps({"model": ["sim-model"], "messages": MSG}).encode(), 400, "invalid_model"),
            (json.dumps({"model": "", "messages": MSG}).encode(), 400, "invalid_model"),
            (json.dumps({"messages": MSG}).encode(), 400, "missing_model"),
            (json.dumps({"model": "ghost", "messages": MSG}).encode(), 404, "model_not_found"),
            # Invalid UTF-8 in the body: not JSON.
            (b'{"model": "sim-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json"),
            (b"\xff\xfe\x00{", 400, "invalid_json"),
        ]
        for body, status, code in cases:
            resp = await post(body)
            assert_openai_error(resp, status, code)
            assert resp.headers["x-mvllm-node"] == "-"
        async with aiohttp.ClientSession() as s:
            assert await engine_requests(s, sim.url) == 0  # none of the above reached the engine

            # The router checks only `model`; the engine judges the rest and its 400 comes back as is.
            for body in (
                {"model": "sim-model", "messages": "not a list"},
                {"model": "sim-model", "messages": MSG, "max_tokens": "lots"},
                {"model": "sim-model", "messages": MSG, "n": -1},
            ):
                resp = await post(json.dumps(body).encode())
                assert resp.status == 400 and resp.headers["x-mvllm-node"] == "a", resp.body
                assert "error" in resp.json()
            assert node_state(r, "a")["breaker"] == "closed"  # a bad request is never the node's fault
            assert await engine_requests(s, sim.url) == 3
            # A lone surrogate escaped in JSON is valid JSON: the router passes it on, the engine rejects
            # it as vLLM does (400 in its error shape), and that 400 comes back as is, not the node's fault.
            resp = await post(b'{"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}')
            assert resp.status == 400 and resp.headers["x-mvllm-node"] == "a", resp.body
            err = resp.json()["error"]
            assert err["type"] == "Bad Request" and "unicode" in err["message"], err
            assert await engine_requests(s, sim.url) == 4
            assert node_state(r, "a")["breaker"] == "closed"
        await serves_normally(r.port)


async def test_huge_body_is_413_before_reading_it_all_and_a_stalled_body_times_out(tmp_path: Path) -> None:
    router_cfg = {"max_body_bytes": MIB, "client_timeout": 1.0}
    async with (
        in_process_sims(quick_sim()) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], router=router_cfg) as r,
    ):
        # Content-Length of 200 MB: answered from the header, while the body is still unsent.
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {200 * MIB}\r\n\r\n"
        )
        writer.write(head.encode() + b'{"model": "sim-model", "pad": "' + b"x" * 1000)
        resp = await read_response(reader, timeout=5)
        assert_openai_error(resp, 413, "body_too_large")
        writer.close()

        # Chunked (no length to check first): cut off once past the limit, the rest never read.
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = b"x" * (64 * 1024)
        sent = 0
        for _ in range(24):  # up to 1.5 MiB, then we stop sending (no last chunk)
            writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
        await writer.drain()
        resp = await read_response(reader, timeout=5)
        assert_openai_error(resp, 413, "body_too_large")
        writer.close()

        # A body that never arrives: 408 after client_timeout, not a handler held forever.
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        t0 = time.monotonic()
        resp = await read_response(reader, timeout=10)
        assert_openai_error(resp, 408, "body_timeout")
        assert 0.8 < time.monotonic() - t0 < 8
        writer.close()
        await serves_normally(r.port)


async def test_huge_headers_and_invalid_utf8_in_headers(tmp_path: Path) -> None:
    keys = [key_entry("user", USER_KEY)]
    async with (
        in_process_sims(quick_sim()) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")], keys=keys) as r,
        aiohttp.ClientSession() as s,
    ):
        auth = {"Authorization": f"Bearer {USER_KEY}"}
        base = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        body = chat_body()
        tail = b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        auth_line = f"Authorization: Bearer {USER_KEY}\r\n".encode()
        # aiohttp's own limits (8190-byte lines and fields, 128 headers), before any handler runs:
        # answered in OpenAI form all the same (router/wire.py).
        for bad, status in (
            (base + auth_line + b"X-Big: " + b"a" * 20000 + b"\r\n" + tail, 431),
            (base + auth_line + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + tail, 431),
            (b"GET /v1/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, 400),  # a TLS hello on the HTTP port
        ):
            resp = await raw_request(r.port, bad)
            assert_openai_error(resp, status)
        # A header value that is not UTF-8 cannot be relayed: 400 in OpenAI form, nothing sent on.
        resp = await raw_request(r.port, base + auth_line + b"X-Note: caf\xe9\xff\r\n" + tail)
        assert_openai_error(resp, 400, "invalid_header")
        # Not UTF-8 in the key itself: refused like any wrong key, never a 500.
        resp = await raw_request(r.port, base + b"Authorization: Bearer sk-\xff\xfe\xfd-0123456789abcdef\r\n" + tail)
        assert resp.status in (400, 401) and "error" in resp.json()
        # Valid UTF-8 beyond ASCII is fine (relayed as is).
        resp = await raw_request(r.port, base + auth_line + "X-Note: café\r\n".encode() + tail)
        assert resp.status == 200
        assert await engine_requests(s, sim.url) == 1
        await serves_normally(r.port, headers=auth)


async def test_path_traversal_and_odd_methods_never_reach_engine_control(tmp_path: Path) -> None:
    # dev_mode: the engine has vLLM's unauthenticated /sleep, /wake_up, /collective_rpc.
    async with (
        in_process_sims(quick_sim(dev_mode=True, enable_sleep_mode=True)) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")]) as r,
        aiohttp.ClientSession() as s,
    ):
        body = json.dumps({"model": "sim-model"}).encode()
        for path in (
            "/v1/../sleep?level=1",
            "/v1/%2e%2e/sleep?level=1",
            "/v1/%2E%2E/%2e%2e/sleep?level=1",
            "/v1/..%2Fsleep?level=1",
            "/v1/%2e%2e%2fsleep?level=1",
            "/v1/chat/../../collective_rpc",
            "/v1/./chat/completions",
            "/v1/../admin/nodes",
            "/v1/%00/chat/completions",
            "/v1/chat/completions%0d%0aX-Injected:%20yes",
        ):
            resp = await raw_request(r.port, http_request("POST", path, body))
            assert_openai_error(resp, 400, "invalid_path")
        for path in ("/sleep?level=1", "/wake_up", "/collective_rpc", "/v1/load_lora_adapter", "/is_sleeping"):
            resp = await raw_request(r.port, http_request("POST", path, body))
            assert resp.status in (404, 405) and "error" in resp.json(), path
        assert await engine_requests(s, sim.url) == 0
        async with s.get(sim.url + "/is_sleeping") as resp:
            assert (await resp.json())["is_sleeping"] is False

        for method in ("TRACE", "PROPFIND", "CONNECT", "MKCOL"):
            target = "127.0.0.1:1" if method == "CONNECT" else "/v1/chat/completions"
            resp = await raw_request(r.port, http_request(method, target))
            # CONNECT host:port names no path: 404 (the router is no forward proxy).
            assert resp.status in ((404,) if method == "CONNECT" else (405,)), (method, resp)
            if resp.status == 405:
                assert "TRACE" not in resp.headers["allow"] and "POST" in resp.headers["allow"]
                assert_openai_error(resp, 405, "method_not_allowed")
        resp = await raw_request(r.port, http_request("OPTIONS", "/v1/chat/completions"))
        assert resp.status == 204 and "POST" in resp.headers["allow"]
        resp = await raw_request(r.port, b"FOO /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        # Not a method aiohttp's parser knows: refused before any handler, still 405 in OpenAI form.
        assert_openai_error(resp, 405, "method_not_allowed")
        assert "POST" in resp.headers["allow"]
        assert await engine_requests(s, sim.url) == 1  # the /is_sleeping check above, nothing else
        await serves_normally(r.port)


async def test_client_that_disconnects_mid_stream_cancels_the_engine_request(tmp_path: Path) -> None:
    async with (
        in_process_sims(quick_sim(itl_ms=20.0)) as (sim,),
        auth_router(tmp_path, [node(sim.url, "a")]) as r,
    ):
        for abort in (False, True):
            sock = socket.create_connection(("127.0.0.1", r.port))
            body = chat_body(max_tokens=1000, stream=True)
            sock.sendall(http_request("POST", "/v1/chat/completions", body))
            sock.settimeout(5)
            got = b""
            while got.count(b"data: ") < 3:
                got += await asyncio.to_thread(sock.recv, 4096)
            assert got.startswith(b"HTTP/1.1 200")
            assert sim.state.in_flight == 1
            if abort:  # RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
            await wait_until_async(lambda: sim.state.in_flight == 0, timeout=5, what="engine request aborted")
            await wait_until_async(lambda: node_state(r, "a")["in_flight"] == 0, timeout=5, what="router in-flight back to 0")
        text = r.state.metrics.render().decode()
        assert 'status="499"' in text
        await serves_normally(r.port)


# -- the router as a subprocess: its memory and its pid ------------------------------------------------


class FloodNode:
    """An engine stand-in whose stream is as fast as the reader allows (up to `total` bytes); it
    counts what it managed to write and notes when its request ended."""

    def __init__(self, total: int = 400 * MIB) -> None:
        self.total = total
        self.written = 0
        self.ended = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._ok)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_running{model_name="flood"} 0\nvllm:num_requests_waiting{model_name="flood"} 0\n')

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "flood", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
        try:
            await resp.prepare(request)
            while self.written < self.total:
                await resp.write(chunk)
                self.written += len(chunk)
            await resp.write_eof()
        finally:
            self.ended.set()
        return resp


def _slow_reader(port: int, body: bytes) -> socket.socket:
    """A client that sends its request and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(http_request("POST", "/v1/chat/completions", body))
    return sock


async def test_slow_client_that_never_reads_a_stream(tmp_path: Path) -> None:
    flood = FloodNode()
    runner, flood_url = await serve_app(flood.app())
    try:
        async with in_process_sims(quick_sim(itl_ms=0.1)) as (sim,):
            path = write_servers(
                tmp_path / "servers.toml", [node(flood_url, "flood"), node(sim.url, "sim")], router={"client_timeout": 2.0}
            )
            async with router_process(tmp_path, path, models=2) as router:
                await serves_normally(router.port)
                rss0 = router.rss()
                sock = _slow_reader(router.port, json.dumps({"model": "flood", "messages": MSG, "stream": True}).encode())
                peak = rss0
                t0 = time.monotonic()
                while not flood.ended.is_set() and time.monotonic() - t0 < 15:
                    peak = max(peak, router.rss())
                    await asyncio.sleep(0.1)
                waited = time.monotonic() - t0
                # The router stopped reading from the node once the client stopped reading: the
                # node got rid of a few MB (socket buffers), not its 400 MB ...
                assert flood.ended.is_set(), f"still running after {waited:.1f}s: {flood.written} B, rss {rss0}->{peak}"
                assert flood.written < 48 * MIB, flood.written
                # ... and dropped both sides after client_timeout (2 s) without progress.
                assert 1.5 < waited < 12
                assert peak - rss0 < 48 * MIB, (rss0, peak)
                print(f"\nslow reader: node wrote {flood.written / MIB:.1f} MiB of 400 before it stalled; "
                      f"router RSS {rss0 / MIB:.1f} -> peak {peak / MIB:.1f} MiB; dropped after {waited:.1f}s")
                sock.close()

                # An engine stream that the client never reads: the engine request ends (finished
                # into socket buffers, or cancelled with the client), nothing keeps running.
                sock = _slow_reader(router.port, chat_body(max_tokens=2000, stream=True))
                await wait_until_async(lambda: sim.state.in_flight == 1, timeout=5, what="engine request started")
                await wait_until_async(lambda: sim.state.in_flight == 0, timeout=20, what="engine request over")
                sock.close()
                await serves_normally(router.port)
                assert router.alive()
    finally:
        await runner.cleanup()


async def test_thousands_of_idle_connections(tmp_path: Path) -> None:
    async with in_process_sims(quick_sim()) as (sim,):
        path = write_servers(tmp_path / "servers.toml", [node(sim.url, "a")], router={"client_timeout": 2.0})
        async with router_process(tmp_path, path) as router:
            await serves_normally(router.port)
            proc = psutil.Process(router.pid)
            fds0 = proc.num_fds()
            gate = asyncio.Semaphore(200)
            conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

            async def open_one(i: int) -> None:
                async with gate:
                    reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
                    if i % 4 == 0:  # a quarter start a request and never finish its headers
                        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    conns.append((reader, writer))

            t0 = time.monotonic()
            await asyncio.gather(*(open_one(i) for i in range(2000)))
            assert len(conns) == 2000
            await wait_until_async(lambda: proc.num_fds() >= fds0 + 1900, timeout=10, what="router accepted them")
            # Others are still served, promptly.
            t1 = time.monotonic()
            await serves_normally(router.port)
            assert time.monotonic() - t1 < 5
            # After client_timeout the router closes every idle and half-sent connection itself.
            async def closed(reader: asyncio.StreamReader) -> bool:
                with contextlib.suppress(ConnectionError):
                    return await reader.read(1) == b""
                return True

            async with asyncio.timeout(20):
                results = await asyncio.gather(*(closed(rd) for rd, _ in conns))
            assert all(results)
            assert time.monotonic() - t0 > 1.5  # not before the timeout ran out
            await wait_until_async(lambda: proc.num_fds() < fds0 + 50, timeout=10, what="router's fds back")
            for _, w in conns:
                w.close()
            await serves_normally(router.port)
            assert router.alive()
