"""The quick start of each tool mvllm replaces (seeds 000-004), replayed in mvllm's form as
docs/migrating.md gives it, end to end: the converted configs are read from the guide itself, with
only ports, paths and timers changed, and run by real `mvllm agent` (engine = "sim", simulated
GPUs) and `mvllm run` processes on 127.0.0.1, driven by curl-like HTTP calls, the `openai` client,
`mvllm.client` and the `mvllm` CLI as subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import random
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w
import tomllib

from mvllm.client import Client
from tests.integration.agent_support import marked_processes, pid_alive
from tests.integration.test_cli_admin import mvllm
from tests.integration.test_router_sglang import MODEL as SGLANG_MODEL
from tests.integration.test_router_sglang import FakeSGLang
from tests.procs import REPO, Proc, free_port, run_sim, wait_http_ok
from tests.support import wait_until

GUIDE = REPO / "docs" / "migrating.md"
TOKEN = "seed-quickstart-agent-token"
GIB = 1024**3
SIM = {"ttft_ms": 2, "itl_ms": 1, "weights_gib": 1}
# Router loops fast enough for a test; the guide's configs leave [config] to the defaults.
FAST_ROUTER = {"scrape_interval": 0.2, "health_check_interval": 0.5, "models_refresh_interval": 1.0}
HELLO = [{"role": "user", "content": "Hello!"}]


# -- the guide's examples -------------------------------------------------------------------------


def example(name: str) -> str:
    """The TOML block of docs/migrating.md marked `<!-- example: NAME -->`."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\s*```toml\n(.*?)```", GUIDE.read_text(), re.S)
    assert found, f"docs/migrating.md has no example {name}"
    return found.group(1)


def example_doc(name: str) -> dict[str, Any]:
    return tomllib.loads(example(name))


# -- processes --------------------------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """What curl does: one request; (status, headers, JSON body or text)."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, data=data, timeout=60) as resp:
            status, hdrs, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, exc.headers, exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


@dataclass
class AgentProc:
    proc: Proc
    url: str
    config: Path

    def state(self) -> dict[str, Any]:
        status, _, doc = http("GET", self.url + "/state", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, doc
        return doc

    def instance(self, name: str) -> dict[str, Any]:
        return next(i for i in self.state()["instances"] if i["name"] == name)

    def catalog(self, name: str) -> dict[str, Any]:
        return next(c for c in self.state()["catalog"] if c["name"] == name)


@contextlib.contextmanager
def agent_process(
    tmp_path: Path, doc: dict[str, Any], *, sim_gpus: tuple[float, ...], env: dict[str, str] | None = None
) -> Iterator[AgentProc]:
    """`mvllm agent` with a guide's agent.toml: simulated engines and GPUs, a free port, logs in tmp_path."""
    doc = copy.deepcopy(doc)
    port = free_port()
    base = random.randrange(20000, 32700, 50)  # below the ephemeral ports (32768+) that free_port and clients take
    doc.update(port=port, engine="sim", engine_port_range=[base, base + 40], log_dir=str(tmp_path / "logs"),
               poll_interval=0.2, stop_timeout=5, sim_gpus=[{"memory_gib": g} for g in sim_gpus])  # fmt: skip
    for entry in doc.get("models", {}).values():
        entry["sim"] = dict(SIM)
    if "adhoc" in doc:
        doc["adhoc"]["sim"] = dict(SIM)
    config = tmp_path / "agent.toml"
    config.write_text(tomli_w.dumps(doc))
    # An empty HF cache: memory estimates come from the catalog, not from whatever this host cached.
    hf = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "TRANSFORMERS_CACHE": str(tmp_path / "hf")}
    proc = Proc(["agent", "--config", str(config)], tmp_path / "agent.log", {"MVLLM_AGENT_TOKEN": TOKEN, **hf, **(env or {})})
    proc.start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 30, proc.popen)
        yield AgentProc(proc, f"http://127.0.0.1:{port}", config)
    except BaseException:
        print(proc.log()[-4000:])
        raise
    finally:
        proc.stop(timeout=30)
        for pid in marked_processes(proc.pid):  # safety net: no engine outlives a failing test
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)


