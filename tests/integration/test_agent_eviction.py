"""Placement on a simulated GPU that holds two models: LRU eviction of idle models, never a busy one
(a load waits for busy ones in its way to finish, up to load_timeout).

Three catalog models of 10 GiB each on one 24 GiB simulated GPU with 1 GiB reserved: two fit awake,
the third needs one of them asleep (a sleeping sim engine keeps 0.5 GiB).
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.integration.agent_support import TOKEN, model, running_agent
from tests.support import wait_until

GIB = 1024**3
CATALOG = model("ev-a") + model("ev-b") + model("ev-c")


def states(agent) -> dict[str, str]:
    return {i["name"]: i["state"] for i in agent.state()["instances"]}


def test_three_models_room_for_two_each_in_turn(tmp_path):
    """Issue 4's "done when": each asked in turn, every request succeeds, the LRU one is asleep."""
    with running_agent(tmp_path, CATALOG, sim_gpus=(24,)) as agent:
        order = ["ev-a", "ev-b", "ev-c", "ev-a", "ev-b", "ev-c", "ev-b"]
        expected_lru_asleep = {2: "ev-a", 3: "ev-b", 4: "ev-c", 5: "ev-a", 6: None}
        for n, name in enumerate(order):
            assert agent.chat(name), name
            st = agent.state()
            by = {i["name"]: i for i in st["instances"]}
            assert by[name]["state"] == "ready"
            awake = [k for k, i in by.items() if i["state"] == "ready"]
            assert len(awake) <= 2, awake
            lru = expected_lru_asleep.get(n)
            if lru:
                assert by[lru]["state"] in ("sleeping", "stopped"), (n, name, {k: i["state"] for k, i in by.items()})
            used = st["gpus"][0]["memory_used_bytes"]
            assert used <= 23 * GIB, used  # never over the card minus the reserve
        # The last request (ev-b) was for a model already awake: nothing was evicted for it.
        assert states(agent) == {"ev-a": "sleeping", "ev-b": "ready", "ev-c": "ready"}
        _code, raw = agent.api("GET", "/metrics")
        assert 'mvllm_agent_sleeps_total{level="1",model="ev-a",reason="evict"} 2.0' in raw.decode()
        # Where the router would send a cold request: the sleeping one, and what a load would cost.
        cat = {c["name"]: c for c in agent.state()["catalog"]}
        assert cat["ev-a"]["placement"] == "sleeping"
        assert cat["ev-b"]["placement"] == cat["ev-c"]["placement"] == "awake"


