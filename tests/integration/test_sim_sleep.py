"""Sleep mode of the simulated engine, as vLLM 0.25 with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode."""

import asyncio
import functools
import json
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mvllm.sim.config import GIB, SLEEP_RESIDUAL_BYTES
from tests.procs import http_get, run_sim
from tests.support import FAST_SIM_ARGS

MSG = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def start(sim_factory):
    return functools.partial(sim_factory, dev_mode=True, enable_sleep_mode=True, weights_gib=10.0,
                             gpu_memory_utilization=0.5)  # fmt: skip


async def call(session, method, url):
    async with session.request(method, url) as r:
        return r.status, await r.read()


async def sleep_state(session, sim):
    async with session.get(sim.url + "/metrics") as r:
        fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
    return {s.labels["sleep_state"]: s.value for s in fams["vllm:engine_sleep_state"].samples}


async def sim_state(session, sim):
    async with session.get(sim.url + "/sim/state") as r:
        return await r.json()


async def chat_text(c, max_tokens=8):
    r = await c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=max_tokens)
    return r.choices[0].message.content, r.usage.completion_tokens


async def test_level_1_frees_memory_queues_requests_and_wakes_identical(start):
    sim = await start()
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
    before, _ = await chat_text(c)
    async with aiohttp.ClientSession() as s:
        assert (await sim_state(s, sim))["memory_bytes"] == 40 * GIB  # 0.5 * 80 GiB
        assert await call(s, "POST", sim.url + "/sleep?level=1") == (200, b"")
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        assert await sleep_state(s, sim) == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
        st = await sim_state(s, sim)
        assert st["memory_bytes"] == SLEEP_RESIDUAL_BYTES and st["sleep_level"] == 1
        assert (await call(s, "GET", sim.url + "/health"))[0] == 200  # a sleeping vLLM is still healthy
        pending = asyncio.create_task(chat_text(c))
        await asyncio.sleep(0.3)
        assert not pending.done()  # queued until the engine is awake
        assert (await sim_state(s, sim))["waiting"] == 1
        assert await call(s, "POST", sim.url + "/wake_up") == (200, b"")
        assert await asyncio.wait_for(pending, 10) == (before, 8)
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":false}')
        assert await sleep_state(s, sim) == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
        assert (await sim_state(s, sim))["memory_bytes"] == 40 * GIB


async def test_level_2_answers_empty_until_reload_weights(start):
    sim = await start()
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
    before, _ = await chat_text(c)
    async with aiohttp.ClientSession() as s:
        assert await call(s, "POST", sim.url + "/sleep?level=2&mode=wait") == (200, b"")
        assert await sleep_state(s, sim) == {"awake": 0.0, "weights_offloaded": 0.0, "discard_all": 1.0}
        # vLLM's level-2 wake sequence: weights, reload, kv cache.
        assert (await call(s, "POST", sim.url + "/wake_up?tags=weights"))[0] == 200
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        # As observed on vLLM 0.25: the gauge already says awake after a partial wake.
        assert (await sleep_state(s, sim))["awake"] == 1.0
        assert (await sim_state(s, sim))["memory_bytes"] == 10 * GIB  # weights back, KV still away
        assert (await call(s, "POST", sim.url + "/wake_up?tags=kv_cache"))[0] == 200
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":false}')
        # Woken without reloading: tokens are produced but carry no text, as on real vLLM.
        assert await chat_text(c) == ("", 8)
        async with s.post(sim.url + "/collective_rpc", json={"method": "reload_weights"}) as r:
            assert r.status == 200 and await r.json() == {"results": [None]}
        assert await chat_text(c) == (before, 8)
        async with s.post(sim.url + "/collective_rpc", json={}) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == "Missing 'method' in request body"
        assert (await call(s, "POST", sim.url + "/reset_prefix_cache"))[0] == 200