@dataclass
class RouterProc:
    proc: Proc
    url: str


@contextlib.contextmanager
def router_process(
    tmp_path: Path, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, port: int | None = None
) -> Iterator[RouterProc]:
    """`mvllm run ARGS` listening on 127.0.0.1:PORT (MVLLM_HOST / MVLLM_PORT unless ARGS say otherwise)."""
    port = port or free_port()
    full_env = {"MVLLM_HOST": "127.0.0.1", "MVLLM_PORT": str(port), "MVLLM_AGENT_TOKEN": TOKEN, **(env or {})}
    proc = Proc(["run", *args], tmp_path / "router.log", full_env, cwd=cwd or tmp_path)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/health", 30, proc.popen)
        yield RouterProc(proc, url)
    except BaseException:
        print(proc.log()[-4000:])
        raise
    finally:
        proc.stop()


def with_agent(servers: dict[str, Any], agent: AgentProc) -> dict[str, Any]:
    """A guide's servers.toml pointed at the test's agent, with fast router loops."""
    doc = copy.deepcopy(servers)
    doc["agents"][0]["url"] = agent.url
    doc.setdefault("config", {}).update(FAST_ROUTER)
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(doc))
    return path


def models_of(base: str, headers: dict[str, str] | None = None) -> set[str]:
    status, _, doc = http("GET", base + "/v1/models", headers=headers)
    assert status == 200, doc
    return {m["id"] for m in doc["data"]}


def rank(base: str, model: str) -> str | None:
    """How the router ranks the agent for `model` (awake, loading, sleeping, fits, evict, no_room,
    unavailable), from its /load-stats: its view of the agent's last /state."""
    for node in http("GET", base + "/load-stats")[2]["nodes"]:
        for inst in (node.get("agent") or {}).get("instances", []):
            if model in (inst["name"], *inst.get("served_model_names", [])):
                return inst["router"]["rank"]
    return None


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def cli(router: RouterProc, *args: str, env: dict[str, str] | None = None) -> str:
    """`mvllm ARGS` against the router (MVLLM_ROUTER, as the guide says); its stdout, rc 0 asserted."""
    out = mvllm(*args, router=router.url, env=env)
    assert out.returncode == 0, f"mvllm {' '.join(args)}: rc {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


# -- the guide's configs ----------------------------------------------------------------------------


def test_every_converted_config_in_the_guide_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each example block of docs/migrating.md is read by mvllm's own loaders, as they are written."""
    from mvllm.agent.config import parse_config as parse_agent
    from mvllm.router.config import load_config

    monkeypatch.setenv("MVLLM_AGENT_TOKEN", TOKEN)
    names = re.findall(r"<!-- example: (\S+) -->", GUIDE.read_text())
    assert sorted({n.split("/")[0] for n in names}) == ["000", "001", "002", "003", "004"]
    for name in names:
        seed, file = name.split("/")
        folder = tmp_path / seed
        folder.mkdir(exist_ok=True)
        (folder / file).write_text(example(name))
    for name in names:
        seed, file = name.split("/")
        path = tmp_path / seed / file
        if file == "agent.toml":
            cfg = parse_agent(tomllib.loads(path.read_text()), path)
            assert cfg.token == TOKEN and (cfg.models or cfg.adhoc.max_instances), name
        elif file == "servers.toml":
            cfg = load_config(path, environ={})  # 003's names its keys file, api_keys.toml, next to it
            assert cfg.nodes, name
        else:
            assert file == "api_keys.toml", f"{name}: no loader known for it"
    keys = load_config(tmp_path / "003" / "servers.toml", environ={}).auth
    assert [(k.name, k.role, k.enabled) for k in keys.keys] == [("user1", "user", True), ("admin", "admin", True)]


