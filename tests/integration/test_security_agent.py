"""The agent as a gatekeeper (real agent and engine processes on 127.0.0.1): its token is required
and checked without a 500 on odd bytes, a path cannot climb from /v1 to the engine's own control
endpoints, and the engines it starts listen on 127.0.0.1 only."""

from __future__ import annotations

import json
import socket

import psutil

from tests.integration.agent_support import TOKEN, model, running_agent


def raw(port: int, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def post(path: str, body: dict, auth: bytes | None) -> bytes:
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close",
             b"Content-Type: application/json", b"Content-Length: %d" % len(data)]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    return b"\r\n".join(lines) + b"\r\n\r\n" + data


def test_agent_token_paths_and_engines_on_loopback(tmp_path) -> None:
    with running_agent(tmp_path, model("guarded", "sleep_level_on_idle = 1")) as agent:
        chat = {"model": "guarded", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        good = f"Bearer {TOKEN}".encode()
        # Wrong tokens, including bytes that are not UTF-8: 401 in OpenAI form, never a 500.
        for auth in (None, b"Bearer " + TOKEN[:-1].encode(), good + b"x", b"Bearer \xff\xfe" + TOKEN.encode(), TOKEN.encode()):
            status, body = raw(agent.port, post("/v1/chat/completions", chat, auth))
            assert status == 401, (auth, status, body[:200])
            assert json.loads(body)["error"]["type"] == "authentication_error"
        assert agent.inst("guarded")["state"] == "stopped"  # nothing above loaded the model

        status, body = raw(agent.port, post("/v1/chat/completions", chat, good))
        assert status == 200, body[:300]
        inst = agent.inst("guarded")
        assert inst["state"] == "ready"

        # The engine URL is built from the path: a path that climbs out of /v1 is refused, even
        # with the token (the router refuses it too; this is the agent's own line of defence).
        for path in ("/v1/../sleep?level=1", "/v1/%2e%2e/sleep?level=1", "/v1/..%2Fcollective_rpc"):
            status, body = raw(agent.port, post(path, {"model": "guarded"}, good))
            assert status == 400, (path, status, body[:200])
        assert agent.inst("guarded")["state"] == "ready"

        # The engine listens on 127.0.0.1 only (vLLM's /sleep, /collective_rpc have no auth).
        engine = psutil.Process(inst["pid"])
        procs = [engine, *engine.children(recursive=True)]
        listening = [c.laddr for p in procs for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert listening, "the engine listens on no socket"
        assert all(addr.ip == "127.0.0.1" for addr in listening), listening
        assert inst["port"] in {addr.port for addr in listening}
        status, _ = raw(agent.port, post("/v1/chat/completions", chat, good))
        assert status == 200
