"""Fair switches on a full GPU (max_switch_wait): a request for model B that needs the memory of a
model A under steady traffic waits at most max_switch_wait, then the agent drains A (its new
requests get a retryable 503 no_room, those in flight finish), puts it to sleep and loads B.

One simulated 24 GiB GPU with 1 GiB reserved; A and B have 20 GiB budgets: only one fits.
"""

from __future__ import annotations

import asyncio
import threading
import time

import openai

from tests.integration.agent_support import model, running_agent
from tests.support import wait_until

MAX_SWITCH_WAIT = 2.0
STREAM_TOKENS = 80  # ~0.8 s per A stream at itl 10 ms
WORKERS = 4


async def _steady_a(client: openai.AsyncOpenAI, stop: asyncio.Event, out: dict[str, list], delay: float) -> None:
    """Stream A back to back until `stop`: each stream must complete whole; a refusal must be the
    retryable no_room 503 (then back off a little, as a client honouring Retry-After would)."""
    await asyncio.sleep(delay)  # staggered: the workers' streams never all end at once, A is never idle
    while not stop.is_set():
        t = time.monotonic()
        try:
            stream = await client.chat.completions.create(
                model="a", messages=[{"role": "user", "content": "x"}], max_tokens=STREAM_TOKENS, stream=True,
                stream_options={"include_usage": True},
            )
            chunks, finish, usage = 0, None, None
            async for ev in stream:
                if ev.choices:
                    chunks += 1
                    finish = ev.choices[0].finish_reason or finish
                if ev.usage is not None:
                    usage = ev.usage.completion_tokens
            out["done"].append((t, time.monotonic(), finish, usage))
        except openai.APIStatusError as exc:
            out["refused"].append((t, exc.status_code, exc.code, exc.response.headers.get("retry-after")))
            await asyncio.sleep(0.2)
        except Exception as exc:  # a cut stream, a reset: what must never happen
            out["failed"].append((t, repr(exc)))


async def test_a_switch_under_steady_traffic_drains_the_busy_model_after_max_switch_wait(tmp_path):
    slow = "sim = { ttft_ms = 5, itl_ms = 10, weights_gib = 2 }"
    catalog = (model("a", "preload = true", sim=slow) + model("b")).replace("memory_gib = 10", "memory_gib = 20")
    top = {"load_timeout": 30, "max_switch_wait": MAX_SWITCH_WAIT}
    with running_agent(tmp_path, catalog, sim_gpus=(24,), top=top) as agent:
        await asyncio.to_thread(wait_until, lambda: agent.inst("a")["state"] == "ready", 20, "a preloaded")
        client = agent.aclient()
        stop = asyncio.Event()
        out: dict[str, list] = {"done": [], "refused": [], "failed": []}
        workers = [asyncio.ensure_future(_steady_a(client, stop, out, i * 0.2)) for i in range(WORKERS)]
        # /state seen from outside while it happens: A must show as draining at some point.
        seen: list[dict] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                seen.append({i["name"]: (i["state"], i["draining"]) for i in agent.state()["instances"]})
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        await asyncio.sleep(1.5)  # steady A traffic: A is never idle from here on
        assert agent.inst("a")["in_flight"] >= 1 and not out["failed"], out

        t0 = time.monotonic()
        r = await client.chat.completions.create(model="b", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        took = time.monotonic() - t0
        assert r.choices[0].message.content
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        watching.set()
        watcher.join(5)
        await client.close()

        # B within max_switch_wait + the time A's streams in flight take to end (< 1 s) + its load.
        assert MAX_SWITCH_WAIT - 0.2 <= took < MAX_SWITCH_WAIT + 6, took
        # Every A stream that began, finished whole: no in-flight request was cut.
        assert not out["failed"], out["failed"]
        assert out["done"] and all(f == "length" and u == STREAM_TOKENS for _t, _e, f, u in out["done"]), out["done"]
        assert any(end > t0 + MAX_SWITCH_WAIT for _t, end, _f, _u in out["done"])  # ones in flight at the drain
        # A's requests after the drain were refused with the code the router retries elsewhere.
        assert out["refused"], "no A request came in during the drain"
        for _t, status, code, retry_after in out["refused"]:
            assert (status, code) == (503, "no_room") and retry_after, out["refused"]
        assert all(t >= t0 + MAX_SWITCH_WAIT - 0.2 for t, *_ in out["refused"]), (t0, out["refused"])
        assert any(s.get("a") == ("ready", True) for s in seen), "A never showed as draining in /state"
        assert not any(s.get("a", ("", False))[1] for s in seen if s.get("b", ("",))[0] == "ready"), (
            "A still draining once B was ready"
        )
        # Nothing is left draining: A's retries after the switch may wake it again once B is idle.
        assert not any(i["draining"] for i in agent.state()["instances"])
        log = (tmp_path / f"agent-{agent.port}.log").read_text()
        assert "b: draining a after" in log and "evicting a (sleep level 1) to make room for b" in log
        text = agent.api("GET", "/metrics")[1].decode()
        assert 'mvllm_agent_switch_drains_total{model="a"} 1.0' in text
        assert 'mvllm_agent_rejected_total{model="a",reason="draining"}' in text