# -- 000: vLLM Dynamic Proxy ---------------------------------------------------------------------------


def test_000_dynamic_proxy_on_demand_estimate_lru_idle_unload_and_client(tmp_path: Path) -> None:
    agent_doc = example_doc("000/agent.toml")
    assert agent_doc["idle_timeout"] == 300 and agent_doc["sleep_level_on_idle"] == 0
    agent_doc["idle_timeout"] = 3  # the guide's 300 s, shortened
    # The GPU of a 7B fp16 model: 24 GiB; the guide's two models do not fit on it together.
    with agent_process(tmp_path, agent_doc, sim_gpus=(24,)) as agent:
        servers = write(tmp_path / "servers.toml", with_agent(example_doc("000/servers.toml"), agent))
        # PROXY_PORT is MVLLM_PORT (router_process sets it, over the file's port = 8080).
        with router_process(tmp_path, ["--config", str(servers), "--console"]) as router:
            base = router.url
            # curl /v1/models: both catalog models, loaded or not.
            wait_until(lambda: models_of(base) == {"llama2-7b-chat", "qwen2.5-7b-instruct"}, 15, "catalog listed")
            assert all(i["state"] == "stopped" for i in agent.state()["instances"])

            # param_count 7 x fp16 and no config.json: 13.0 GiB weights + 25% KV + 2 GiB, rounded up
            # to 256 MiB = 18.5 GiB, the budget placement uses.
            est = agent.catalog("llama2-7b-chat")["memory_estimate"]
            assert est["bytes"] == int(18.5 * GIB) and "param_count 7.00B float16" in est["basis"], est

            # curl chat: the first request loads the model, then answers.
            status, headers, body = http("POST", base + "/v1/chat/completions", {"model": "llama2-7b-chat", "messages": HELLO})
            assert status == 200 and body["choices"][0]["message"]["content"], body
            assert headers["x-mvllm-node"] == "127.0.0.1:" + agent.url.rsplit(":", 1)[1]
            llama = agent.instance("llama2-7b-chat")
            assert llama["state"] == "ready"
            argv = argv_of(llama["pid"])
            assert abs(float(flag(argv, "--gpu-memory-utilization")) * 24 - 18.5) < 0.03  # the estimate, as a share (3 decimals)
            assert flag(argv, "--dtype") == "float16" and flag(argv, "--max-model-len") == "4096"

            # The client SDK of vllm_proxy, in mvllm.client's names.
            with Client(base_url=base) as client:
                answer = client.chat("llama2-7b-chat", HELLO)
                assert answer.text and answer.raw["choices"][0]["message"]["content"] == answer.text
                stream = client.chat_stream("llama2-7b-chat", [{"role": "user", "content": "讲个笑话"}])
                assert "".join(stream) and stream.finish_reason in ("stop", "length")

                # LRU: the second model does not fit next to the first, which is idle: it is stopped
                # (sleep_level_on_idle = 0, as the proxy unloaded) to make room. Asked at once, as a
                # user would: the router's last /state may still show the first one busy.
                assert client.chat("qwen2.5-7b-instruct", HELLO).text
                loaded_at = time.monotonic()
            assert agent.instance("llama2-7b-chat")["state"] == "stopped"
            assert agent.instance("qwen2.5-7b-instruct")["state"] == "ready"
            assert "evicting llama2-7b-chat" in agent.proc.log()

            # Idle unload after idle_timeout (3 s here): stopped, listed (and loadable) still.
            wait_until(lambda: agent.instance("qwen2.5-7b-instruct")["state"] == "stopped", 20, "idle unload")
            assert time.monotonic() - loaded_at >= 2.5  # not before its idle_timeout
            assert "qwen2.5-7b-instruct" in models_of(base)

            # The proxy's admin endpoints keep their paths.
            wait_until(lambda: rank(base, "llama2-7b-chat") == "fits", 10, "the router sees qwen stopped")
            status, _, doc = http("POST", base + "/admin/models/llama2-7b-chat/load")
            assert status == 200 and doc["state"] == "ready", doc
            status, _, doc = http("POST", base + "/admin/models/llama2-7b-chat/unload")
            assert status == 200 and doc["state"] == "stopped", doc


