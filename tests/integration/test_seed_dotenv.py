"""vllm-server's `.env`, kept: a `.env` beside servers.toml and one beside agent.toml set the
secrets that `key_env` and `token_env` name, with `mvllm run` and `mvllm agent` started from
another directory (real processes; the test's own environment lacks every one of them)."""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path

import openai
import tomli_w

from tests.integration.agent_support import model
from tests.procs import Proc, free_port, wait_http_ok

USER_KEY = "sk-user-from-dotenv"
AGENT_TOKEN = "agent-token-from-dotenv"


def test_dotenv_beside_each_config_sets_the_secrets_it_names(tmp_path: Path) -> None:
    for name in ("MVLLM_TEST_USER_KEY", "MVLLM_TEST_AGENT_TOKEN"):
        assert name not in os.environ
    agent_dir, router_dir, elsewhere = tmp_path / "agent", tmp_path / "router", tmp_path / "work"
    for d in (agent_dir, router_dir, elsewhere):
        d.mkdir()

    agent_port, router_port = free_port(), free_port()
    base = random.randrange(20000, 32700, 50)
    agent = {
        "port": agent_port,
        "token_env": "MVLLM_TEST_AGENT_TOKEN",
        "engine": "sim",
        "engine_port_range": [base, base + 20],
        "log_dir": str(tmp_path / "logs"),
        "poll_interval": 0.2,
        "sim_gpus": [{"memory_gib": 24}],
    }
    (agent_dir / "agent.toml").write_text(tomli_w.dumps(agent) + "\n" + model("m1"))
    (agent_dir / ".env").write_text(f"MVLLM_TEST_AGENT_TOKEN={AGENT_TOKEN}\n")
    servers = {
        "agents": [{"name": "gpu-a", "url": f"http://127.0.0.1:{agent_port}", "token_env": "MVLLM_TEST_AGENT_TOKEN"}],
        "auth": {"keys": [{"name": "user", "key_env": "MVLLM_TEST_USER_KEY"}]},
    }
    (router_dir / "servers.toml").write_text(tomli_w.dumps(servers))
    (router_dir / ".env").write_text(f'# as vllm-server read it\nMVLLM_TEST_USER_KEY="{USER_KEY}"\nMVLLM_TEST_AGENT_TOKEN={AGENT_TOKEN}\n')

    agent_proc = Proc(["agent", "--config", str(agent_dir / "agent.toml")], tmp_path / "agent.log", cwd=elsewhere)
    router = Proc(
        ["run", "--console", "--config", str(router_dir / "servers.toml"), "--port", str(router_port)],
        tmp_path / "router.log",
        cwd=elsewhere,
    )
    try:
        agent_proc.start()
        wait_http_ok(f"http://127.0.0.1:{agent_port}/health", 30, agent_proc.popen)
        router.start()
        wait_http_ok(f"http://127.0.0.1:{router_port}/health", 30, router.popen)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{router_port}/v1", api_key=USER_KEY, max_retries=0, timeout=60)
        # The router took the user's key from its .env and the agent's token from the same file;
        # the agent took its own token from the .env beside agent.toml: the model loads and answers.
        reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.choices[0].message.content
        wrong = openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0, timeout=10)
        try:
            wrong.models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        assert f"read {router_dir.resolve() / '.env'}" in router.log()
        assert f"read {agent_dir.resolve() / '.env'}" in agent_proc.log()
        # The router's and the agent's console lines share one format (mvllm.common.logsetup).
        line = r"^\d\d:\d\d:\d\d INFO    mvllm\.{}[\w.]*: read .*\.env$"
        assert re.search(line.format("router"), router.log(), re.MULTILINE), router.log()
        assert re.search(line.format("agent"), agent_proc.log(), re.MULTILINE), agent_proc.log()
    finally:
        router.signal(signal.SIGTERM)
        router.stop()
        agent_proc.stop(timeout=30)
