"""`assign` on a real `mvllm agent` process rewrites agent.toml keeping the operator's comments and
layout: only the keys of the assigned `[models.NAME]` change (tomlkit round-trips the document)."""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from tests.integration.agent_support import model, running_agent

CATALOG = (
    "# --- models: edited by hand, and by `mvllm assign` ---\n"
    + model("m1", '# pinned to GPU 0 for now\ndevices = [0]  # the fast card\nmax_model_len = 2048')
    + "\n# m2 stays as it is\n"
    + model("m2", "# a second model, untouched\n")
)


def test_assign_keeps_the_comments_of_agent_toml(tmp_path: Path) -> None:
    with running_agent(tmp_path, CATALOG, sim_gpus=(24, 24)) as agent:
        before = agent.config.read_text()
        code, raw = agent.api("POST", "/models/m1/assign", {"devices": "1", "gpu_memory_utilization": 0.25, "max_model_len": None})
        assert code == 200 and json.loads(raw)["saved"]["saved"], raw
        after = agent.config.read_text()
        for line in before.splitlines():
            if "#" in line and "devices" not in line:
                assert line in after, (line, after)  # every comment line survives
        assert "# the fast card" in after  # the comment after a changed value too
        saved = tomllib.loads(after)
        m1 = saved["models"]["m1"]
        assert m1["devices"] == [1] and m1["gpu_memory_utilization"] == 0.25
        assert "max_model_len" not in m1 and "memory_gib" not in m1  # removed: one budget, engine default length
        assert saved["models"]["m2"] == tomllib.loads(before)["models"]["m2"]
        # Everything outside [models.m1] is byte for byte as it was.
        head = before.split("[models.m1]")[0]
        tail = before.split("# m2 stays as it is")[1]
        assert after.startswith(head) and after.endswith(tail)
