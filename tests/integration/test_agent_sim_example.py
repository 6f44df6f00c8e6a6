"""agent.sim.example.toml, the ready-made agent without a GPU: it loads as it is, and an agent
started from it (only its port, log directory and engine ports moved for the test) serves its
models on first request, evicting a model that does not fit beside the next."""

from __future__ import annotations

import random
from pathlib import Path

import openai
import tomli_w

from mvllm.agent.config import load_config
from mvllm.common.tomlconf import load_toml
from tests.integration.agent_support import TOKEN, Agent
from tests.procs import REPO, free_port

EXAMPLE = REPO / "agent.sim.example.toml"


def test_the_example_loads_as_it_is() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.engine == "sim" and len(cfg.sim_gpus) == 2 and len(cfg.models) >= 3
    assert cfg.models["qwen-7b"].memory_gib == 14 and cfg.sim_gpus[0].memory_gib == 24


def test_an_agent_from_the_example_serves_and_evicts(tmp_path: Path) -> None:
    doc = load_toml(EXAMPLE)
    base = random.randrange(20000, 32700, 50)
    doc.update(port=free_port(), token=TOKEN, log_dir=str(tmp_path / "logs"), engine_port_range=[base, base + 40])
    for entry in doc["models"].values():
        entry["sim"]["startup_s"] = 0.2  # the example's start-up time is for watching, not for tests
    agent = Agent(tmp_path, "")
    agent.port = doc["port"]
    agent.config.write_text(tomli_w.dumps(doc))
    agent.start()
    try:
        # memory_gib = 14 on a 24 GiB simulated GPU: the simulated weights follow the budget.
        assert agent.chat("qwen-7b")
        assert agent.inst("qwen-7b")["state"] == "ready"
        assert agent.chat("llama-8b")  # GPU 0 has no room for both: qwen-7b makes way
        assert agent.inst("qwen-7b")["state"] in ("sleeping", "stopped")
        assert agent.chat("mistral-7b")
        assert agent.inst("llama-8b")["state"] == "ready"  # GPU 1: no eviction
        try:
            agent.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
            raise AssertionError("an unknown model was served")
        except openai.NotFoundError:
            pass
    finally:
        agent.stop()
