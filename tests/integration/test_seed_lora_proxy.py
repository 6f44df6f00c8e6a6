"""The seeds' LoRA and per-instance workflows through the router (in this process) and two real
`mvllm agent` processes (engine = "sim"), with API keys configured:

- `lora_dir` (the seed's `cache_dir` of vLLM's filesystem resolver): an adapter directory dropped
  there is listed by the router and, when a request names it, loaded into the base model's engine
  (the base loaded first);
- `POST /admin/models/{base}/lora` and the seed's `/admin/load-lora-adapter` and
  `/admin/unload-lora-adapter`: sent to every agent where the base is awake, one result per agent,
  the adapter then listed and routed; `/v1/load_lora_adapter` stays unreachable;
- `/proxy/{instance}/{path}`: an ad-hoc instance's /health, /v1/models and /metrics, admin keys only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import tomli_w

from mvllm.router.app import RunningRouter, running_router
from mvllm.router.config import load_config
from tests.integration.test_agent_adhoc import FAST_ADHOC
from tests.integration.test_agent_lifecycle import TOKEN, Agent, model
from tests.support import FAST_ROUTER

ADMIN_KEY = "sk-seed-admin-key-0123456789"
USER_KEY = "sk-seed-user-key-0123456789"


def adapter(root: Path, name: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "lb"}))
    return root / name


@contextlib.contextmanager
def two_agents(tmp_path: Path, loras: Path) -> Iterator[tuple[Agent, Agent]]:
    base = model("lb", f'lora_dir = "{loras}"\nmax_loras = 4')
    a = Agent(tmp_path, base + model("plain"), sim_gpus=(40,), top={"adhoc": FAST_ADHOC})
    b = Agent(tmp_path, base, sim_gpus=(40,))
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


@contextlib.asynccontextmanager
async def router_for(tmp_path: Path, agents: list[tuple[str, Agent]]) -> AsyncIterator[RunningRouter]:
    doc = {
        "config": {**FAST_ROUTER, "scrape_timeout": 2.0},
        "agents": [{"name": n, "url": a.url, "token": TOKEN, "load_timeout": 30} for n, a in agents],
        "auth": {"keys": [{"name": "ops", "role": "admin", "key": ADMIN_KEY}, {"name": "user", "key": USER_KEY}]},
    }
    path = tmp_path / "servers.toml"
    path.write_text(tomli_w.dumps(doc))
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
        yield r


class Http:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __call__(
        self, method: str, path: str, body: Any = None, key: str | None = ADMIN_KEY
    ) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with aiohttp.ClientSession() as s, s.request(method, self.url + path, json=body, headers=headers) as r:
            raw = await r.read()
            try:
                doc: Any = json.loads(raw)
            except ValueError:
                doc = raw.decode()
            return r.status, doc, r.headers


def by_node(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["node"]: r for r in doc["results"]}


async def listed(c: openai.AsyncOpenAI) -> dict[str, Any]:
    return {m.id: m for m in (await c.models.list()).data}


async def until_listed(c: openai.AsyncOpenAI, name: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        models = await listed(c)
        if name in models:
            return models
        assert time.monotonic() < deadline, f"{name} never listed: {sorted(models)}"
        await asyncio.sleep(0.1)


async def chat(c: openai.AsyncOpenAI, name: str) -> tuple[str, str]:
    raw = await c.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return raw.parse().choices[0].message.content or "", raw.headers.get("x-mvllm-node", "")


async def test_lora_dir_admin_lora_and_instance_proxy_through_the_router(tmp_path: Path) -> None:
    loras = tmp_path / "lora_cache"
    sql = adapter(loras, "sql-lora")
    with two_agents(tmp_path, loras) as (a, b):
        async with router_for(tmp_path, [("gpu-a", a), ("gpu-b", b)]) as router:
            http = Http(router.url)
            c = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key=USER_KEY, max_retries=0, timeout=60)
            agents = {"gpu-a": a, "gpu-b": b}

            # -- lora_dir: listed before any use (the agents' /state), loaded on the first request.
            models = await until_listed(c, "sql-lora")
            assert "sql-lora" in models and models["sql-lora"].parent == "lb", models
            assert all(ag.inst("lb")["state"] == "stopped" for ag in (a, b))
            text, where = await chat(c, "sql-lora")
            assert text and where in agents
            inst = agents[where].inst("lb")
            assert inst["state"] == "ready" and inst["loras"] == ["sql-lora"], inst
            # The engine itself has it, from the directory (the admin key reaches one engine by /proxy).
            code, doc, _ = await http("GET", f"/proxy/lb/v1/models?node={where}")
            assert code == 200, doc
            cards = {m["id"]: m for m in doc["data"]}
            assert cards["sql-lora"]["root"] == str(sql) and cards["sql-lora"]["parent"] == "lb", cards

            # A directory added later: listed within a scrape, then routed.
            adapter(loras, "new-lora")
            await until_listed(c, "new-lora")
            text, _ = await chat(c, "new-lora")
            assert text
            # A name found nowhere stays a 404.
            with pytest.raises(openai.NotFoundError):
                await chat(c, "missing-lora")
            assert a.api("POST", "/v1/chat/completions", {"model": "../lora_cache/sql-lora", "messages": []})[0] == 404

            # -- POST /admin/models/{base}/lora: every agent where the base is awake.
            for node in agents:
                code, doc, _ = await http("POST", f"/admin/models/lb/load?node={node}")
                assert code == 200 and doc["state"] == "ready", doc
            body = {"action": "load", "lora_name": "ext-lora", "lora_path": "/data/lora/ext"}
            assert (await http("POST", "/admin/models/lb/lora", body, key=None))[0] == 401
            code, doc, _ = await http("POST", "/admin/models/lb/lora", body, key=USER_KEY)
            assert code == 403 and doc["error"]["code"] == "admin_required"
            code, doc, _ = await http("POST", "/admin/models/lb/lora", body)
            assert code == 200, doc
            results = by_node(doc)
            assert set(results) == {"gpu-a", "gpu-b"} and all(r["ok"] and r["status"] == 200 for r in results.values())
            assert all("ext-lora" in r["state"]["loras"] for r in results.values()), results
            assert all("ext-lora" in ag.inst("lb")["loras"] for ag in (a, b))
            assert (await listed(c))["ext-lora"].parent == "lb"  # the router read both agents again
            seen = {(await chat(c, "ext-lora"))[1] for _ in range(12)}
            assert seen <= {"gpu-a", "gpu-b"} and seen

            # Asleep on gpu-b: a load goes to gpu-a only.
            assert (await http("POST", "/admin/models/lb/sleep?node=gpu-b"))[0] == 200
            code, doc, _ = await http("POST", "/admin/models/lb/lora", {**body, "lora_name": "awake-only", "lora_path": "/x"})
            assert code == 200 and set(by_node(doc)) == {"gpu-a"}, doc
            assert "awake-only" in a.inst("lb")["loras"] and "awake-only" not in b.state()["catalog"][0]["lora_adapters"]
            assert (await http("POST", "/admin/models/lb/wake?node=gpu-b"))[0] == 200

            # The agent's refusal comes back per agent, and as the answer's status when all refused.
            assert (await http("POST", "/admin/models/plain/load"))[0] == 200
            code, doc, _ = await http("POST", "/admin/models/plain/lora", {**body, "lora_name": "p-lora"})
            assert code == 409 and doc["error"]["code"] == 409 and "without LoRA support" in doc["error"]["message"], doc
            assert by_node(doc)["gpu-a"]["ok"] is False
            code, doc, _ = await http("POST", "/admin/models/lb/lora", {"action": "swap", "lora_name": "x"})
            assert code == 400 and doc["error"]["code"] == "invalid_parameter"
            code, doc, _ = await http("POST", "/admin/models/nope/lora", body)
            assert code == 404 and doc["error"]["code"] == "model_not_found"

            # -- The seed's aliases (vLLM's body): the base named, or the one awake base model.
            alias = {"lora_name": "sql_adapter", "lora_path": "/data/lora/sql"}
            code, doc, _ = await http("POST", "/admin/load-lora-adapter", alias)
            assert code == 400 and doc["error"]["code"] == "base_model_required", doc  # lb and plain awake
            assert "lb, plain" in doc["error"]["message"]
            code, doc, _ = await http("POST", "/admin/load-lora-adapter", {**alias, "base_model_name": "lb"})
            assert code == 200 and set(by_node(doc)) == {"gpu-a", "gpu-b"}, doc
            assert (await http("POST", "/admin/models/plain/unload"))[0] == 200
            code, doc, _ = await http("POST", "/admin/load-lora-adapter", {"lora_name": "one-base", "lora_path": "/l/1"})
            assert code == 200 and doc["base"] == "lb" and len(doc["results"]) == 2, doc
            assert {"sql_adapter", "one-base"} <= set(await listed(c))
            text, _ = await chat(c, "sql_adapter")
            assert text
            code, doc, _ = await http("POST", "/admin/load-lora-adapter", alias, key=USER_KEY)
            assert code == 403
            code, doc, _ = await http("POST", "/admin/unload-lora-adapter", {"lora_name": "sql_adapter"})
            assert code == 200 and set(by_node(doc)) == {"gpu-a", "gpu-b"}, doc
            assert all("sql_adapter" not in ag.inst("lb")["loras"] for ag in (a, b))
            assert "sql_adapter" not in await listed(c)
            with pytest.raises(openai.NotFoundError):
                await chat(c, "sql_adapter")
            code, doc, _ = await http("POST", "/admin/unload-lora-adapter", {"lora_name": "sql_adapter"})
            assert code == 404 and doc["error"]["code"] == "lora_not_found"
            # vLLM's own LoRA endpoints stay unreachable through the router, admin key or not.
            for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                code, doc, _ = await http("POST", path, alias)
                assert code == 404, (path, doc)
            assert "sql_adapter" not in a.inst("lb")["loras"]

            # -- /proxy/{instance}/{path}: an ad-hoc instance's model-less paths, admin keys only.
            code, doc, _ = await http("POST", "/admin/instances", {"model": "org/adhoc", "name": "ra", "node": "gpu-a"})
            assert code == 201 and doc["state"] == "ready", doc
            code, doc, headers = await http("GET", "/proxy/ra/health")
            assert code == 200 and headers["x-mvllm-node"] == "gpu-a"
            code, doc, _ = await http("GET", "/proxy/ra/v1/models")
            assert code == 200 and [m["id"] for m in doc["data"]][:1] == ["ra"], doc
            code, text_doc, headers = await http("GET", "/proxy/ra/metrics")
            assert code == 200 and "vllm:num_requests_running" in text_doc and headers["Content-Type"].startswith("text/plain")
            assert 'model_name="ra"' in text_doc and 'model_name="lb"' not in text_doc  # that engine only
            for method, path, status in (
                ("GET", "/proxy/ra/sleep", 404),
                ("GET", "/proxy/ra/collective_rpc", 404),
                ("POST", "/proxy/ra/v1/load_lora_adapter", 405),
                ("POST", "/proxy/ra/v1/completions", 405),
                ("GET", "/proxy/nope/health", 404),
            ):
                code, doc, _ = await http(method, path, {"model": "ra", "prompt": "x"})
                assert code == status, (path, doc)
            code, doc, _ = await http("POST", "/proxy/ra/v1/completions", {"model": "ra"})
            assert doc["error"]["code"] == "path_not_passed" and '"model" set to' in doc["error"]["message"]
            assert (await http("GET", "/proxy/ra/health", key=USER_KEY))[0] == 403
            assert (await http("GET", "/proxy/ra/health", key=None))[0] == 401
            # The agent checks the path too, whatever asks it.
            assert a.api("GET", "/models/ra/proxy/sleep")[0] == 404
            assert a.api("GET", "/models/ra/proxy/health")[0] == 200
            # A stopped engine: said so, not loaded for it.
            code, doc, _ = await http("GET", "/proxy/plain/health")
            assert code == 503 and doc["error"]["code"] == "engine_not_running"
            assert a.inst("plain")["state"] == "stopped"
            await c.close()
