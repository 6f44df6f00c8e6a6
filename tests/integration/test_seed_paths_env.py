"""Seed parity, paths and config: `mvllm run` as a real process configured by MVLLM_* variables
(over its file, under its flags), writing its log file, and serving the un-versioned OpenAI paths
(`/chat/completions`, `/completions`, `/embeddings`, `/models`) that the simulated engine, like
vLLM, only knows in their /v1 form."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import openai
import tomli_w

from tests.procs import Proc, free_port, http_get, run_sim, wait_http_ok
from tests.support import FAST_SIM_ARGS


def _write_config(path: Path, sim_url: str, **router: object) -> Path:
    doc = {"router": router, "servers": {"servers": [{"url": sim_url, "name": "sim-1"}]},
           "config": {"health_check_interval": 0.5, "scrape_interval": 0.2}}  # fmt: skip
    path.write_text(tomli_w.dumps(doc))
    return path


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_env_overrides_file_and_unversioned_paths(tmp_path: Path) -> None:
    with run_sim(tmp_path, "sim-model", FAST_SIM_ARGS) as sim:
        file_port, env_port = free_port(), free_port()
        cfg = _write_config(tmp_path / "elsewhere.toml", sim.url, port=file_port, log_level="warning")
        log_file = tmp_path / "logs" / "router.log"
        env = {"MVLLM_CONFIG": str(cfg), "MVLLM_PORT": str(env_port), "MVLLM_LOG_LEVEL": "info",
               "MVLLM_LOG_FILE": str(log_file), "MVLLM_LOG_MAX_BYTES": "65536"}  # fmt: skip
        router = Proc(["run", "--console"], tmp_path / "router.out", env).start()
        try:
            base = f"http://127.0.0.1:{env_port}"
            wait_http_ok(base + "/health", 20, router.popen)
            assert not _listening(file_port)  # MVLLM_PORT beat [router] port

            # The OpenAI SDK with a base URL without /v1 sends the un-versioned paths.
            c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)
            chat = c.chat.completions.with_raw_response.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            assert chat.http_request.url.path == "/chat/completions"
            assert chat.headers["x-mvllm-node"] == "sim-1" and chat.parse().choices[0].message.content
            stream = c.chat.completions.create(
                model="sim-model", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
            assert c.completions.create(model="sim-model", prompt="Once", max_tokens=4).choices[0].text
            assert len(c.embeddings.create(model="sim-model", input=["a", "b"]).data) == 2
            status, unversioned = http_get(base + "/models")
            assert status == 200
            assert json.loads(unversioned) == json.loads(http_get(base + "/v1/models")[1])
            assert [m.id for m in c.models.list()] == ["sim-model"]
            status, card = http_get(base + "/models/sim-model")
            assert status == 200 and json.loads(card)["id"] == "sim-model"
        finally:
            router.signal(signal.SIGTERM)
            router.stop()
        text = log_file.read_text()
        # INFO lines: MVLLM_LOG_LEVEL=info beat the file's log_level = "warning".
        assert "INFO    mvllm.router: router listening on" in text
        assert "logging to" in router.log()


def test_flags_beat_environment(tmp_path: Path) -> None:
    with run_sim(tmp_path, "sim-model", FAST_SIM_ARGS) as sim:
        env_port, flag_port = free_port(), free_port()
        cfg = _write_config(tmp_path / "servers.toml", sim.url)
        env = {"MVLLM_CONFIG": str(tmp_path / "missing.toml"), "MVLLM_PORT": str(env_port), "MVLLM_LOG_LEVEL": "bogus"}
        bad = Proc(["run", "--console"], tmp_path / "bad.out", env).start()
        assert bad.popen.wait(timeout=20) == 2  # an invalid variable is named, not ignored
        assert "environment variable MVLLM_LOG_LEVEL" in bad.log()
        bad.stop()
        env["MVLLM_LOG_LEVEL"] = "info"
        router = Proc(
            ["run", "--console", "--config", str(cfg), "--port", str(flag_port), "--log-level", "warning"],
            tmp_path / "router.out",
            env,
        ).start()
        try:
            wait_http_ok(f"http://127.0.0.1:{flag_port}/health", 20, router.popen)
            assert not _listening(env_port)
            assert os.path.exists(cfg)
        finally:
            router.stop()
        assert "router listening on" not in router.log()  # --log-level warning beat MVLLM_LOG_LEVEL=info
