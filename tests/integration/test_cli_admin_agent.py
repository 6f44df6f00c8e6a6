"""`mvllm load/sleep/wake/unload` through the router to an `mvllm agent` with simulated engines (all
real processes): progress until the state settles with the elapsed time, `mvllm ps` showing where
each model is, and a failing load ending with the router's message and the engine's log tail."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.integration.agent_support import TOKEN, model, running_agent
from tests.integration.test_cli_admin import mvllm, start_router
from tests.support import write_servers

CATALOG = (
    model("m1", sim="sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 0.5 }")
    + model("m2")
    + model("deep", "sleep_level_on_idle = 2")
    # An invalid sim flag: the engine exits at once, every time.
    + model("broken", 'extra_args = ["--sim-fail-kind", "not-a-kind"]')
)


def models_row(ps: str, name: str) -> list[str]:
    line = next(line for line in ps.splitlines() if line.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())


def test_load_sleep_wake_unload_and_a_failed_load(tmp_path: Path) -> None:
    with running_agent(tmp_path, CATALOG, sim_gpus=(24,), top={"restart_max": 1, "restart_backoff": 0.1}) as agent:
        config = write_servers(tmp_path / "servers.toml", [])
        config.write_text(config.read_text() + f'\n[[agents]]\nname = "gpu-a"\nurl = "{agent.url}"\ntoken = "{TOKEN}"\n')
        router = start_router(tmp_path, config)
        url = router.url  # type: ignore[attr-defined]
        try:
            ps = mvllm("ps", router=url).stdout
            assert models_row(ps, "m1") == ["m1", "-", "-", "gpu-a", "0", "0", "0"]  # loadable on the agent, 0 replicas
            assert "gpu-a  0    mvllm simulated GPU  0.0G/24.0G (0%)" in ps

            out = mvllm("load", "m1", "--node", "gpu-a", router=url)
            assert out.returncode == 0, out.stderr
            done = re.fullmatch(r"m1 on gpu-a: ready \((\d+\.\d)s\)\n", out.stdout)
            assert done and 0.4 <= float(done.group(1)) < 30, out.stdout  # the engine takes 0.5 s to start
            # Progress while it loaded (one line per state without a terminal).
            assert re.search(r"loading m1 on gpu-a: (starting|asked)\s+\d+\.\ds", out.stderr), out.stderr
            assert agent.inst("m1")["state"] == "ready"
            ps = mvllm("ps", router=url).stdout
            assert models_row(ps, "m1")[:5] == ["m1", "gpu-a", "-", "-", "1"]  # one replica
            assert "10.0G/24.0G (42%)" in ps  # its memory budget, held on the GPU

            out = mvllm("sleep", "m1", "--level", "2", router=url)  # the router picks where it is awake
            assert out.returncode == 0 and out.stdout.startswith("m1 on gpu-a: sleeping(2) ("), out.stdout + out.stderr
            assert models_row(mvllm("ps", router=url).stdout, "m1")[:3] == ["m1", "-", "gpu-a(2)"]
            out = mvllm("wake", "m1", router=url)
            assert out.returncode == 0 and out.stdout.startswith("m1 on gpu-a: ready ("), out.stdout + out.stderr
            out = mvllm("unload", "m1", "--json", router=url)
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
            assert doc["ok"] and doc["result"]["state"] in ("stopped", "stopping") and doc["elapsed_s"] > 0
            assert agent.inst("m1")["state"] == "stopped"

            # Without --level, the model's own sleep_level_on_idle (2 here), not a CLI default.
            assert mvllm("load", "deep", router=url).returncode == 0
            out = mvllm("sleep", "deep", router=url)
            assert out.returncode == 0 and out.stdout.startswith("deep on gpu-a: sleeping(2) ("), out.stdout + out.stderr
            assert mvllm("unload", "deep", router=url).returncode == 0

            out = mvllm("load", "broken", router=url)
            assert out.returncode == 1
            assert re.search(r"mvllm: error: load broken failed after \d+\.\ds: .*broken failed", out.stderr), out.stderr
            # One line naming the cause in the engine's own words, and where the whole log is.
            error = next(line for line in out.stderr.splitlines() if line.startswith("mvllm: error:"))
            assert "not-a-kind" in error and "mvllm logs broken" in error, out.stderr
            assert "engine log (last lines)" not in out.stderr and len(out.stderr.splitlines()) < 8, out.stderr
            ps = mvllm("ps", router=url).stdout
            assert models_row(ps, "broken")[:4] == ["broken", "-", "-", "gpu-a"], ps  # FAILED, not AWAKE
            assert next(line for line in ps.splitlines() if line.startswith("MODEL")).split()[3] == "FAILED"
            logs = mvllm("logs", "broken", router=url)
            assert logs.returncode == 0 and "not-a-kind" in logs.stdout, logs.stdout + logs.stderr
            # A failed model is retried by a load without --node (the agent starts it afresh).
            out = mvllm("load", "broken", router=url)
            assert out.returncode == 1 and "no agent can load" not in out.stderr and "not-a-kind" in out.stderr, out.stderr

            out = mvllm("load", "nope", router=url)
            assert out.returncode == 1 and "no agent's catalog has model `nope`" in out.stderr
            out = mvllm("sleep", "m1", "--node", "nowhere", router=url)
            assert out.returncode == 1 and "no node named 'nowhere'" in out.stderr
        finally:
            router.stop()


def test_load_of_a_model_failed_on_one_agent_goes_to_another(tmp_path: Path) -> None:
    bad = model("flaky", 'extra_args = ["--sim-fail-kind", "not-a-kind"]')  # cannot start on gpu-a
    good = model("flaky")
    top = {"restart_max": 0, "restart_backoff": 0.1}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running_agent(tmp_path / "a", bad, sim_gpus=(24,), top=top) as a, running_agent(tmp_path / "b", good, sim_gpus=(24,), top=top) as b:
        config = write_servers(tmp_path / "servers.toml", [])
        entries = "".join(f'\n[[agents]]\nname = "{n}"\nurl = "{x.url}"\ntoken = "{TOKEN}"\n' for n, x in (("gpu-a", a), ("gpu-b", b)))
        config.write_text(config.read_text() + entries)
        router = start_router(tmp_path, config)
        url = router.url  # type: ignore[attr-defined]
        try:
            out = mvllm("load", "flaky", "--node", "gpu-a", router=url)
            assert out.returncode == 1 and "not-a-kind" in out.stderr, out.stderr
            assert a.inst("flaky")["state"] == "failed"
            out = mvllm("load", "flaky", router=url)  # no --node: the router picks where it can load
            assert out.returncode == 0 and out.stdout.startswith("flaky on gpu-b: ready"), out.stdout + out.stderr
            assert b.inst("flaky")["state"] == "ready"
        finally:
            router.stop()