# -- 001: vllm-server -------------------------------------------------------------------------------------


def test_001_vllm_server_adhoc_instance_custom_params_by_name_expiry_and_delete(tmp_path: Path) -> None:
    agent_doc = example_doc("001/agent.toml")
    assert agent_doc["adhoc"]["default_ttl"] == 600 and agent_doc["adhoc"]["max_instances"] == 20
    dotenv = {"HF_ENDPOINT": "https://hf-mirror.example", "HTTPS_PROXY": "http://proxy.example:3128"}
    # vllm-server's .env, beside agent.toml: the agent reads it at start.
    (tmp_path / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    with agent_process(tmp_path, agent_doc, sim_gpus=(80, 80)) as agent:
        servers = write(tmp_path / "servers.toml", with_agent(example_doc("001/servers.toml"), agent))
        with router_process(tmp_path, ["--config", str(servers), "--console"]) as router:
            base = router.url
            wait_until(lambda: http("GET", base + "/load-stats")[2]["nodes"][0]["healthy"], 15, "agent up")

            # POST /instances {"model_name", "params"} -> POST /admin/instances {"model", "params"}.
            model = "NousResearch/Meta-Llama-3-8B-Instruct"
            status, headers, inst = http("POST", base + "/admin/instances", {"model": model, "params": {"dtype": "float16"}})
            assert status == 201 and inst["state"] == "ready" and inst["expires_at"], inst
            name = inst["name"]
            assert re.fullmatch(r"Meta-Llama-3-8B-Instruct-[0-9a-f]{6}", name) and headers["x-mvllm-node"] == inst["node"]
            argv = argv_of(inst["pid"])
            assert flag(argv, "--dtype") == "float16"  # the request's params over base_params' dtype = "auto"
            assert "--kv-cache-dtype=auto" in argv  # base_params (VLLM_DEFAULT_KV_CACHE_DTYPE)
            env = environ_of(inst["pid"])
            assert {k: env.get(k) for k in dotenv} == dotenv  # the .env's HF_ENDPOINT, proxies reach the engine

            # GET /instances (and one instance: its entry there).
            status, _, listing = http("GET", base + "/admin/instances")
            assert status == 200 and [i["name"] for i in listing["instances"]] == [name]
            entry = listing["instances"][0]
            assert entry["params"] == {"dtype": "float16", "kv_cache_dtype": "auto"}
            assert abs(entry["expires_at"] - entry["created_at"] - 600) < 1  # VLLM_DEFAULT_TIMEOUT

            # /proxy/{id}/v1/completions -> /v1/completions with the model (id or instance name).
            status, headers, body = http(
                "POST", base + "/v1/completions", {"model": model, "prompt": "你好，世界！", "max_tokens": 100}
            )
            assert status == 200 and body["usage"]["completion_tokens"] == 100 and body["choices"][0]["text"], body
            assert headers["x-mvllm-node"] == inst["node"]
            oai = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
            assert oai.chat.completions.create(model=name, messages=HELLO, max_tokens=4).choices[0].message.content

            # Custom params are vLLM flags from an allow-list: one the agent sets itself is refused.
            status, _, err = http("POST", base + "/admin/instances", {"model": model, "params": {"host": "0.0.0.0"}})
            assert status == 400 and "'host' is set by the agent itself" in err["error"]["message"], err

            # Expiry (VLLM_DEFAULT_TIMEOUT, per instance with ttl): the CLI's form, 2 s here.
            out = cli(router, "instance", "start", "org/short-lived", "--name", "brief", "--ttl", "2")
            assert out.startswith("brief on ") and "ready" in out, out
            assert oai.completions.create(model="brief", prompt="hi", max_tokens=2).choices[0].text
            wait_until(lambda: [i["name"] for i in http("GET", base + "/admin/instances")[2]["instances"]] == [name],
                       20, "the expired instance removed")  # fmt: skip
            with pytest.raises(openai.NotFoundError):
                oai.completions.create(model="brief", prompt="hi", max_tokens=2)

            # DELETE /instances/{id}.
            status, _, doc = http("DELETE", base + f"/admin/instances/{name}")
            assert status == 200 and doc["removed"], doc
            assert not pid_alive(inst["pid"])
            status, _, err = http("POST", base + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})
            assert status == 404 and err["error"]["code"] == "model_not_found", err
            oai.close()


