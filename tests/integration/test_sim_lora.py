"""Runtime LoRA adapters on the simulated engine (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, --enable-lora)."""

import asyncio
import functools

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def start(sim_factory):
    return functools.partial(sim_factory, model="base-model", served_model_names=["base"], enable_lora=True,
                             runtime_lora_updating=True)  # fmt: skip


async def post(s, url, body):
    async with s.post(url, json=body) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_load_use_unload(start):
    sim = await start()
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    async with aiohttp.ClientSession() as s:
        status, _, text = await post(s, sim.url + "/v1/load_lora_adapter",
                                     {"lora_name": "sql", "lora_path": "/adapters/sql-lora"})
        assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")
        status, ctype, text = await post(s, sim.url + "/v1/load_lora_adapter",
                                         {"lora_name": "sql", "lora_path": "/adapters/sql-lora"})
        assert status == 400 and ctype == "application/json" and '"type":"InvalidUserInput"' in text
        status, _, _ = await post(s, sim.url + "/v1/load_lora_adapter", {"lora_name": "x"})
        assert status == 400
        models = await c.models.list()
        cards = {m.id: m for m in models.data}
        assert set(cards) == {"base", "sql"}
        sql = cards["sql"].model_dump()
        assert (sql["parent"], sql["root"], sql["max_model_len"]) == ("base", "/adapters/sql-lora", None)
        base = await c.chat.completions.create(model="base", messages=MSG, max_tokens=6)
        tuned = await c.chat.completions.create(model="sql", messages=MSG, max_tokens=6)
        assert tuned.model == "sql" and tuned.usage.completion_tokens == 6
        assert tuned.choices[0].message.content != base.choices[0].message.content
        status, _, text = await post(s, sim.url + "/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert (status, text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
        status, _, text = await post(s, sim.url + "/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 404 and '"type":"NotFoundError"' in text
    with pytest.raises(openai.NotFoundError):
        await c.chat.completions.create(model="sql", messages=MSG, max_tokens=2)


async def test_max_loras_defers_other_adapters(start):
    sim = await start(max_loras=1, itl_ms=10.0)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
    async with aiohttp.ClientSession() as s:
        for name in ("a", "b"):
            assert (await post(s, sim.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "/p/" + name}))[0] == 200
        first = asyncio.create_task(c.chat.completions.create(model="a", messages=MSG, max_tokens=30))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(c.chat.completions.create(model="b", messages=MSG, max_tokens=2))
        await asyncio.sleep(0.1)
        async with s.get(sim.url + "/metrics") as r:
            fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
        by_reason = {x.labels["reason"]: x.value for x in fams["vllm:num_requests_waiting_by_reason"].samples}
        info = fams["vllm:lora_requests_info"].samples[0].labels
        assert by_reason == {"capacity": 0.0, "deferred": 1.0}
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("a", "b")
        assert not second.done()
        await asyncio.gather(first, second)


@pytest.mark.parametrize("runtime,enabled,status", [(False, True, 404), (True, False, 500)])
async def test_endpoints_need_env_and_enable_lora(start, runtime, enabled, status):
    sim = await start(runtime_lora_updating=runtime, enable_lora=enabled)
    async with aiohttp.ClientSession() as s:
        got, _, _ = await post(s, sim.url + "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/p"})
        assert got == status
