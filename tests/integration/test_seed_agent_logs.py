"""Seed parity on the agent side, with real `mvllm agent` processes (engine = "sim"):

- MVLLM_AGENT_* variables over agent.toml; HF_* and proxy variables reaching the engines, a
  catalog entry's `env` winning; the agent's token kept out of them;
- the memory estimate of catalog models without a budget, read from config.json in the HF cache,
  shown in /state and used by placement (two estimated models share a GPU that two default
  budgets could not);
- engine logs capped by rotation, read through the router by tail and by cursor (across a
  rotation), `mvllm logs -f`, `/admin/logs/stats` and `/admin/logs/cleanup`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from mvllm.common.logfiles import file_logging
from mvllm.router.app import running_router
from mvllm.router.config import load_config
from tests.integration.agent_support import TOKEN, Agent
from tests.procs import Proc, wait_http_ok
from tests.support import wait_until_async

GIB = 1024**3
SIM = "sim = { ttft_ms = 2, itl_ms = 1, weights_gib = 1 }"
QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
}  # fmt: skip


class EnvAgent(Agent):
    """An Agent started with extra environment (and its config named by MVLLM_AGENT_CONFIG)."""

    def start_with(self, env: dict[str, str]) -> EnvAgent:
        self.proc = Proc(["agent"], self.tmp_path / f"agent-{self.port}.log", {"MVLLM_AGENT_CONFIG": str(self.config), **env})
        self.proc.start()
        self.pids.append(self.proc.pid)
        try:
            wait_http_ok(f"{self.url}/health", 30, self.proc.popen)
        except BaseException:
            print(self.proc.log()[-3000:])
            raise
        return self


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def hf_cache(root: Path, repo: str, config: dict[str, Any]) -> Path:
    repo_dir = root / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "snapshots" / "c0ffee").mkdir(parents=True)
    (repo_dir / "snapshots" / "c0ffee" / "config.json").write_text(json.dumps(config))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("c0ffee")
    return root


def test_agent_env_pass_through_and_memory_estimate(tmp_path: Path) -> None:
    hf_home = hf_cache(tmp_path / "hf", "Qwen/Qwen2.5-0.5B", QWEN)
    catalog = (
        f'[models.q1]\nmodel = "Qwen/Qwen2.5-0.5B"\n{SIM}\n'
        f'[models.q2]\nmodel = "Qwen/Qwen2.5-0.5B"\nenv = {{ HF_ENDPOINT = "https://entry-mirror.example" }}\n{SIM}\n'
    )
    agent = EnvAgent(tmp_path, catalog, sim_gpus=(12,), top={"port": 1, "token": "token-of-the-file"})
    env = {
        "MVLLM_AGENT_PORT": str(agent.port),  # the file says port 1
        "MVLLM_AGENT_TOKEN": TOKEN,
        "HF_HOME": str(hf_home), "HF_TOKEN": "hf_secret", "HUGGING_FACE_HUB_TOKEN": "hf_secret2",
        "HF_ENDPOINT": "https://agent-mirror.example", "HF_HUB_OFFLINE": "1",
        "HTTPS_PROXY": "http://proxy.example:3128", "http_proxy": "http://proxy.example:3128", "no_proxy": "localhost",
    }  # fmt: skip
    try:
        agent.start_with(env)
        assert agent.api("GET", "/state", token="token-of-the-file")[0] == 401  # MVLLM_AGENT_TOKEN won
        state = agent.state()
        entry = next(c for c in state["catalog"] if c["name"] == "q1")
        est = entry["memory_estimate"]
        assert est["bytes"] == int(4.5 * GIB) == entry["memory_bytes"]
        assert "0.49B params bfloat16" in est["basis"] and "KV 4 x 32768 tok" in est["basis"]
        assert "estimated 4.5 GiB per GPU" in agent.proc.log()

        assert agent.chat("q1") and agent.chat("q2")
        insts = {i["name"]: i for i in agent.state()["instances"]}
        # 4.5 + 4.5 GiB fit in 12 - 1 (reserve): nobody evicted. With the default 0.9 x 12 GiB each,
        # the second load would have put the first to sleep.
        assert insts["q1"]["state"] == "ready" and insts["q2"]["state"] == "ready"
        argv = Path(f"/proc/{insts['q1']['pid']}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--gpu-memory-utilization") + 1] == b"0.375"  # 4.5 GiB of 12

        e1, e2 = environ_of(insts["q1"]["pid"]), environ_of(insts["q2"]["pid"])
        for name in ("HF_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HTTPS_PROXY", "http_proxy",
                     "no_proxy"):  # fmt: skip
            assert e1[name] == env[name], name
        assert e1["HF_ENDPOINT"] == "https://agent-mirror.example"
        assert e2["HF_ENDPOINT"] == "https://entry-mirror.example"  # the catalog entry's env wins
        assert "MVLLM_AGENT_TOKEN" not in e1 and "MVLLM_AGENT_TOKEN" not in e2
    finally:
        agent.stop()


def append(path: Path, text: str) -> None:
    """Write to an engine's log as the engine does (its stdout is opened for appending)."""
    with open(path, "a") as out:
        out.write(text)


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as resp:
        return resp.status, await resp.json()