def test_lora_level_2_reload_weights_kills_the_engine_as_vllm_0_25(tmp_path):
    # Seen on real vLLM 0.25.0 with --enable-lora: reload_weights after a level-2 sleep answers 500,
    # every later request fails, then the process exits non-zero. Level 1 is unaffected.
    def post(path, body=None):
        req = urllib.request.Request(sim.url + path, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    args = ["--enable-sleep-mode", "--enable-lora", *FAST_SIM_ARGS]
    with run_sim(tmp_path, "m", args, env=env) as sim:
        c = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=10)
        before = c.completions.create(model="m", prompt="hi", max_tokens=4).choices[0].text
        assert post("/sleep?level=1") == (200, b"") and post("/wake_up") == (200, b"")
        assert c.completions.create(model="m", prompt="hi", max_tokens=4).choices[0].text == before
        assert post("/collective_rpc", {"method": "reload_weights"}) == (200, b'{"results":[null]}')
        assert post("/sleep?level=2") == (200, b"") and post("/wake_up?tags=weights") == (200, b"")
        status, body = post("/collective_rpc", {"method": "reload_weights"})
        assert status == 500
        err = json.loads(body)["error"]
        assert err["message"] == ("Call to collective_rpc method failed: "
                                  "There is no module or parameter named 'embed_tokens.weight'")
        assert err["type"] == "InternalServerError" and err["code"] == 500
        assert http_get(sim.url + "/health")[0] == 503
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="m", prompt="hi", max_tokens=4)
        t0 = time.monotonic()
        assert sim.proc.popen.wait(10) == 1  # "shortly after": DEAD_EXIT_S (1 s) in the simulator
        assert time.monotonic() - t0 < 8
    assert "embed_tokens.weight" in sim.proc.log()


async def test_level_2_without_reload_never_stops_on_its_own(start):
    # Observed on vLLM 0.25: discarded weights write empty tokens and no end-of-sequence token.
    sim = await start(max_model_len=128)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
    async with aiohttp.ClientSession() as s:
        await call(s, "POST", sim.url + "/sleep?level=2")
        await call(s, "POST", sim.url + "/wake_up")
    r = await c.chat.completions.create(model="sim-model", messages=MSG)
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == 128


async def test_sleep_modes_abort_wait_keep(start):
    sim = await start(itl_ms=10.0)
    c = openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=20)
    async with aiohttp.ClientSession() as s:
        # abort (the default): the running request ends at once with finish_reason "abort".
        running = asyncio.create_task(c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=300))
        await asyncio.sleep(0.2)
        assert (await call(s, "POST", sim.url + "/sleep?level=1"))[0] == 200
        aborted = await asyncio.wait_for(running, 5)
        assert aborted.choices[0].finish_reason == "abort" and 0 < aborted.usage.completion_tokens < 300
        await call(s, "POST", sim.url + "/wake_up")
        # wait: the in-flight request finishes normally before the engine sleeps.
        running = asyncio.create_task(c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=20))
        await asyncio.sleep(0.05)
        assert (await call(s, "POST", sim.url + "/sleep?level=1&mode=wait"))[0] == 200
        assert running.done()
        finished = running.result()
        assert finished.choices[0].finish_reason == "length" and finished.usage.completion_tokens == 20
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        async with s.post(sim.url + "/sleep?level=abc") as r:
            assert r.status == 400
        await call(s, "POST", sim.url + "/wake_up")
        # keep: the running request freezes where it is and resumes on wake.
        running = asyncio.create_task(c.chat.completions.create(model="sim-model", messages=MSG, max_tokens=30))
        await asyncio.sleep(0.1)
        assert (await call(s, "POST", sim.url + "/sleep?level=1&mode=keep"))[0] == 200
        await asyncio.sleep(0.5)  # 30 tokens take about 0.3 s when awake
        assert not running.done() and (await sim_state(s, sim))["running"] == 1
        await call(s, "POST", sim.url + "/wake_up")
        kept = await asyncio.wait_for(running, 5)
        assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 30


async def test_level_0_pauses_without_freeing_memory(start):
    sim = await start()
    async with aiohttp.ClientSession() as s:
        assert (await call(s, "POST", sim.url + "/sleep?level=0"))[0] == 200
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        assert (await sleep_state(s, sim))["awake"] == 1.0  # vLLM reports level 0 as awake
        assert (await sim_state(s, sim))["memory_bytes"] == 40 * GIB
        await call(s, "POST", sim.url + "/wake_up")
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":false}')


async def test_sleep_routes_need_dev_mode(start):
    sim = await start(dev_mode=False)
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                             ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache")):
            status, body = await call(s, method, sim.url + path)
            assert status == 404 and body == b'{"detail":"Not Found"}', path


async def test_without_enable_sleep_mode_sleep_pauses_but_frees_nothing(start):
    sim = await start(enable_sleep_mode=False)
    async with aiohttp.ClientSession() as s:
        assert await call(s, "POST", sim.url + "/sleep?level=1") == (200, b"")
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        assert (await sim_state(s, sim))["memory_bytes"] == 40 * GIB
        await call(s, "POST", sim.url + "/wake_up")
        assert await call(s, "GET", sim.url + "/is_sleeping") == (200, b'{"is_sleeping":false}')
