"""Helpers of the security, hostile-input and fault tests: servers.toml with `[auth]` and a keys
file, the real router in this process or as a `mvllm run` subprocess, in-process sims, raw-socket
HTTP (and a normal request through it), the requests an engine counted, and an engine stand-in
that records the headers it was sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import tomli_w
from aiohttp import web

from mvllm.common.prom import iter_samples
from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from mvllm.sim.config import SimConfig
from mvllm.sim.inprocess import RunningSim, start_sim
from tests.procs import Proc, free_port
from tests.support import atomic_write, write_servers

# Keys of the tests (>= 16 printable characters, as the loader wants).
ADMIN_KEY = "sk-test-admin-0123456789abcdef"
USER_KEY = "sk-test-user-0123456789abcdef"
OTHER_KEY = "sk-test-other-0123456789abcdef"
NODE_KEY = "sk-test-node-key-0123456789"
MSG = [{"role": "user", "content": "hello"}]


def key_entry(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "key": secret, **extra}


def write_keys(path: Path, keys: list[dict[str, Any]]) -> Path:
    return atomic_write(path, tomli_w.dumps({"keys": keys}))


@contextlib.asynccontextmanager
async def auth_router(
    tmp_path: Path,
    nodes: list[dict[str, Any]],
    *,
    auth: dict[str, Any] | None = None,
    keys: list[dict[str, Any]] | None = None,
    router: dict[str, Any] | None = None,
    watch: bool = False,
    **config: Any,
) -> AsyncIterator[RunningRouter]:
    """The real router in this process on a free 127.0.0.1 port; `keys` go to keys.toml."""
    if keys is not None:
        write_keys(tmp_path / "keys.toml", keys)
        auth = {**(auth or {}), "keys_file": "keys.toml"}
    path = write_servers(tmp_path / "servers.toml", nodes, auth=auth, router=router, **config)
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=watch) as r:
        yield r


@contextlib.asynccontextmanager
async def in_process_sims(*configs: SimConfig) -> AsyncIterator[list[RunningSim]]:
    started: list[RunningSim] = []
    try:
        for cfg in configs:
            started.append(await start_sim(cfg))
        yield started
    finally:
        for sim in started:
            await sim.close()


def quick_sim(model: str = "sim-model", **kw: Any) -> SimConfig:
    return SimConfig(model=model, **{"ttft_ms": 2.0, "itl_ms": 1.0, "max_num_seqs": 64, **kw})


@dataclass
class RouterProc:
    """`mvllm run --config ... --console` as a subprocess (its own process group)."""

    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def alive(self) -> bool:
        assert self.proc.popen is not None
        return self.proc.popen.poll() is None


@contextlib.asynccontextmanager
async def router_process(
    tmp_path: Path,
    config_path: Path,
    *,
    env: dict[str, str] | None = None,
    models: int = 1,
    log_level: str = "warning",
) -> AsyncIterator[RouterProc]:
    """The router as a subprocess, ready once it lists `models` models. Waits without blocking
    this event loop, so in-process sims answer the router's first probes."""
    port = free_port()
    proc = Proc(
        ["run", "--config", str(config_path), "--console", "--port", str(port), "--log-level", log_level],
        tmp_path / f"router-{port}.log",
        env or {},
    ).start()
    try:
        await _wait_models(proc, f"http://127.0.0.1:{port}", models, timeout=30)
        yield RouterProc(proc, port)
    except BaseException:
        print(proc.log()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.stop()


async def _wait_models(proc: Proc, url: str, models: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.popen is not None
            if proc.popen.poll() is not None:
                raise RuntimeError(f"router exited with {proc.popen.returncode}")
            try:
                # /load-stats, not /v1/models: it needs no key unless [auth] protect_metrics.
                async with s.get(url + "/load-stats", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    last = resp.status
                    if resp.status == 200 and len((await resp.json())["models"]) >= models:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.05)
    raise TimeoutError(f"router at {url} not ready after {timeout}s (last: {last!r})")


# -- raw HTTP -----------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> RawResponse:
    """One HTTP/1.1 response (Content-Length or close-delimited; enough for the router's own answers)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        else:
            body = await reader.read()
        return RawResponse(status, headers, body)


async def raw_request(port: int, data: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send `data` as is on a new connection and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    headers = dict(headers or {})
    if body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    for k, v in headers.items():
        head.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chat_body(model: str = "sim-model", **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": MSG, "max_tokens": 4, **extra}).encode()


async def serves_normally(port: int, model: str = "sim-model", headers: dict[str, str] | None = None) -> None:
    """A plain chat through raw HTTP is answered: the router is unharmed by what came before."""
    resp = await raw_request(port, http_request("POST", "/v1/chat/completions", chat_body(model), headers))
    assert resp.status == 200, resp.body[:300]
    assert resp.json()["choices"][0]["message"]["content"]


# What an engine serves that is no client's request: the router's probes and scrapes.
_PROBES = ("/metrics", "/health", "/v1/models")


async def engine_requests(session: aiohttp.ClientSession, url: str, handler: str | None = None) -> float:
    """Requests the engine itself counted (its http_requests_total): on `handler`, or on any path
    but the router's probes."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        s.value
        for s in iter_samples(text, ["http_requests_total"])
        if (s.labels.get("handler") == handler if handler is not None else s.labels.get("handler") not in _PROBES)
    )


def assert_openai_error(resp: RawResponse, status: int, code: str | int | None = None) -> dict[str, Any]:
    assert resp.status == status, (resp.status, resp.body[:300])
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- an engine stand-in that records what reached it --------------------------------------------------


class RecordingNode:
    """Speaks just enough of vLLM's API (health, metrics, models, chat) and records each request's headers."""

    def __init__(self, model: str = "rec-model") -> None:
        self.model = model
        self.seen: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            text=f'vllm:num_requests_running{{model_name="{self.model}"}} 0\n'
            f'vllm:num_requests_waiting{{model_name="{self.model}"}} 0\n'
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        await request.read()
        return web.json_response(
            {
                "id": "chatcmpl-rec",
                "object": "chat.completion",
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"
