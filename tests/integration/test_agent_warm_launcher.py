"""The warm launcher's contract with the simulator (issue 17): a standby handed an engine's arguments
becomes that engine with exactly its argv, environment, working directory, log and process group,
stops like a plain spawn, is replaced by a fresh standby, and leaves nothing behind; anything that
doesn't fit falls back to a plain spawn. Then the same through a real `mvllm agent`."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mvllm.agent.launch import MARKER_AGENT, MARKER_ENGINE, LaunchPlan
from mvllm.agent.warm_launcher import WarmLauncher
from tests.integration.agent_support import marked_processes, model, pid_alive, running_agent
from tests.procs import free_port
from tests.support import wait_until_async

AGENT_ID = "4242:1"


def sim_plan(port: int, **env: str) -> LaunchPlan:
    argv = [sys.executable, "-m", "mvllm", "sim", "serve", "org/warm", "--host", "127.0.0.1", "--port", str(port),
            "--sim-ttft-ms", "5", "--sim-itl-ms", "1"]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
    return LaunchPlan(argv, {**base, MARKER_AGENT: AGENT_ID, MARKER_ENGINE: "warm", **env})


def status(url: str, method: str = "GET") -> int:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


async def healthy(url: str) -> bool:
    return await asyncio.to_thread(status, url + "/health") == 200


async def test_standby_becomes_the_engine_with_its_args_env_cwd_log_and_group(tmp_path: Path) -> None:
    base_env = {k: v for k, v in os.environ.items() if k != "VLLM_SERVER_DEV_MODE"}
    launcher = WarmLauncher("sim", tmp_path / "logs", AGENT_ID, base_env=base_env)
    await launcher.start()
    assert launcher.standby is not None
    standby_pid = launcher.standby.popen.pid
    assert await launcher.standby.wait_ready(60), launcher.standby.failed
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "warm.log"
    workdir = tmp_path / "work"
    workdir.mkdir()
    handle = await launcher.launch(sim_plan(port, VLLM_SERVER_DEV_MODE="1"), log_path, "== header ==\n", workdir)
    try:
        assert handle.pid == standby_pid  # the standby itself became the engine
        await wait_until_async(lambda: healthy(url), 30, what="the handed-off sim answers /health")
        # Its environment is the plan's, not the standby's: VLLM_SERVER_DEV_MODE mounts /sleep.
        assert await asyncio.to_thread(status, url + "/sleep?level=1", "POST") == 200
        assert os.readlink(f"/proc/{handle.pid}/cwd") == str(workdir)
        assert os.getsid(handle.pid) == handle.pid and os.getpgid(handle.pid) == handle.pid
        text = log_path.read_text()
        assert text.startswith("== header ==\n") and "org/warm" in text, text[-2000:]
        # A fresh standby waits behind it.
        await wait_until_async(lambda: launcher.standby is not None, 10, what="a new standby")
        assert launcher.standby is not None and launcher.standby.popen.pid != standby_pid
        assert launcher.handoffs == 1 and launcher.fallbacks == 0
    finally:
        assert await handle.terminate(5.0)
    assert not pid_alive(handle.pid)
    next_pid = launcher.standby.popen.pid if launcher.standby else None
    await launcher.close()
    assert next_pid is not None and not pid_alive(next_pid)


async def test_a_broken_or_foreign_standby_falls_back_to_a_plain_spawn(tmp_path: Path) -> None:
    launcher = WarmLauncher("sim", tmp_path / "logs", AGENT_ID)
    await launcher.start()
    assert launcher.standby is not None
    dead = launcher.standby.popen
    dead.kill()
    dead.wait(10)
    port = free_port()
    handle = await launcher.launch(sim_plan(port), tmp_path / "plain.log", "", tmp_path)
    try:
        assert handle.pid != dead.pid and launcher.fallbacks == 1
        await wait_until_async(lambda: healthy(f"http://127.0.0.1:{port}"), 30, what="the plainly spawned sim")
    finally:
        assert await handle.terminate(5.0)
    # A plan the standby cannot become (another program) is spawned plainly; the standby stays.
    await wait_until_async(lambda: launcher.standby is not None, 10, what="the refilled standby")
    kept = launcher.standby
    other = LaunchPlan([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ))
    handle = await launcher.launch(other, tmp_path / "other.log", "", tmp_path)
    try:
        assert launcher.standby is kept and kept is not None and handle.pid != kept.popen.pid
    finally:
        assert await handle.terminate(5.0)
    await launcher.close()
    assert not pid_alive(kept.popen.pid)


@pytest.mark.timeout(120)
def test_agent_with_warm_launcher_serves_restarts_and_leaves_no_process(tmp_path: Path) -> None:
    with running_agent(tmp_path, model("m1"), top={"warm_launcher": True}) as agent:
        deadline = time.monotonic() + 30
        log_path = tmp_path / "logs" / "standby.log"
        while time.monotonic() < deadline and not log_path.exists():
            time.sleep(0.1)
        assert agent.chat("m1")  # loads through the standby
        assert "handed to standby" in agent.proc.log()
        first = agent.inst("m1")
        assert agent.api("POST", "/models/m1/unload")[0] == 200
        assert agent.chat("m1")  # the next standby serves the next cold start
        assert agent.proc.log().count("handed to standby") == 2, agent.proc.log()[-3000:]
        assert agent.inst("m1")["pid"] != first["pid"]
        agent_pid = agent.proc.pid
        assert len(marked_processes(agent_pid)) >= 2  # the engine and a waiting standby
    assert marked_processes(agent_pid) == []
