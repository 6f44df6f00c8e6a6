"""The environment a standby hands an engine: vLLM's engine core forked from the warm process."""

from mvllm.agent.warm_launcher import handoff_env


def test_vllm_engine_core_forks_from_the_standby() -> None:
    env = handoff_env("vllm", {"CUDA_VISIBLE_DEVICES": "1"})
    assert env == {"CUDA_VISIBLE_DEVICES": "1", "VLLM_WORKER_MULTIPROC_METHOD": "fork"}


def test_an_entrys_own_start_method_wins() -> None:
    src = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert handoff_env("vllm", src)["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert src == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}  # the plan's env is not changed


def test_the_sim_gets_its_env_unchanged() -> None:
    assert handoff_env("sim", {"A": "1"}) == {"A": "1"}
