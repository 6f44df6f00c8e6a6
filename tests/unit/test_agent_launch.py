"""Engine command lines and environments for vllm and the simulator."""

import sys

from mvllm.agent.config import GIB, parse_config
from mvllm.agent.launch import MARKER_AGENT, MARKER_ENGINE, launch_plan


def cfg(engine="vllm", **model):
    return parse_config(
        {"engine": engine, "engine_binary": "/opt/vllm/bin/vllm", "models": {"m": {"model": "org/m", **model}}}
    )


def test_vllm_command_and_env():
    c = cfg(
        served_model_name=["m", "m2"], devices=[2, 3], max_model_len=4096, max_num_seqs=32,
        extra_args=["--enforce-eager"], env={"HF_HOME": "/hf"}, lora_adapters={"a": "/l/a"},
    )
    plan = launch_plan(c, c.models["m"], 9005, 0.4567, 80 * GIB, "123:456", {"PATH": "/bin", "VLLM_USE_FLASHINFER_SAMPLER": "0"})
    a = plan.argv
    assert a[:3] == ["/opt/vllm/bin/vllm", "serve", "org/m"]
    assert a[a.index("--host") + 1] == "127.0.0.1" and a[a.index("--port") + 1] == "9005"
    assert a[a.index("--served-model-name") + 1 : a.index("--served-model-name") + 3] == ["m", "m2"]
    assert a[a.index("--gpu-memory-utilization") + 1] == "0.457"
    assert a[a.index("--tensor-parallel-size") + 1] == "2"
    assert "--enable-sleep-mode" in a and "--enable-lora" in a and a[-1] == "--enforce-eager"
    assert not any(x.startswith("--sim-") for x in a)
    e = plan.env
    assert e["CUDA_VISIBLE_DEVICES"] == "2,3" and e["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert e["VLLM_SERVER_DEV_MODE"] == "1" and e["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert e["VLLM_USE_FLASHINFER_SAMPLER"] == "0" and e["HF_HOME"] == "/hf"
    assert e[MARKER_ENGINE] == "m" and e[MARKER_AGENT] == "123:456"


def test_no_lora_env_without_adapters():
    c = cfg()
    plan = launch_plan(c, c.models["m"], 9001, None, None, "1:1", {})
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plan.env
    assert "--gpu-memory-utilization" not in plan.argv and "--enable-lora" not in plan.argv


def test_sim_command_carries_sim_flags():
    c = cfg("sim", sim={"weights_gib": 2, "startup_s": 0.5})
    plan = launch_plan(c, c.models["m"], 9001, 0.25, 24 * GIB, "1:1", {})
    a = plan.argv
    assert a[:6] == [sys.executable, "-m", "mvllm", "sim", "serve", "org/m"]
    assert a[a.index("--sim-gpu-memory-gib") + 1] == "24"
    assert a[a.index("--sim-weights-gib") + 1] == "2"
    assert a[a.index("--sim-startup-s") + 1] == "0.5"


def test_sim_weights_follow_the_entrys_budget_when_it_names_none():
    # memory_gib = 14 on a 24 GiB GPU: utilization 14/24; the weights take half of the 14 GiB.
    c = cfg("sim", memory_gib=14)
    a = launch_plan(c, c.models["m"], 9001, 14 / 24, 24 * GIB, "1:1", {}).argv
    assert float(a[a.index("--sim-weights-gib") + 1]) == 7.0
    # With tensor parallelism, the flag counts every GPU's share.
    c = parse_config({"engine": "sim", "sim_gpus": [{"memory_gib": 24}] * 2,
                      "models": {"m": {"model": "org/m", "memory_gib": 14, "devices": [0, 1]}}})  # fmt: skip
    a = launch_plan(c, c.models["m"], 9001, 14 / 24, 24 * GIB, "1:1", {}).argv
    assert float(a[a.index("--sim-weights-gib") + 1]) == 14.0
    # An estimate (param_count, no budget): its weights per GPU.
    c = cfg("sim", param_count=7)
    est = c.models["m"].memory_estimate
    assert est is not None and est.weights_bytes
    a = launch_plan(c, c.models["m"], 9001, 0.8, 80 * GIB, "1:1", {}).argv
    assert float(a[a.index("--sim-weights-gib") + 1]) == round(est.weights_bytes / GIB, 3)
    # Nothing to go by: the sim's own default.
    c = cfg("sim")
    assert "--sim-weights-gib" not in launch_plan(c, c.models["m"], 9001, None, None, "1:1", {}).argv


def test_token_env_is_not_passed_to_engines(monkeypatch):
    monkeypatch.setenv("TOK", "secret")
    c = parse_config({"token_env": "TOK", "models": {"m": {"model": "x"}}})
    plan = launch_plan(c, c.models["m"], 9001, None, None, "1:1", {"TOK": "secret", "PATH": "/bin"})
    assert "TOK" not in plan.env and plan.env["PATH"] == "/bin"
