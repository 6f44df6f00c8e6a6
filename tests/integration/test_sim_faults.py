"""Fault injection of the simulated engine: every kind, as a client (or a router) sees it."""

import asyncio
import json

import aiohttp
import openai
import pytest

from mvllm.sim.config import SimConfig
from mvllm.sim.inprocess import start_sim
from tests.support import FAST_SIM

# Slower tokens than FAST_SIM: a stream lasts long enough for a fault to land in its middle.
FAST = {**FAST_SIM, "itl_ms": 5.0}
MSG = [{"role": "user", "content": "Hello there, how are you?"}]
CHAT = {"model": "sim-model", "messages": MSG, "max_tokens": 20}


@pytest.fixture
async def sim():
    s = await start_sim(SimConfig(model="sim-model", **FAST))
    yield s
    await s.close()


async def set_fault(session, sim, kind, rate=1.0):
    async with session.post(sim.url + "/sim/fault", json={"kind": kind, "rate": rate}) as r:
        assert r.status == 200 and await r.json() == {"kind": kind, "rate": rate}


async def test_500_and_503_in_vllm_shape_while_health_stays_ok(sim):
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0)
    async with aiohttp.ClientSession() as s:
        await set_fault(s, sim, "500")
        with pytest.raises(openai.InternalServerError) as exc:
            await c.chat.completions.create(**CHAT)
        assert exc.value.status_code == 500 and exc.value.body["type"] == "InternalServerError"
        async with s.get(sim.url + "/health") as r:
            assert r.status == 200
        await set_fault(s, sim, "503")
        with pytest.raises(openai.APIStatusError) as exc:
            await c.embeddings.create(model="sim-model", input="x")
        assert exc.value.status_code == 503
        await set_fault(s, sim, "500", 0.0)
        ok = await c.chat.completions.create(**CHAT)
        assert ok.usage.completion_tokens == 20


async def test_hang_accepts_and_never_answers(sim):
    async with aiohttp.ClientSession() as s:
        await set_fault(s, sim, "hang")
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(sim.url + "/v1/chat/completions", json=CHAT,
                              timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                await r.read()
        await set_fault(s, sim, "hang", 0.0)
        async with s.get(sim.url + "/sim/state") as r:
            assert (await r.json())["running"] == 0


async def test_reset_closes_before_headers(sim):
    async with aiohttp.ClientSession() as s:
        await set_fault(s, sim, "reset")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.post(sim.url + "/v1/chat/completions", json=CHAT) as r:
                await r.read()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with s.post(sim.url + "/v1/embeddings", json={"model": "sim-model", "input": "x"}) as r:
                await r.read()


async def test_midstream_drops_after_a_few_chunks(sim):
    async with aiohttp.ClientSession() as s:
        await set_fault(s, sim, "midstream")
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(sim.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    received += chunk
        assert received.startswith(b"data: ") and b"[DONE]" not in received
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.post(sim.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                await r.read()
        await set_fault(s, sim, "midstream", 0.0)
        async with s.post(sim.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_partial_rate_is_deterministic_per_seed():
    outcomes = []
    for _ in range(2):
        sim = await start_sim(SimConfig(model="sim-model", fail_rate=0.5, fail_kind="500", seed=11, **FAST))
        try:
            async with aiohttp.ClientSession() as s:
                run = []
                for _ in range(20):
                    async with s.post(sim.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 1}) as r:
                        run.append(r.status)
                outcomes.append(run)
        finally:
            await sim.close()
    assert outcomes[0] == outcomes[1]
    assert set(outcomes[0]) == {200, 500}


async def test_fault_endpoint_rejects_bad_input(sim):
    async with aiohttp.ClientSession() as s, s.post(sim.url + "/sim/fault", json={"kind": "boom", "rate": 1}) as r:
        assert r.status == 400 and "error" in json.loads(await r.read())
