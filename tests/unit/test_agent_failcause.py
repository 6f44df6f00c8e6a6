"""The one-line cause of a failed engine start, read from its log."""

from mvllm.agent.failcause import START_HEADER, cause_line, failure_text


def test_the_sim_memory_refusal_with_a_memory_hint():
    tail = [
        f"{START_HEADER}2026-01-01 00:00:00: starting m: ...",
        "INFO:     Started server process [12]",
        "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
    ]
    text = failure_text(1, tail, "m")
    assert text.startswith("engine exited with code 1: ValueError: No available memory for the cache blocks.")
    assert "memory_gib" in text and "`mvllm logs m`" in text and "\n" not in text


def test_vllm_engine_core_lines_name_the_root_cause_not_the_pointer():
    tail = [
        "(EngineCore_DP0 pid=77) ERROR 01-01 00:00:01 [core.py:700] EngineCore failed to start.",
        "(EngineCore_DP0 pid=77) Traceback (most recent call last):",
        '(EngineCore_DP0 pid=77)   File "x.py", line 1, in <module>',
        "(EngineCore_DP0 pid=77) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ]
    assert cause_line(tail) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."


def test_only_the_last_start_counts_and_argparse_refusals_are_causes():
    tail = [
        "ValueError: from an earlier start",
        f"{START_HEADER}2026-01-01: starting m",
        "mvllm sim serve: error: argument --sim-fail-kind: invalid choice: 'not-a-kind'",
    ]
    assert cause_line(tail) == "mvllm sim serve: error: argument --sim-fail-kind: invalid choice: 'not-a-kind'"
    text = failure_text(2, tail, "m")
    assert "memory_gib" not in text and text.endswith("(`mvllm logs m` shows the engine log)")
    assert failure_text(1, [f"{START_HEADER}x", "nothing useful"], "m") == "engine exited with code 1 (`mvllm logs m` shows the engine log)"