async def test_eviction_skips_a_busy_model_even_when_it_is_least_recently_used(tmp_path):
    catalog = (
        model("busy", sim="sim = { ttft_ms = 5, itl_ms = 15, weights_gib = 2 }")
        + model("idle-one")
        + model("newcomer")
    )
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        assert agent.api("POST", "/models/busy/load")[0] == 200
        client = openai.AsyncOpenAI(base_url=f"{agent.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)
        # A long non-streamed answer (~15 s): `busy` is used once, at its start, then in flight.
        long = asyncio.ensure_future(
            client.completions.create(model="busy", prompt="long", max_tokens=1000, stream=False)
        )
        await asyncio.to_thread(wait_until, lambda: agent.inst("busy")["in_flight"] == 1, 10, "long request in flight")
        await asyncio.sleep(0.05)
        r = await client.chat.completions.create(model="idle-one", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.content
        t_idle = agent.inst("idle-one")["last_used"]
        assert agent.inst("busy")["last_used"] < t_idle  # `busy` is the least recently used

        t0 = time.monotonic()
        r = await client.chat.completions.create(model="newcomer", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.content
        st = {i["name"]: i for i in agent.state()["instances"]}
        assert st["busy"]["state"] == "ready" and st["busy"]["in_flight"] == 1, "a busy model was evicted"
        assert st["idle-one"]["state"] == "sleeping"
        assert st["newcomer"]["state"] == "ready"
        assert not long.done(), f"the long request ended too early to prove anything ({time.monotonic() - t0:.1f}s)"
        log = (tmp_path / f"agent-{agent.port}.log").read_text()
        assert "evicting idle-one (sleep level 1) to make room for newcomer" in log

        # The busy model's request is untouched by all this: cancel it (client leaves) and the
        # agent stops counting it.
        long.cancel()
        await asyncio.to_thread(wait_until, lambda: agent.inst("busy")["in_flight"] == 0, 10, "cancelled request released")
        await client.close()


def test_no_room_when_only_busy_or_pinned_models_hold_memory(tmp_path):
    catalog = model("pin", "pinned = true\npreload = true") + model("big", sim="sim = { weights_gib = 2 }").replace(
        "memory_gib = 10", "memory_gib = 20"
    )
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        wait_until(lambda: agent.inst("pin")["state"] == "ready", 20, "preloaded pinned model ready")
        cat = {c["name"]: c for c in agent.state()["catalog"]}
        assert cat["big"]["placement"] == "no_room"
        try:
            agent.chat("big")
            raise AssertionError("expected 503")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and "not enough GPU memory" in exc.message and exc.code == "no_room"
            assert exc.response.headers.get("retry-after")
        assert agent.inst("pin")["state"] == "ready"


async def test_a_load_waits_for_a_busy_model_up_to_load_timeout_never_evicting_it(tmp_path):
    """Two models that do not fit together, `busy` answering a ~6 s request: a request for `next`
    waits (load_timeout = 2 s here), then gets 503 no_room naming the busy model, which is never
    evicted while its request runs; once it is idle, `next` evicts it and answers."""
    slow = "sim = { ttft_ms = 5, itl_ms = 10, weights_gib = 2 }"
    catalog = (model("busy", "preload = true", sim=slow) + model("next")).replace("memory_gib = 10", "memory_gib = 20")
    with running_agent(tmp_path, catalog, sim_gpus=(24,), top={"load_timeout": 2}) as agent:
        await asyncio.to_thread(wait_until, lambda: agent.inst("busy")["state"] == "ready", 20, "busy preloaded")
        client = agent.aclient()
        long = asyncio.ensure_future(
            client.chat.completions.create(model="busy", messages=[{"role": "user", "content": "x"}], max_tokens=600)
        )
        await asyncio.to_thread(wait_until, lambda: agent.inst("busy")["in_flight"] == 1, 10, "long request in flight")
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="next", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        waited = time.monotonic() - t0
        assert exc.value.status_code == 503 and exc.value.code == "no_room", exc.value.body
        assert "busy still answering requests after 2 s" in exc.value.body["message"], exc.value.body
        assert exc.value.response.headers.get("retry-after")
        assert waited >= 1.8, waited  # it waited for the busy model rather than refusing at once
        assert not long.done(), f"the long request ended too early to prove anything ({waited:.1f}s)"
        assert agent.inst("busy")["state"] == "ready" and agent.inst("next")["state"] == "stopped"

        answer = await long  # never cut by an eviction
        assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 600
        r = await client.chat.completions.create(model="next", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.content
        assert agent.inst("busy")["state"] == "sleeping" and agent.inst("next")["state"] == "ready"
        text = agent.api("GET", "/metrics")[1].decode()
        assert 'mvllm_agent_rejected_total{model="next",reason="no_room"} 1.0' in text
        await client.close()


def test_lora_model_sleeps_at_level_1_when_evicted_or_idle(tmp_path):
    """sleep_level_on_idle = 2 on a LoRA model: the config loads with a warning, and both the eviction
    and the idle timer sleep it at level 1 (the sim dies on reload_weights after level 2, as vLLM 0.25)."""
    lora = 'lora_adapters = {{ "{}" = "/loras/sql" }}\nsleep_level_on_idle = 2\n'
    catalog = (model("ev-lora", lora.format("ev-sql")) + model("ev-b", "sleep_level_on_idle = 2")
               + model("ev-idle", lora.format("ev-idle-sql") + "idle_timeout = 1"))
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        warned = [ln for ln in agent.proc.log().splitlines() if "sleep_level_on_idle = 2 with LoRA" in ln]
        assert [("models.ev-lora." in w, "models.ev-idle." in w) for w in warned] == [(True, False), (False, True)]
        before = agent.chat("ev-sql", temperature=0)
        assert before and agent.chat("ev-b")
        assert agent.chat("ev-idle")  # no room for a third: ev-lora (least recently used) sleeps
        by = {i["name"]: i for i in agent.state()["instances"]}
        assert by["ev-lora"]["state"] == "sleeping" and by["ev-lora"]["sleep_level"] == 1
        assert by["ev-b"]["state"] == "ready"
        # The idle timer: ev-idle asleep at level 1 too.
        idle = wait_until(lambda: (i := agent.inst("ev-idle"))["state"] == "sleeping" and i, 10, "ev-idle asleep")
        assert idle["sleep_level"] == 1
        assert agent.chat("ev-sql", temperature=0) == before  # woken from level 1, LoRA intact
        lora_inst = agent.inst("ev-lora")
        assert lora_inst["state"] == "ready" and lora_inst["restarts"] == 0 and lora_inst["loads"] == 1
        text = agent.api("GET", "/metrics")[1].decode()
        assert 'mvllm_agent_sleeps_total{level="1",model="ev-lora",reason="evict"} 1.0' in text
        assert 'mvllm_agent_sleeps_total{level="1",model="ev-idle",reason="idle"} 1.0' in text
        assert 'level="2",model="ev-lora"' not in text and 'level="2",model="ev-idle"' not in text
        assert "mvllm_agent_engine_crashes_total{" not in text
        cat = {c["name"]: c["sleep_level_on_idle"] for c in agent.state()["catalog"]}
        assert cat == {"ev-lora": 1, "ev-b": 2, "ev-idle": 1}
