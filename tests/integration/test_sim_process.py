"""`python -m mvllm sim serve` as a real subprocess: flags, startup, SIGTERM, crash, environment switches."""

import json
import signal
import socket
import threading
import time
import urllib.request

import openai
import pytest

from tests.procs import Proc, free_port, http_get, run_sim, wait_http_ok
from tests.support import FAST_SIM_ARGS


def post(url, body, timeout=10.0):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def refused(port) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_real_command_line_with_unknown_vllm_flags(tmp_path):
    extra = ["--served-model-name", "first", "second", "--dtype", "half", "--trust-remote-code", "-pp", "2",
             "--enable-chunked-prefill", "--max-num-batched-tokens", "8192", *FAST_SIM_ARGS]
    with run_sim(tmp_path, "org/some-model", extra) as sim:
        c = openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=10)
        assert [m.id for m in c.models.list().data] == ["first", "second"]
        r = c.chat.completions.create(model="second", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.model == "first" and r.usage.completion_tokens == 5
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="first", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True))
        assert text == r.choices[0].message.content
        _, metrics = http_get(sim.url + "/metrics")
        assert b'vllm:num_requests_running{engine="0",model_name="first"} 0.0' in metrics
        log = sim.proc.log()
    warnings = [line for line in log.splitlines() if "ignoring flags" in line]
    assert len(warnings) == 1
    assert "--dtype half" in warnings[0] and "--max-num-batched-tokens 8192" in warnings[0]


def test_port_refuses_connections_until_startup_is_over(tmp_path):
    port = free_port()
    proc = Proc(["sim", "serve", "m", "--port", str(port), "--sim-startup-s", "1.5", *FAST_SIM_ARGS],
                tmp_path / "startup.log").start()
    try:
        t0 = time.monotonic()
        time.sleep(0.5)
        assert proc.popen.poll() is None and refused(port)
        wait_http_ok(f"http://127.0.0.1:{port}/health", 20, proc.popen)
        assert time.monotonic() - t0 >= 1.4
    finally:
        proc.stop()


def _stream_in_thread(url, max_tokens, out):
    def run():
        try:
            _, body = post(url + "/v1/chat/completions", {
                "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "stream": True}, timeout=30)
            out["body"] = body
        except Exception as exc:  # the test inspects what the client saw
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    with run_sim(tmp_path, "m", ["--shutdown-timeout", "10", "--sim-ttft-ms", "2", "--sim-itl-ms", "20"]) as sim:
        out = {}
        t = _stream_in_thread(sim.url, 40, out)  # about 0.8 s of tokens
        time.sleep(0.3)
        sim.proc.signal(signal.SIGTERM)
        time.sleep(0.2)
        assert refused(sim.port)  # no new connections while draining
        t.join(15)
        assert sim.proc.popen.wait(15) == 0
    assert "error" not in out
    assert out["body"].endswith(b"data: [DONE]\n\n") and out["body"].count(b'"finish_reason":"length"') == 1


def test_sigterm_with_zero_shutdown_timeout_stops_at_once(tmp_path):
    with run_sim(tmp_path, "m", ["--sim-ttft-ms", "2", "--sim-itl-ms", "20"]) as sim:
        out = {}
        t = _stream_in_thread(sim.url, 1000, out)  # 20 s of tokens
        time.sleep(0.3)
        t0 = time.monotonic()
        sim.proc.signal(signal.SIGTERM)
        assert sim.proc.popen.wait(10) == 0
        assert time.monotonic() - t0 < 5
        t.join(10)
    assert "error" in out or not out.get("body", b"").endswith(b"data: [DONE]\n\n")


def test_crash_fault_ends_the_process_with_code_1(tmp_path):
    with run_sim(tmp_path, "m", ["--sim-fail-kind", "crash", "--sim-fail-rate", "1", *FAST_SIM_ARGS]) as sim:
        with pytest.raises(OSError):
            post(sim.url + "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 1})
        assert sim.proc.popen.wait(10) == 1
        assert refused(sim.port)


def test_kv_cache_that_cannot_hold_max_model_len_fails_like_vllm(tmp_path):
    proc = Proc(["sim", "serve", "m", "--port", str(free_port()), "--gpu-memory-utilization", "0.1"],
                tmp_path / "nokv.log").start()
    try:
        assert proc.popen.wait(20) == 1
    finally:
        proc.stop()
    assert "No available memory for the cache blocks" in proc.log()


def test_environment_switches_mount_dev_and_lora_routes(tmp_path):
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with run_sim(tmp_path, "m", ["--enable-sleep-mode", "--enable-lora", *FAST_SIM_ARGS], env=env) as sim:
        assert post(sim.url + "/sleep?level=1&mode=wait", {}) == (200, b"")
        assert http_get(sim.url + "/is_sleeping") == (200, b'{"is_sleeping":true}')
        assert post(sim.url + "/wake_up", {}) == (200, b"")
        status, body = post(sim.url + "/v1/load_lora_adapter", {"lora_name": "l", "lora_path": "/nowhere"})
        assert status == 200 and body == b"Success: LoRA adapter 'l' added successfully."
        state = json.loads(http_get(sim.url + "/sim/state")[1])
        assert state["pid"] == sim.proc.pid and state["loras"] == ["l"] and state["sleep_level"] == 0