# -- 002: vllama ------------------------------------------------------------------------------------------


def _ps(router: RouterProc) -> dict[str, dict[str, Any]]:
    """`mvllm ps --json`: the agent's instances by served name."""
    doc = json.loads(cli(router, "ps", "--json"))
    (agent,) = [n for n in doc["nodes"] if n.get("kind") == "agent"]
    return {i["served_model_names"][0]: i for i in agent["agent"]["instances"]}


def test_002_vllama_run_ps_start_stop_sleep_assign_logs_and_lru_eviction(tmp_path: Path) -> None:
    a, b, c = "Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B"
    # One 80 GiB GPU: 1 GiB reserve + two models at 0.4 (32 GiB each); a third has to evict one.
    with agent_process(tmp_path, example_doc("002/agent.toml"), sim_gpus=(80,)) as agent:
        servers = with_agent(example_doc("002/servers.toml"), agent)
        assert servers["router"]["port"] == 33258  # vllama serve --port 33258; a free port here
        path = write(tmp_path / "servers.toml", servers)
        with router_process(tmp_path, ["--config", str(path), "--console"]) as router:
            wait_until(lambda: models_of(router.url) == {a, b, c}, 15, "catalog listed")
            assert "1/1 up" in cli(router, "status")  # vllama info

            # The openai client "auto-starts" the model.
            oai = openai.OpenAI(base_url=router.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
            assert oai.chat.completions.create(model=a, messages=HELLO, max_tokens=4).choices[0].message.content
            out = cli(router, "load", b)  # vllama start
            assert "ready" in out, out
            ps = _ps(router)
            assert ps[a]["state"] == "ready" and ps[b]["state"] == "ready" and ps[c]["state"] == "stopped"
            assert ps[a]["last_used"] and ps[a]["last_used"] < ps[b]["last_used"]  # vllama ps: last access

            # Eviction: C evicts the least recently used (A) to sleep level 2, B keeps running.
            assert oai.chat.completions.create(model=c, messages=HELLO, max_tokens=4).choices[0].message.content
            ps = _ps(router)
            assert (ps[a]["state"], ps[a]["sleep_level"]) == ("sleeping", 2), ps[a]
            assert ps[b]["state"] == "ready" and ps[c]["state"] == "ready"
            a_pid = ps[a]["pid"]
            table = cli(router, "ps")
            assert re.search(rf"^{re.escape(a)}\s+\S+\s+\S+\(2\)", table, re.M), table  # ASLEEP column: node(2)

            out = cli(router, "sleep", b, "--level", "2")  # vllama sleep --level 2
            assert _ps(router)[b]["sleep_level"] == 2, out
            out = cli(router, "load", a)  # vllama start: wakes it
            ps = _ps(router)
            assert ps[a]["state"] == "ready" and ps[a]["pid"] == a_pid, out  # woken, not restarted
            cli(router, "unload", c)  # vllama stop
            assert _ps(router)[c]["state"] == "stopped"

            out = cli(router, "logs", a, "--tail", "20")  # ~/.vllama/logs/...: the engine's own log
            assert "starting qwen3-0.6b" in out and "mvllm sim serving Qwen/Qwen3-0.6B" in out, out

            # vllama assign: changed now and kept in agent.toml (it survives an agent restart).
            out = cli(router, "assign", a, "--gpu-memory", "0.85", "--devices", "0")
            assert "gpu_memory_utilization 0.85" in out and f"saved to {agent.config}" in out, out
            saved = tomllib.loads(agent.config.read_text())["models"]["qwen3-0.6b"]
            assert saved["gpu_memory_utilization"] == 0.85 and saved["devices"] == [0]
            oai.close()

            # Stopping the server (kill <PID>) ends every engine it started.
            engines = [i["pid"] for i in agent.state()["instances"] if i["pid"]]
            assert engines
            agent.proc.signal(signal.SIGTERM)
            assert agent.proc.popen is not None and agent.proc.popen.wait(timeout=30) == 0
            assert not any(pid_alive(p) for p in engines)


# -- 003: the vLLM proxy with keys, limits, logs and SGLang ---------------------------------------------------


async def _call(s: aiohttp.ClientSession, method: str, url: str, key: str | None = None, *, bare: bool = False,
                body: Any = None) -> tuple[int, Any, Any]:  # fmt: skip
    headers = {} if key is None else {"Authorization": key if bare else f"Bearer {key}"}
    async with s.request(method, url, json=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def test_003_vllm_proxy_keys_quota_rate_limit_logs_and_sglang(tmp_path: Path, aiohttp_server: Any) -> None:
    user_key, admin_key = "sk-your-api-key-here", "sk-your-admin-key-here"
    keys = example_doc("003/api_keys.toml")
    assert [(k["name"], k.get("role", "user")) for k in keys["keys"]] == [("user1", "user"), ("admin", "admin")]
    # Keys of this test: a small quota and a per-key qps, so both run out within it.
    trial, burst = "sk-trial-key-0123456789abcdef", "sk-burst-key-0123456789abcdef"
    keys["keys"] += [{"name": "trial", "key": trial, "quota": {"requests_total": 2}},
                     {"name": "bursty", "key": burst, "limits": {"requests_per_second": 1, "burst": 2}}]  # fmt: skip
    write(tmp_path / "api_keys.toml", keys)

    sglang = FakeSGLang("sglang")
    sglang_url = str((await aiohttp_server(sglang.app())).make_url("")).rstrip("/")
    # The quick start's own vLLM command line, with `mvllm sim serve` for the engine.
    vllm_cmd = ["--tokenizer-mode", "auto", "--model", "/root/sj-tmp/LLM/Qwen3-80B-A3B/", "--dtype", "bfloat16", "-tp", "6",
                "--disable-log-requests", "--gpu", "0.9", "--max-num-seqs", "512", "--served-model-name", "Qwen3-80B-A3B",
                "--enable-prefix-caching", "--sim-ttft-ms", "2", "--sim-itl-ms", "1"]  # fmt: skip
    with run_sim(tmp_path, "Qwen3-80B-A3B", vllm_cmd) as vllm:
        servers = example_doc("003/servers.toml")
        urls = {"vllm": vllm.url, "sglang": sglang_url}
        for node in servers["servers"]["servers"]:
            node["url"] = urls[node["name"]]
        servers["config"] = dict(FAST_ROUTER)
        path = write(tmp_path / "servers.toml", servers)
        with router_process(tmp_path, ["--config", str(path), "--console"]) as router:
            base = router.url
            async with aiohttp.ClientSession() as s:
                assert (await _call(s, "GET", base + "/health"))[0] == 200  # no key needed
                status, _, doc = await _call(s, "GET", base + "/v1/models")
                assert status == 401 and doc["error"]["code"] == "missing_api_key"
                deadline = time.monotonic() + 15
                while True:
                    status, _, doc = await _call(s, "GET", base + "/v1/models", user_key)
                    if status == 200 and {m["id"] for m in doc["data"]} == {"Qwen3-80B-A3B", SGLANG_MODEL}:
                        break
                    assert time.monotonic() < deadline, doc
                    await asyncio.sleep(0.1)

                # Chat with "Authorization: Bearer KEY", then the bare "Authorization: KEY".
                chat = {"model": "Qwen3-80B-A3B", "messages": HELLO}
                status, headers, doc = await _call(s, "POST", base + "/v1/chat/completions", user_key, body=chat)
                assert status == 200 and doc["choices"][0]["message"]["content"] and headers["x-mvllm-node"] == "vllm"
                status, _, doc = await _call(s, "POST", base + "/v1/chat/completions", user_key, bare=True, body=chat)
                assert status == 200, doc
                status, _, doc = await _call(s, "POST", base + "/v1/completions", user_key,
                                             body={"model": "Qwen3-80B-A3B", "prompt": "The capital of France is"})  # fmt: skip
                assert status == 200 and doc["choices"][0]["text"], doc
                # The compatible paths without /v1.
                status, _, doc = await _call(s, "POST", base + "/chat/completions", user_key, body=chat)
                assert status == 200, doc
                status, _, doc = await _call(s, "GET", base + "/models", user_key)
                assert status == 200 and len(doc["data"]) == 2

                # The SGLang backend (model_backend_mapping): its model goes to it, its load read as SGLang's.
                status, headers, doc = await _call(s, "POST", base + "/v1/chat/completions", user_key,
                                                   body={"model": SGLANG_MODEL, "messages": HELLO})  # fmt: skip
                assert status == 200 and headers["x-mvllm-node"] == "sglang" and sglang.hits == 1, doc
                sglang.running = 7
                deadline = time.monotonic() + 10
                while True:
                    stats = (await _call(s, "GET", base + "/load-stats"))[2]
                    node = next(n for n in stats["nodes"] if n["name"] == "sglang")
                    if node["running"] == 7:
                        break
                    assert time.monotonic() < deadline, node
                    await asyncio.sleep(0.1)
                assert node["scrape_error"] is None and node["capacity"] == 128

                # Quota: used up -> 429 insufficient_quota; rate limit -> 429 with Retry-After.
                for _ in range(2):
                    assert (await _call(s, "POST", base + "/v1/chat/completions", trial, body=chat))[0] == 200
                status, _, doc = await _call(s, "POST", base + "/v1/chat/completions", trial, body=chat)
                assert status == 429 and doc["error"]["code"] == "insufficient_quota", doc
                codes = [(await _call(s, "POST", base + "/v1/chat/completions", burst, body=chat))[:2] for _ in range(4)]
                limited = [h for st, h in codes if st == 429]
                assert limited and int(limited[0]["Retry-After"]) >= 1, codes

                # Admin endpoints need the admin key (user "admin" -> role "admin").
                status, _, doc = await _call(s, "GET", base + "/admin/logs/stats", user_key)
                assert status == 403 and doc["error"]["code"] == "admin_required"
                status, _, doc = await _call(s, "GET", base + "/admin/logs/stats", admin_key)
                assert status == 200, doc
                router_files = {f["name"] for f in doc["router"]["files"]}
                assert "router.log" in router_files, doc  # logs/fastapi.log -> [router] log_file
                assert (tmp_path / "logs" / "router.log").stat().st_size > 0
                status, _, doc = await _call(s, "POST", base + "/admin/logs/cleanup?days=7", admin_key)
                assert status == 200, doc
                # The seed's own names of these two routes.
                status, _, doc = await _call(s, "GET", base + "/admin/log-stats", admin_key)
                assert status == 200 and "router.log" in {f["name"] for f in doc["router"]["files"]}, doc
                status, _, doc = await _call(s, "POST", base + "/admin/clean-logs?days=7", admin_key)
                assert status == 200 and doc["router"]["days"] == 7, doc
                status, _, doc = await _call(s, "GET", base + "/admin/log-stats", user_key)
                assert status == 403 and doc["error"]["code"] == "admin_required"

                # enabled = false in the keys file, then POST /admin/reload-keys: the key is refused.
                keys["keys"][0]["enabled"] = False
                write(tmp_path / "api_keys.toml", keys)
                status, _, doc = await _call(s, "POST", base + "/admin/reload-keys", admin_key)
                assert status == 200 and doc["ok"] and "user1" in doc["keys"], doc
                status, _, doc = await _call(s, "POST", base + "/v1/chat/completions", user_key, body=chat)
                assert status == 401 and doc["error"]["code"] == "api_key_disabled", doc

                # Usage per key (the quota) in /admin/keys.
                status, _, doc = await _call(s, "GET", base + "/admin/keys", admin_key)
                usage = {k["name"]: k for k in doc["keys"]}
                assert usage["trial"]["usage"]["requests_total"] == 2 and usage["trial"]["quota_left"] == {"requests_total": 0}
                assert usage["user1"]["quota"] == {"requests_total": 10000} and usage["user1"]["usage"]["requests_total"] == 5


# -- 004: the original mvllm ---------------------------------------------------------------------------------


def test_004_original_servers_toml_unchanged_health_load_stats_chat_and_failover(tmp_path: Path) -> None:
    text = example("004/servers.toml")
    hosts = re.findall(r"http://(gpu-server-\d:\d+)", text)
    assert len(hosts) == 3
    quick = ["--served-model-name", "llama3.1:8b", "--sim-ttft-ms", "2", "--sim-itl-ms", "1"]
    with contextlib.ExitStack() as stack:
        sims = [stack.enter_context(run_sim(tmp_path, f"sim{i}", quick)) for i in range(3)]
        for host, sim in zip(hosts, sims, strict=True):
            text = text.replace(host, f"127.0.0.1:{sim.port}")  # only the host names change
        (tmp_path / "servers.toml").write_text(text)
        port = free_port()
        # `mvllm run --port PORT` in the directory of servers.toml, as the quick start does.
        with router_process(tmp_path, ["--port", str(port), "--console"], cwd=tmp_path, port=port) as router:
            base = router.url
            wait_until(lambda: http("GET", base + "/health")[2]["healthy_nodes"] == 3, 15, "three nodes healthy")
            status, _, health = http("GET", base + "/health")
            assert status == 200 and health["status"] == "ok" and health["nodes"] == 3 and health["models"] == 1

            status, _, stats = http("GET", base + "/load-stats")
            assert status == 200
            assert str(tmp_path / "servers.toml") == stats["router"]["config"]
            caps = {n["url"]: n["capacity"] for n in stats["nodes"]}
            assert caps == {s.url: c for s, c in zip(sims, (3, 5, 4), strict=True)}
            assert all(n["score"] == 0 and n["health"] == "up" for n in stats["nodes"])

            body = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "你好，请介绍一下自己"}]}
            status, headers, doc = http("POST", base + "/v1/chat/completions", body)
            assert status == 200 and doc["choices"][0]["message"]["content"] and headers["x-mvllm-node"], doc
            status, _, doc = http("POST", base + "/v1/completions", {"model": "llama3.1:8b", "prompt": "Hi", "max_tokens": 3})
            assert status == 200 and doc["choices"][0]["text"], doc
            assert models_of(base) == {"llama3.1:8b"}

            # Automatic failover: one server dies; every request is answered by the others (the
            # first ones to pick the dead server are retried elsewhere, then its breaker opens).
            sims[0].proc.kill()
            nodes = set()
            for _ in range(10):
                status, headers, doc = http("POST", base + "/v1/chat/completions", {**body, "max_tokens": 3})
                assert status == 200, doc
                nodes.add(headers["x-mvllm-node"])
            assert nodes and f"127.0.0.1:{sims[0].port}" not in nodes