async def _post(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.post(url) as resp:
        return resp.status, await resp.json()


async def test_engine_logs_rotation_follow_stats_and_cleanup(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    top = {"engine_log_max_bytes": 1024, "engine_log_backups": 2, "log_check_interval": 0.1,
           "log_file": str(tmp_path / "agent-own.log"), "log_retention_days": 30}  # fmt: skip
    agent = Agent(tmp_path, f'[models.m1]\nmodel = "org/m1"\nmemory_gib = 4\n{SIM}\n', top=top)
    router_log = tmp_path / "router.log"
    cfg_path = tmp_path / "servers.toml"
    cfg_path.write_text(tomli_w.dumps({
        "router": {"log_file": str(router_log)},
        "agents": [{"url": agent.url, "name": "a1", "token": TOKEN, "load_timeout": 30}],
        "config": {"scrape_interval": 0.1, "health_check_interval": 0.3},
    }))  # fmt: skip
    follower: Proc | None = None
    try:
        agent.start()
        config = load_config(cfg_path, environ={})
        with file_logging(config.log):
            async with running_router(config, host="127.0.0.1", port=0, config_path=cfg_path, watch=False) as r, \
                    aiohttp.ClientSession() as s:  # fmt: skip
                await wait_until_async(lambda: "m1" in r.state.registry.models(), what="the agent's catalog read")
                assert (await _post(s, r.url + "/admin/models/m1/load"))[0] == 200

                status, doc = await _get(s, r.url + "/admin/models/m1/logs?tail=50")
                assert status == 200 and doc["node"] == "a1" and doc["instance"] == "m1"
                assert "=== mvllm agent" in doc["text"] and "mvllm sim serving" in doc["text"]
                cursor = doc["cursor"]

                follower = Proc(["logs", "m1", "-f", "--router", r.url, "--interval", "0.1", "--tail", "5"],
                                tmp_path / "follow.out").start()  # fmt: skip
                await wait_until_async(lambda: "mvllm sim serving" in follower.log(), 20, what="mvllm logs -f printed the tail")

                # The engine writes a lot (appended as its stdout is): the agent rotates it.
                filler = "".join(f"filler line {i:04d} of the engine\n" for i in range(100))
                append(logs / "m1.log", filler + "MARKER-AFTER-ROTATION\n")
                await wait_until_async(lambda: (logs / "m1.log.1").exists(), 10, what="m1.log rotated")
                assert (logs / "m1.log").stat().st_size < 1024

                status, nxt = await _get(s, r.url + f"/admin/models/m1/logs?cursor={cursor}")
                assert status == 200 and not nxt["skipped"]
                assert nxt["text"].endswith(filler + "MARKER-AFTER-ROTATION\n")  # nothing lost across it
                await wait_until_async(lambda: "MARKER-AFTER-ROTATION" in follower.log(), 20, what="the follower saw the new lines")
                assert follower.log().count("filler line 0099") == 1
                append(logs / "m1.log", "LATER LINE\n")
                await wait_until_async(lambda: "LATER LINE" in follower.log(), 20, what="the follower keeps following")

                assert (await _get(s, r.url + "/admin/models/m1/logs?cursor=bogus"))[0] == 400
                assert (await _get(s, r.url + "/admin/models/nope/logs"))[0] == 404

                status, stats = await _get(s, r.url + "/admin/logs/stats")
                assert status == 200
                assert stats["router"]["files"][0]["path"] == str(router_log) and stats["router"]["files"][0]["active"]
                agent_files = {f["name"]: f for f in stats["agents"]["a1"]["files"]}
                assert {"m1.log", "m1.log.1", "agent-own.log"} <= agent_files.keys()
                assert agent_files["agent-own.log"]["kind"] == "agent" and agent_files["m1.log"]["active"]
                assert stats["total"]["bytes"] >= sum(f["bytes"] for f in agent_files.values())

                old = time.time() - 40 * 86400
                for name in ("m1.log.1", "gone.log"):
                    (logs / name).touch()
                    os.utime(logs / name, (old, old))
                (tmp_path / "router.log.1").write_text("old router lines\n")
                os.utime(tmp_path / "router.log.1", (old, old))
                status, done = await _post(s, r.url + "/admin/logs/cleanup")  # each part's own retention
                assert status == 200
                assert "skipped" in done["router"]  # no log_retention_days in [router]
                assert {f["name"] for f in done["agents"]["a1"]["removed"]} == {"m1.log.1", "gone.log"}
                assert (logs / "m1.log").exists() and not (logs / "m1.log.1").exists()
                status, done = await _post(s, r.url + "/admin/logs/cleanup?days=10")
                assert [f["name"] for f in done["router"]["removed"]] == ["router.log.1"] and router_log.exists()
                assert (await _post(s, r.url + "/admin/logs/cleanup?days=soon"))[0] == 400
        assert "agent ready" in (tmp_path / "agent-own.log").read_text()
    finally:
        if follower is not None:
            follower.stop()
        agent.stop()
