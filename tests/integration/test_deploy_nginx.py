"""deploy/nginx-mvllm.conf as shipped, in front of two real `mvllm run` routers over one sim:
a stream passes through it as SSE, both routers get traffic, and after one router is
SIGKILLed every new request still succeeds; with both routers on one Redis, nginx in front
changes nothing to the shared limits and key changes. Skipped where nginx is not installed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.cluster_support import cluster_config, post, routers
from tests.integration.router_support import MODEL, QUICK_SIM
from tests.integration.security_support import ADMIN_KEY, USER_KEY, in_process_sims, key_entry, quick_sim
from tests.procs import REPO, Proc, free_port, run_sim, wait_http_ok
from tests.redis_support import RedisServer
from tests.support import node, wait_until_async, write_servers

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed")

SHIPPED = REPO / "deploy" / "nginx-mvllm.conf"


def render(tmp: Path, port: int, routers: list[int]) -> Path:
    """The shipped file with local addresses, inside a main config that runs unprivileged in `tmp`."""
    text = SHIPPED.read_text()
    for name, router_port in zip(("router-a:8888", "router-b:8888"), routers, strict=True):
        assert name in text, f"{SHIPPED} no longer names {name}"
        text = text.replace(name, f"127.0.0.1:{router_port}")
    assert "listen 8080;" in text
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (tmp / "mvllm.conf").write_text(text)
    main = tmp / "nginx.conf"
    main.write_text(
        f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format upstreams '$request_uri $status $upstream_addr';
    access_log {tmp}/access.log upstreams;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/mvllm.conf;
}}
"""
    )
    return main


@contextlib.contextmanager
def nginx(tmp: Path, port: int, routers: list[int]) -> Iterator[subprocess.Popen]:
    assert NGINX is not None
    conf = render(tmp, port, routers)
    args = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, check.stderr
    log = open(tmp / "nginx.out", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def chat(base: str, stream: bool, max_tokens: int = 8, timeout: float = 20.0) -> tuple[int, list[bytes]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    req = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            chunks = []
            while True:
                line = resp.readline()
                if not line:
                    break
                chunks.append(line)
            return resp.status, chunks
    except urllib.error.HTTPError as exc:
        return exc.code, [exc.read()]


def upstreams(tmp: Path, at_least: int) -> list[list[str]]:
    """For each chat request nginx logged, the routers it tried, in order. nginx writes a line
    after the client has its answer, so wait (bounded) until `at_least` are there."""
    deadline = time.monotonic() + 5.0
    while True:
        out = []
        for line in (tmp / "access.log").read_text().splitlines():
            uri, _status, addrs = line.split(" ", 2)
            if uri == "/v1/chat/completions":
                out.append([a.strip() for a in addrs.split(",")])
        if len(out) >= at_least or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


def test_shipped_nginx_config_streams_and_survives_a_killed_router(tmp_path: Path) -> None:
    with run_sim(tmp_path, MODEL, QUICK_SIM) as sim:
        cfg = write_servers(tmp_path / "servers.toml", [node(sim.url, "n1")])
        ports = [free_port(), free_port()]
        routers = [
            Proc(["run", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(p)], tmp_path / f"r{p}.log")
            for p in ports
        ]
        try:
            for router in routers:
                router.start()
            for router, p in zip(routers, ports, strict=True):
                wait_http_ok(f"http://127.0.0.1:{p}/health", 30, router.popen)
            port = free_port()
            with nginx(tmp_path, port, ports):
                base = f"http://127.0.0.1:{port}"
                wait_http_ok(f"{base}/health", 20)

                # A stream arrives as SSE, chunk by chunk, ending in one [DONE].
                status, lines = chat(base, stream=True, max_tokens=16)
                assert status == 200
                events = [line for line in lines if line.startswith(b"data: ")]
                assert len(events) > 2 and events[-1].strip() == b"data: [DONE]"

                for _ in range(10):
                    assert chat(base, stream=False)[0] == 200
                served = upstreams(tmp_path, at_least=11)
                assert len(served) == 11
                # least_conn over equal routers alternates: both served.
                assert {f"127.0.0.1:{p}" for p in ports} <= {addr for addrs in served for addr in addrs}

                routers[0].kill()
                start = time.monotonic()
                results = [chat(base, stream=i % 2 == 0)[0] for i in range(20)]
                assert results == [200] * 20, results
                assert time.monotonic() - start < 20
                after = upstreams(tmp_path, at_least=31)[11:]
                # The dead router was tried (refused) and the request went on to the live one.
                assert any(addrs == [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"] for addrs in after), after
                assert all(addrs[-1] == f"127.0.0.1:{ports[1]}" for addrs in after), after
        finally:
            for router in routers:
                router.stop()


async def test_shipped_nginx_config_with_two_routers_on_one_redis_acts_as_one_router(tmp_path: Path, redis_server: RedisServer) -> None:
    """The tested config of docs/deployment-cluster.md: nginx, two routers, one Redis. A 5 rps key
    gets 5-6 of 20 requests sent at once through nginx; a key disabled through one router's admin
    API is refused by both within 2 s."""
    keys = [key_entry("admin", ADMIN_KEY, role="admin"), key_entry("slow", USER_KEY, limits={"requests_per_second": 5})]
    async with in_process_sims(quick_sim()) as (sim,):
        cfg = cluster_config(tmp_path, [node(sim.url, "n1")], redis_server.url, keys=keys)
        async with routers(tmp_path, cfg) as (r1, r2):
            port = free_port()
            with nginx(tmp_path, port, [r1.port, r2.port]):
                base = f"http://127.0.0.1:{port}"
                async with aiohttp.ClientSession() as s:
                    await wait_until_async(lambda: _ok(s, base + "/health"), timeout=20, what="nginx up")
                    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                    got = await asyncio.gather(*(post(s, base + "/v1/chat/completions", USER_KEY, body) for _ in range(20)))
                    ok = sum(1 for st, _ in got if st == 200)
                    assert 5 <= ok <= 6, [st for st, _ in got]
                    assert sum(1 for st, _ in got if st == 429) == 20 - ok
                    served = {addr for addrs in upstreams(tmp_path, at_least=20) for addr in addrs}
                    assert {f"127.0.0.1:{r1.port}", f"127.0.0.1:{r2.port}"} <= served  # both routers took some

                    async with s.post(r1.url + "/admin/keys/slow/disable", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as resp:
                        assert resp.status == 200

                    async def refused_by_both() -> bool:
                        res = await asyncio.gather(*(post(s, r.url + "/v1/chat/completions", USER_KEY, body) for r in (r1, r2)))
                        return [st for st, _ in res] == [401, 401]

                    await wait_until_async(refused_by_both, timeout=2.0, interval=0.05, what="key disabled on both routers")


async def _ok(s: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with s.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False
