"""A client that asks for a large non-streamed answer and never reads it: the router's write of it is
bounded by client_timeout, after which the client's connection is dropped and the request leaves
the node's books; other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from aiohttp import web

from tests.integration.router_support import node_state, router_for
from tests.integration.security_support import chat_body, http_request, serve_app
from tests.support import node

BIG = 7 * 1024 * 1024  # under the router's 8 MiB buffer limit, far over the socket buffers


def big_engine() -> web.Application:
    body = b'{"object": "chat.completion", "choices": [{"message": {"content": "' + b"x" * BIG + b'"}}]}'

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "sim-model", "object": "model"}]})

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    return app


async def test_an_unread_non_streamed_answer_is_dropped_after_client_timeout(tmp_path: Path) -> None:
    runner, url = await serve_app(big_engine())
    try:
        async with router_for(tmp_path, [node(url, "big")], router={"client_timeout": 1.0}) as r:
            # A client with a tiny receive window that never reads.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", r.port))
            await loop.sock_sendall(sock, http_request("POST", "/v1/chat/completions", chat_body()))
            # Not a byte read for well over client_timeout (1 s): the router gives up the write.
            await asyncio.sleep(3.0)
            assert node_state(r, "big")["in_flight"] == 0
            # The client's connection is closed under it: reading now ends (after what was sent) in EOF or a reset.
            sock.setblocking(True)
            sock.settimeout(10)
            got = 0
            try:
                while chunk := sock.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
            finally:
                sock.close()
            assert got < BIG  # it never had the whole answer
    finally:
        await runner.cleanup()
