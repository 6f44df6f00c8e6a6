"""Starts and stops what a scenario needs: `mvllm sim` nodes, the router, nginx; loopback only.

Every process runs in its own process group with its output in a log file under the harness's
temp dir; every wait is bounded; leaving the `Harness` context (normally, on error or on Ctrl-C)
stops every group it started, SIGTERM then SIGKILL, so nothing is left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import tomli_w

from mvllm.common.prom import iter_samples

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class Unavailable(RuntimeError):
    """A part of the setup cannot run here (router not written yet, nginx not installed)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def raise_nofile_limit() -> int:
    """Lift the soft open-files limit to the hard one (children inherit it): 1,000 streams through a
    proxy hold 2,000 sockets there and 1,000 here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` every `interval` s for at most `timeout` s; True once it holds."""
    for _ in range(max(1, int(timeout / interval)) + 1):
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()


@dataclass
class Service:
    """One subprocess in its own session (so its whole process group can be signalled)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} not started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def exited(self) -> bool:
        return self.popen is None or self.popen.poll() is not None

    async def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL the group and reap it (the failover scenario's "node dies" event)."""
        self.signal_group(signal.SIGKILL)
        await wait_until(self.exited, timeout, 0.01)

    async def stop(self, timeout: float = 8.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            await wait_until(self.exited, timeout, 0.05)
        # The group may hold children even when the leader is gone: kill whatever is left.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)

    def log_tail(self, lines: int = 3) -> str:
        """The last non-empty lines of its log, on one line (what an error message should show)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
        return " | ".join(last)[-600:]


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User+system CPU seconds of a process and, unless `children` is false, its children (nginx's
    workers); 0 if it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if children else [])]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def listens_on(pid: int, port: int) -> bool:
    """Whether the process (or a child: nginx's workers) holds a listening socket on `port`.

    Ports come from `free_port`, which cannot reserve them: another program on the machine may
    take one first. Readiness is only believed when our own process owns the port."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return False
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns):
            return True
    return False


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (bytes), 0 if it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@dataclass
class SimNode:
    service: Service
    port: int
    model: str
    max_num_seqs: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class Endpoint:
    """Something clients send requests to (the router or nginx), with the pid that does the work."""

    name: str
    service: Service
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.service.pid


@dataclass(frozen=True)
class SimSpec:
    """Flags of one `mvllm sim serve` node (times in milliseconds)."""

    max_num_seqs: int = 256
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        return [
            "--max-num-seqs", str(self.max_num_seqs),
            "--sim-ttft-ms", _num(self.ttft_ms),
            "--sim-itl-ms", _num(self.itl_ms),
            "--sim-prefill-ms-per-token", _num(self.prefill_ms_per_token),
            *self.extra,
        ]  # fmt: skip


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Harness:
    """Owns a temp dir, a small HTTP session for readiness checks, and every process it starts.
    `launcher` goes before every command it starts (the relay scenario's `taskset -c 0`)."""

    def __init__(self, name: str, *, keep_logs: bool = False) -> None:
        self.name = name
        self.keep_logs = keep_logs
        self.dir = Path(tempfile.mkdtemp(prefix=f"mvllm-bench-{name}-"))
        self.services: list[Service] = []
        self.launcher: list[str] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Harness:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.stop_all()
        finally:
            if self._session is not None:
                await self._session.close()
            if not self.keep_logs:
                shutil.rmtree(self.dir, ignore_errors=True)

    async def stop_all(self) -> None:
        # Front to back (router before its nodes) so the router sees no failures while stopping.
        services, self.services = list(reversed(self.services)), []
        try:
            await asyncio.gather(*(s.stop() for s in services))
        finally:
            for s in services:  # also on cancellation half-way: no group survives
                s.signal_group(signal.SIGKILL)

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Service:
        """Start `argv` (after `launcher`) in its own session, logging to the temp dir; stopped on the way out."""
        svc = Service(name, [*self.launcher, *argv], self.dir / f"{name}.log", dict(env or {}))
        self.services.append(svc)
        return svc.start()

    async def stop(self, svc: Service) -> None:
        await svc.stop()
        with contextlib.suppress(ValueError):
            self.services.remove(svc)

    async def get(self, url: str, timeout: float = 2.0) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()

    async def post_json(self, url: str, doc: Any, timeout: float = 5.0) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.post(url, json=doc, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await resp.read()

    async def wait_ok(self, url: str, svc: Service, port: int, timeout: float = 30.0) -> None:
        """Wait until `url` answers 200 and `svc` owns `port` (not some other program that got there first)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not svc.alive:
                raise Unavailable(f"{svc.name} exited (code {svc.popen.returncode if svc.popen else '?'}): {svc.log_tail()}")
            try:
                status, _ = await self.get(url, timeout=1.0)
                if status == 200 and listens_on(svc.pid, port):
                    return
                last = status if status != 200 else f"port {port} answered but is not {svc.name}'s"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                last = exc
            await asyncio.sleep(0.05)
        raise Unavailable(f"{svc.name}: {url} not ready after {timeout:.0f}s (last: {last!r}): {svc.log_tail()}")

    # -- sims ---------------------------------------------------------------------------------

    async def start_sims(
        self, specs: Sequence[SimSpec], model: str = "bench-model", env: Mapping[str, str] | None = None
    ) -> list[SimNode]:
        """Start one `mvllm sim serve` per spec, all at once, and wait until each answers /health;
        `env` adds to their environment (VLLM_SERVER_DEV_MODE=1 mounts /reset_prefix_cache)."""
        nodes: list[SimNode] = []
        for i, spec in enumerate(specs):
            port = free_port()
            argv = [sys.executable, "-m", "mvllm", "sim", "serve", model, "--host", HOST, "--port", str(port), *spec.args()]
            svc = self.spawn(f"sim{i}-{port}", argv, env)
            nodes.append(SimNode(svc, port, model, spec.max_num_seqs))
        await asyncio.gather(*(self.wait_ok(f"{n.url}/health", n.service, n.port) for n in nodes))
        return nodes

    async def wait_idle(self, nodes: Sequence[SimNode], timeout: float = 30.0, interval: float = 0.1) -> None:
        """Wait (at most `timeout` s) until no node runs or queues anything, so one leg's backlog
        never leaks into the next."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = 0.0
            for n in nodes:
                _, body = await self.get(f"{n.url}/metrics")
                for s in iter_samples(body.decode(), ("vllm:num_requests_running", "vllm:num_requests_waiting")):
                    busy += s.value
            if busy == 0:
                return
            await asyncio.sleep(interval)

    async def set_fault(self, node: SimNode, kind: str, rate: float) -> None:
        status, body = await self.post_json(f"{node.url}/sim/fault", {"kind": kind, "rate": rate})
        if status != 200:
            raise RuntimeError(f"POST /sim/fault on {node.url} answered {status}: {body[:200]!r}")

    # -- router -------------------------------------------------------------------------------

    def write_router_config(
        self,
        nodes: Sequence[tuple[str, str, int]],
        port: int,
        *,
        policy: str = "least-score",
        config: Mapping[str, Any] | None = None,
        policy_keys: Mapping[str, Any] | None = None,
    ) -> Path:
        """servers.toml for the router: `nodes` are (name, url, capacity); `config` adds [config]
        keys, `policy_keys` [policy] keys besides its type."""
        doc: dict[str, Any] = {
            "router": {"host": HOST, "port": port},
            "config": dict(config or {}),
            "policy": {"type": policy, **(policy_keys or {})},
            "servers": {
                "servers": [{"name": n, "url": u, "max_concurrent_requests": c} for n, u, c in nodes],
            },
        }
        path = self.dir / f"servers-{port}.toml"
        path.write_bytes(tomli_w.dumps(doc).encode())
        return path

    async def start_router(
        self,
        nodes: Sequence[tuple[str, str, int]],
        *,
        policy: str = "least-score",
        config: Mapping[str, Any] | None = None,
        ready_timeout: float = 30.0,
        policy_keys: Mapping[str, Any] | None = None,
    ) -> Endpoint:
        port = free_port()
        path = self.write_router_config(nodes, port, policy=policy, config=config, policy_keys=policy_keys)
        return await self._launch_router(path, port, "router", None, ready_timeout)

    async def start_router_doc(
        self, doc: Mapping[str, Any], *, ready_timeout: float = 30.0, log_level: str | None = None, name: str = "router"
    ) -> Endpoint:
        """The router on a free port with the servers.toml `doc` (its [router] host/port set here):
        for configs start_router does not write ([[agents]], [autoscale], [auth])."""
        port = free_port()
        full = {**doc, "router": {**dict(doc.get("router") or {}), "host": HOST, "port": port}}
        path = self.dir / f"servers-{port}.toml"
        path.write_bytes(tomli_w.dumps(full).encode())
        return await self._launch_router(path, port, name, log_level, ready_timeout)

    async def _launch_router(
        self, path: Path, port: int, name: str, log_level: str | None, ready_timeout: float
    ) -> Endpoint:
        """`mvllm run --console` with the config at `path`, once its /health answers (stopped if never)."""
        argv = [sys.executable, "-m", "mvllm", "run", "--console", "--config", str(path), "--port", str(port)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        svc = self.spawn(f"{name}-{port}", argv)
        ep = Endpoint("router", svc, port)
        try:
            await self.wait_ok(f"{ep.url}/health", svc, port, ready_timeout)
        except Unavailable:
            await self.stop(svc)
            raise
        return ep

    # -- agents -------------------------------------------------------------------------------

    async def start_agent(
        self,
        name: str,
        settings: Mapping[str, Any],
        catalog: str,
        *,
        ready_timeout: float = 30.0,
        log_level: str | None = None,
    ) -> Endpoint:
        """`mvllm agent` on a free port with agent.toml = `settings` (port and log_dir set here) +
        the `catalog` text ([models.NAME] tables); ready once /health answers."""
        port = free_port()
        doc = {**settings, "port": port, "log_dir": str(self.dir / f"{name}-logs")}
        path = self.dir / f"agent-{name}.toml"
        path.write_text(tomli_w.dumps(doc) + "\n" + catalog)
        argv = [sys.executable, "-m", "mvllm", "agent", "--config", str(path)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        svc = self.spawn(f"agent-{name}", argv)
        ep = Endpoint(name, svc, port)
        await self.wait_ok(f"{ep.url}/health", svc, port, ready_timeout)
        return ep

    # -- nginx --------------------------------------------------------------------------------

    def nginx_conf(self, upstreams: Sequence[str], port: int, *, next_upstream: bool = False) -> Path:
        """A plain reverse proxy: one worker (the router is one process too), keep-alive to the
        upstreams, no buffering either way so SSE chunks pass as they come, no access log."""
        root = self.dir / f"nginx-{port}"
        root.mkdir()
        servers = "\n".join(f"        server {u.removeprefix('http://')};" for u in upstreams)
        retry = (
            "            proxy_next_upstream error timeout http_500 http_502 http_503 http_504 non_idempotent;\n"
            if next_upstream
            else "            proxy_next_upstream off;\n"
        )
        conf = f"""daemon off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    upstream backend {{
{servers}
        keepalive 512;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
{retry}        }}
    }}
}}
"""
        path = root / "nginx.conf"
        path.write_text(conf)
        return path

    async def start_nginx(self, upstreams: Sequence[str], *, next_upstream: bool = False) -> Endpoint:
        binary = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
        )
        if binary is None:
            raise Unavailable("nginx: skipped (not installed)")
        port = free_port()
        conf = self.nginx_conf(upstreams, port, next_upstream=next_upstream)
        argv = [binary, "-e", str(conf.parent / "error.log"), "-p", str(conf.parent), "-c", str(conf)]
        svc = self.spawn(f"nginx-{port}", argv)
        ep = Endpoint("nginx", svc, port)
        # nginx has no health route of its own: its own listening socket is ready.
        if await wait_until(lambda: not svc.alive or listens_on(svc.pid, port), 10.0):
            if svc.alive:
                return ep
            errors = (conf.parent / "error.log").read_text(errors="replace")[-800:]
            raise Unavailable(f"nginx exited: {svc.log_tail()} {errors}")
        await self.stop(svc)
        raise Unavailable("nginx: did not listen within 10s")


def nginx_version() -> str | None:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def router_cli_available(timeout: float = 30.0) -> tuple[bool, str]:
    """Whether `python -m mvllm run --help` works (the router is written); with the reason if not."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "mvllm", "run", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`mvllm run --help` failed: {exc}"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()
        return False, f"`mvllm run --help` exited {out.returncode}: {last[-1] if last else ''}"
    return True, ""
