"""The operator CLI (`mvllm ps/status/drain/undrain/reload`) as real subprocesses against `mvllm run`
(a subprocess too) over two `mvllm sim` engines: tables, --json, runtime drain that routing obeys,
errors for an unknown node and a bad config, an unreachable router, and the admin key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.integration.router_support import MODEL, sims
from tests.procs import REPO, Proc, free_port, wait_http_ok
from tests.support import node, write_servers

ADMIN_KEY = "sk-admin-0123456789abcdef"
USER_KEY = "sk-user-0123456789abcdefgh"


@dataclass
class Router:
    url: str
    config: Path
    nodes: list[dict]


def mvllm(*args: str, router: str | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("MVLLM_ROUTER", "MVLLM_ADMIN_KEY")}
    if router:
        full_env["MVLLM_ROUTER"] = router
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mvllm", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def start_router(tmp_path: Path, config: Path) -> Proc:
    port = free_port()
    proc = Proc(["run", "--config", str(config), "--port", str(port), "--console"], tmp_path / f"router-{port}.log").start()
    proc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        wait_http_ok(proc.url + "/health", 30, proc.popen)  # type: ignore[attr-defined]
    except BaseException:
        proc.stop()
        print(proc.log()[-3000:])
        raise
    return proc


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    tmp = tmp_path_factory.mktemp("cli-admin")
    with sims(tmp, [], []) as (a, b):
        nodes = [node(a.url, "n-a", max_concurrent_requests=8), node(b.url, "n-b", max_concurrent_requests=8)]
        # A third node drained in the file itself (its url answers nothing: it is down too).
        nodes.append(node(f"http://127.0.0.1:{free_port()}", "n-off", drain=True))
        config = write_servers(tmp / "servers.toml", nodes)
        proc = start_router(tmp, config)
        try:
            yield Router(proc.url, config, nodes)  # type: ignore[attr-defined]
        finally:
            proc.stop()


def test_ps_table_and_json(router: Router) -> None:
    out = mvllm("ps", router=router.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NODE", "KIND", "STATE", "BREAKER", "RUN/WAIT/CAP", "SCORE", "KV%", "IN-FLIGHT", "MODELS"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["n-a"].split()[1:5] == ["static", "up", "closed", "0/0/8"] and rows["n-a"].endswith(MODEL)
    assert "draining (config)" in rows["n-off"]
    model_header = lines.index(next(line for line in lines if line.startswith("MODEL")))
    assert lines[model_header + 1].split()[:3] == [MODEL, "n-a,", "n-b"]

    out = mvllm("ps", "--json", "--router", router.url)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [n["name"] for n in doc["nodes"]] == ["n-a", "n-b", "n-off"]
    assert doc["nodes"][0]["config"]["capacity"] == 8 and doc["nodes"][2]["drained_by"] == "config"
    assert doc["models"][0]["name"] == MODEL and doc["models"][0]["awake"] == ["n-a", "n-b"]


def test_status_of_a_router_and_of_no_router() -> None:
    port = free_port()
    out = mvllm("status", router=f"http://127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"router http://127.0.0.1:{port} unreachable" in out.stderr


def test_status(router: Router) -> None:
    out = mvllm("status", router=router.url + "/v1")  # a base URL with /v1, as clients have it, works too
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(f"router   {router.url}  ok  (mvllm ")
    assert "nodes    2/3 up (1 draining" in out.stdout
    assert f"config   {router.config}" in out.stdout
    doc = json.loads(mvllm("status", "--json", router=router.url).stdout)
    assert doc["health"]["status"] == "ok" and doc["health"]["nodes"] == 3


def test_drain_undrain_and_routing(router: Router) -> None:
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def answered_by(n: int, until: set[str] | None = None) -> set[str]:
        # Idle nodes are picked at random: with `until`, stop as soon as those nodes all answered.
        seen: set[str] = set()
        for _ in range(n):
            seen.add(
                c.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
                ).headers["x-mvllm-node"]
            )
            if until is not None and seen >= until:
                break
        return seen

    out = mvllm("drain", "n-b", router=router.url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("node n-b drained: no new requests go there")
    try:
        assert "up, draining (admin)" in mvllm("ps", router=router.url).stdout
        assert answered_by(12) == {"n-a"}
        again = mvllm("drain", "n-b", "--wait", "--json", router=router.url)  # idempotent; nothing in flight
        assert again.returncode == 0 and json.loads(again.stdout)["drained_by"] == "admin"
    finally:
        out = mvllm("undrain", "n-b", router=router.url)
    assert out.returncode == 0 and "takes requests again" in out.stdout
    assert answered_by(64, until={"n-a", "n-b"}) == {"n-a", "n-b"}  # random misses both: 2**-63

    out = mvllm("drain", "nope", router=router.url)
    assert out.returncode == 1
    assert out.stderr.strip() == "mvllm: error: no node named 'nope' (nodes: n-a, n-b, n-off)"
    out = mvllm("undrain", "n-off", router=router.url)  # drain = true in the file wins
    assert out.returncode == 1 and "drained by servers.toml (drain = true)" in out.stderr


def test_reload_applies_a_valid_file_and_refuses_a_bad_one(router: Router) -> None:
    original = router.config.read_text()
    try:
        router.config.write_text(original.replace("max_concurrent_requests = 8", "max_concurrent_requests = 'eight'", 1))
        out = mvllm("reload", router=router.url)
        assert out.returncode == 1
        assert "config rejected, the previous one stays" in out.stderr and "max_concurrent_requests" in out.stderr
        assert "n-b" in mvllm("ps", router=router.url).stdout  # the old config stays

        assert mvllm("drain", "n-a", router=router.url).returncode == 0
        # n-a kept as it is, n-b changed in place (weight), n-off removed.
        kept = [router.nodes[0], {**router.nodes[1], "weight": 2.0}]
        write_servers(router.config, kept)
        out = mvllm("reload", "--json", router=router.url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["nodes"] == ["n-a", "n-b"]
        nodes = {n["name"]: n for n in json.loads(mvllm("ps", "--json", router=router.url).stdout)["nodes"]}
        assert nodes["n-a"]["drained_by"] == "admin"  # a runtime drain survives the reload of its node
        assert nodes["n-b"]["weight"] == 2.0 and nodes["n-b"]["drained_by"] is None
    finally:
        router.config.write_text(original)
        mvllm("reload", router=router.url)
        mvllm("undrain", "n-a", router=router.url)


def test_admin_key_is_sent_when_keys_are_configured(tmp_path: Path) -> None:
    config = write_servers(tmp_path / "servers.toml", [node(f"http://127.0.0.1:{free_port()}", "n-x")])
    config.write_text(
        config.read_text()
        + f'\n[[auth.keys]]\nname = "ops"\nrole = "admin"\nkey = "{ADMIN_KEY}"\n'
        + f'\n[[auth.keys]]\nname = "user"\nkey = "{USER_KEY}"\n'
    )
    proc = start_router(tmp_path, config)
    try:
        url = proc.url  # type: ignore[attr-defined]
        out = mvllm("ps", router=url)
        assert out.returncode == 1 and "--key or MVLLM_ADMIN_KEY" in out.stderr
        assert mvllm("ps", "--key", USER_KEY, router=url).returncode == 1  # not an admin key
        out = mvllm("ps", "--key", ADMIN_KEY, router=url)
        assert out.returncode == 0 and "n-x" in out.stdout
        out = mvllm("drain", "n-x", router=url, env={"MVLLM_ADMIN_KEY": ADMIN_KEY})
        assert out.returncode == 0, out.stderr
        assert ADMIN_KEY not in proc.log()  # never logged
    finally:
        proc.stop()
