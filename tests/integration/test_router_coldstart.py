"""Through the router (in this process) to a real `mvllm agent` (engine = "sim"): a request that
gives up waiting on a cold load gets the agent's 503 with Retry-After from the predicted time
left, and /load-stats shows the load's phase."""

from __future__ import annotations

import aiohttp

from mvllm.router.app import running_router
from mvllm.router.config import load_config
from tests.integration.agent_support import TOKEN, Agent, model
from tests.support import wait_until_async, write_servers

CATALOG = model("rc", sim="sim = { startup_s = 1.0, ttft_ms = 5, itl_ms = 2, weights_gib = 2 }")


async def test_retry_after_of_a_load_that_outlasts_load_timeout_comes_from_the_last_cold_start(tmp_path):
    agent = Agent(tmp_path, CATALOG, top={"load_timeout": 0.3}).start()
    try:
        # One measured cold start (about 1 s), then stopped again.
        assert agent.api("POST", "/models/rc/load")[0] in (200, 202)
        await wait_until_async(lambda: agent.inst("rc")["state"] == "ready", 10, "first load")
        assert agent.api("POST", "/models/rc/unload")[0] == 200
        path = write_servers(
            tmp_path / "servers.toml",
            agents=[{"url": agent.url, "name": "gpu-a", "token": TOKEN, "load_timeout": 30}],
            scrape_timeout=2.0,
        )
        async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as r:
            await wait_until_async(lambda: r.state.registry.nodes_for("rc"), 10, "router knows rc")
            async with aiohttp.ClientSession() as s:
                body = {"model": "rc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
                async with s.post(f"{r.url}/v1/chat/completions", json=body) as resp:
                    assert resp.status == 503, await resp.text()
                    assert 1 <= int(resp.headers["Retry-After"]) <= 4, dict(resp.headers)  # ~1.0 - 0.3 s left (19+ unmeasured)
                    assert resp.headers.get("x-mvllm-node") == "gpu-a"

                async def loading_phase():
                    async with s.get(f"{r.url}/load-stats") as st:
                        doc = await st.json()
                    inst = next(i for n in doc["nodes"] if n["name"] == "gpu-a" for i in n["agent"]["instances"])
                    load = inst.get("load")
                    return load["phase"] if load else None

                assert await wait_until_async(loading_phase, 5, "the router sees the load's phase")
    finally:
        agent.stop()
