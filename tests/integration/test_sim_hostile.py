"""Hostile input at a real `mvllm sim serve` process: deep JSON, huge `n`, idle keep-alive connections."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

from tests.procs import http_get, run_sim

FAST = ["--sim-ttft-ms", "2", "--sim-itl-ms", "1"]


def post(url: str, body: bytes | dict, timeout: float = 30.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_deeply_nested_json_is_a_400_without_traceback(tmp_path):
    deep_object = b'{"model": "m", "messages": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    deep_array = b"[" * 100_000 + b"]" * 100_000
    with run_sim(tmp_path, "m", FAST) as sim:
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/embeddings"):
            for body in (deep_object, deep_array):
                status, doc = post(sim.url + path, body)
                assert status == 400, (path, doc)
                assert doc["error"]["type"] == "Bad Request" and "nested too deeply" in doc["error"]["message"]
                assert doc["error"]["code"] == 400
        status, doc = post(sim.url + "/v1/chat/completions",
                           {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200 and doc["usage"]["completion_tokens"] == 3
        log = sim.proc.log()
    assert "Traceback" not in log and "RecursionError" not in log


def test_n_above_the_limit_is_refused_as_vllm_does(tmp_path):
    msgs = [{"role": "user", "content": "hi"}]
    with run_sim(tmp_path, "m", FAST) as sim:
        status, doc = post(sim.url + "/v1/chat/completions", {"model": "m", "messages": msgs, "n": 10**9})
        assert status == 400
        assert doc["error"]["message"] == ("n must be at most 16384, got 1000000000. To increase this limit, "
                                           "set the VLLM_MAX_N_SEQUENCES environment variable.")
        assert doc["error"]["type"] == "BadRequestError"
        status, _ = post(sim.url + "/v1/completions", {"model": "m", "prompt": "x", "n": 16385})
        assert status == 400
    with run_sim(tmp_path, "m2", FAST, env={"VLLM_MAX_N_SEQUENCES": "4"}) as sim:
        status, doc = post(sim.url + "/v1/completions", {"model": "m2", "prompt": "x", "n": 5, "max_tokens": 2})
        assert status == 400 and "at most 4, got 5" in doc["error"]["message"]
        status, doc = post(sim.url + "/v1/completions", {"model": "m2", "prompt": "x", "n": 4, "max_tokens": 2})
        assert status == 200 and len(doc["choices"]) == 4 and doc["usage"]["completion_tokens"] == 8


def test_the_largest_n_never_blocks_the_event_loop(tmp_path):
    """n = 16384 with a long max_tokens is accepted, and /health keeps answering while it is planned
    and served (the sim used to plan every token of every choice before answering anything)."""
    with run_sim(tmp_path, "m", [*FAST, "--max-num-seqs", "64"]) as sim:
        result: dict = {}

        def big() -> None:
            try:
                result["r"] = post(sim.url + "/v1/completions",
                                   {"model": "m", "prompt": "x", "n": 16384, "max_tokens": 4000}, timeout=5)
            except OSError as exc:  # the client gives up: the sim aborts the request
                result["r"] = exc

        t = threading.Thread(target=big)
        t.start()
        time.sleep(0.3)
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            status, _ = http_get(sim.url + "/health", timeout=5)
            worst = max(worst, time.monotonic() - t0)
            assert status == 200
            time.sleep(0.1)
        t.join(10)
        assert worst < 1.5, f"/health took {worst:.2f} s while a request with n=16384 ran"
        # Aborted by the client's timeout; the sim is fine afterwards.
        status, doc = post(sim.url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
        assert status == 200 and doc["usage"]["completion_tokens"] == 2


def _idle_close_after(port: int, limit: float) -> float | None:
    """Seconds from a keep-alive response until the server closes the idle connection (None: open
    at `limit`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit + 2) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        s.settimeout(limit)
        try:
            while s.recv(4096):
                pass
        except TimeoutError:
            return None
        return time.monotonic() - t0


def test_idle_keepalive_connections_are_closed_like_vllm(tmp_path):
    with run_sim(tmp_path, "m", [*FAST, "--sim-keepalive-s", "0.5"]) as sim:
        took = _idle_close_after(sim.port, 5.0)
        assert took is not None and 0.3 <= took <= 2.5, took
    with run_sim(tmp_path, "m2", FAST, env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "1"}) as sim:
        took = _idle_close_after(sim.port, 6.0)
        assert took is not None and 0.8 <= took <= 3.5, took
    with run_sim(tmp_path, "m3", [*FAST, "--sim-keepalive-s", "30"]) as sim:
        assert _idle_close_after(sim.port, 2.0) is None  # an idle connection under the limit stays open
