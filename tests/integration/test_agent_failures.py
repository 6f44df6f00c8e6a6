"""The agent when engines fail or are slow: crash loop → failed with the log tail, bounded waits → 503."""

from __future__ import annotations

import asyncio
import json

import openai

from tests.integration.agent_support import TOKEN, model, running_agent
from tests.support import wait_until


def test_engine_that_cannot_start_becomes_failed_with_its_log(tmp_path):
    # An invalid sim flag value: the engine exits at once, every time.
    catalog = model("broken", 'extra_args = ["--sim-fail-kind", "not-a-kind"]')
    with running_agent(tmp_path, catalog, top={"restart_max": 1, "restart_backoff": 0.1}) as agent:
        try:
            agent.chat("broken")
            raise AssertionError("expected 503")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and "broken failed" in exc.message
        inst = agent.inst("broken")
        assert inst["state"] == "failed" and "exited with code" in inst["error"]
        assert inst["loads"] == 2  # the first start and one restart (restart_max = 1)
        tail = wait_until(lambda: agent.inst("broken")["log_tail"], 5, "log tail captured")
        assert any("not-a-kind" in line for line in tail), tail
        # A failed model answers at once, without another start...
        try:
            agent.chat("broken")
        except openai.APIStatusError as exc:
            assert exc.status_code == 503
        assert agent.inst("broken")["loads"] == 2
        # ...until an operator asks for a load, which tries again.
        code, _ = agent.api("POST", "/models/broken/load")
        assert code == 503 and agent.inst("broken")["loads"] == 4


def test_a_model_too_big_for_its_budget_says_why_in_one_line(tmp_path):
    # 16 GiB of simulated weights in a 14 GiB budget: the engine refuses to start, as vLLM would.
    catalog = '[models.tight]\nmodel = "org/tight"\nmemory_gib = 14\nsim = { weights_gib = 16 }\n'
    with running_agent(tmp_path, catalog, sim_gpus=(24,), top={"restart_max": 0}) as agent:
        try:
            agent.chat("tight")
            raise AssertionError("expected 503")
        except openai.APIStatusError as exc:
            message = exc.body["message"] if isinstance(exc.body, dict) else exc.message
        assert "\n" not in message, message
        assert "No available memory for the cache blocks" in message, message  # the engine's words
        assert "memory_gib" in message and "`mvllm logs tight`" in message, message  # the hint
        assert agent.inst("tight")["error"].startswith("engine exited with code 1: ValueError: No available memory")


async def test_waits_are_bounded_by_queue_and_load_timeout(tmp_path):
    catalog = model("slow", sim="sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 4 }")
    with running_agent(tmp_path, catalog, top={"load_timeout": 1.5, "max_queue": 2}) as agent:
        client = openai.AsyncOpenAI(base_url=f"{agent.url}/v1", api_key=TOKEN, max_retries=0, timeout=30)

        async def ask() -> tuple[int, str, str | None]:
            try:
                await client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=2)
                return 200, "", None
            except openai.APIStatusError as exc:
                return exc.status_code, exc.message, exc.response.headers.get("retry-after")

        results = await asyncio.gather(*(ask() for _ in range(5)))
        assert all(code == 503 and retry for code, _, retry in results), results
        messages = [m for _, m, _ in results]
        assert sum("already wait" in m for m in messages) == 3, messages  # beyond max_queue: at once
        assert sum("still starting" in m for m in messages) == 2, messages  # waited load_timeout
        # The load went on regardless and is shared by everyone: one engine start.
        await asyncio.to_thread(wait_until, lambda: agent.inst("slow")["state"] == "ready", 20, "slow model ready")
        assert (await ask())[0] == 200
        inst = agent.inst("slow")
        assert inst["loads"] == 1 and inst["queued"] == 0
        metrics = agent.api("GET", "/metrics")[1].decode()
        assert 'mvllm_agent_rejected_total{model="slow",reason="queue_full"} 3.0' in metrics
        assert json.loads(agent.api("GET", "/models/slow")[1])["state"] == "ready"
        await client.close()
