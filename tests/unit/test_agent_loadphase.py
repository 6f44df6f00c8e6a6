"""Load phases from real vLLM 0.25 log lines (an H200 cold start), and the time-left prediction."""

import pytest

from mvllm.agent import loadphase
from mvllm.agent.loadphase import (
    COMPILE,
    GRAPHS,
    IMPORTED,
    KV_CACHE,
    READY,
    SPAWNED,
    WEIGHTS,
    LastStart,
    PhaseTracker,
    phase_of,
    remaining_s,
    retry_after_s,
    wake_remaining_s,
)

# Lines of one cold start of `vllm serve` 0.25.0 on an H200, as the agent's engine log has them
# (with the second each was written, from its timestamp), in order, noise included.
REAL_START = [
    (0, "=== mvllm agent 2026-12-03 06:44:23: starting tiny: vllm serve /root/tiny/tiny-llama --host 127.0.0.1 --port 18170 --served-model-name tiny --tensor-parallel-size 1 --enable-sleep-mode --gpu-memory-utilization 0.299 --max-model-len 512"),
    (26, "(APIServer pid=551) INFO 12-03 06:44:49 [api_utils.py:339]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.25.0"),
    (26, "(APIServer pid=551) INFO 12-03 06:44:49 [api_utils.py:273] non-default args: {'model_tag': '/root/tiny/tiny-llama', 'host': '127.0.0.1', 'port': 18170, 'model': '/root/tiny/tiny-llama', 'max_model_len': 512, 'served_model_name': ['tiny'], 'enable_sleep_mode': True, 'gpu_memory_utilization': 0.299}"),
    (47, "(APIServer pid=551) INFO 12-03 06:45:10 [model.py:619] Resolved architecture: LlamaForCausalLM"),
    (65, "(EngineCore pid=679) INFO 12-03 06:45:28 [core.py:114] Initializing a V1 LLM engine (v0.25.0) with config: model='/root/tiny/tiny-llama', speculative_config=None"),
    (67, "(EngineCore pid=679) INFO 12-03 06:45:30 [model_runner.py:281] Loading model from scratch..."),
    (68, "(EngineCore pid=679) Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]"),
    (68, "(EngineCore pid=679) INFO 12-03 06:45:31 [default_loader.py:430] Loading weights took 0.01 seconds"),
    (69, "(EngineCore pid=679) INFO 12-03 06:45:32 [model_runner.py:302] Model loading took 0.0 GiB and 1.508261 seconds"),
    (71, "(EngineCore pid=679) INFO 12-03 06:45:34 [backends.py:1148] Dynamo bytecode transform time: 2.29 s"),
    (81, "(EngineCore pid=679) INFO 12-03 06:45:44 [monitor.py:53] torch.compile took 12.04 s in total"),
    (84, "(EngineCore pid=679) INFO 12-03 06:45:47 [gpu_worker.py:538] Available KV cache memory: 41.45 GiB"),
    (84, "(EngineCore pid=679) INFO 12-03 06:45:47 [kv_cache_utils.py:2146] GPU KV cache size: 43,459,680 tokens"),
    (84, "(EngineCore pid=679) Capturing CUDA graphs (PIECEWISE):   0%|          | 0/51 [00:00<?, ?it/s]"),
    (85, "(EngineCore pid=679) INFO 12-03 06:45:48 [model_runner.py:722] Graph capturing finished in 1 secs, took 0.11 GiB"),
    (99, "(EngineCore pid=679) INFO 12-03 06:46:02 [core.py:337] init engine (profile, create kv cache, warmup model) took 30.37 s (compilation: 12.04 s)"),
    (103, "(APIServer pid=551) INFO 12-03 06:46:06 [api_server.py:616] Starting vLLM server on http://127.0.0.1:18170"),
    (103, "(APIServer pid=551) INFO:     Application startup complete."),
]


@pytest.mark.parametrize(
    ("line", "phase"),
    [
        (REAL_START[2][1], IMPORTED),
        (REAL_START[6][1], WEIGHTS),
        (REAL_START[7][1], WEIGHTS),
        (REAL_START[9][1], COMPILE),
        (REAL_START[10][1], COMPILE),
        (REAL_START[11][1], KV_CACHE),
        (REAL_START[12][1], KV_CACHE),
        (REAL_START[13][1], GRAPHS),
        (REAL_START[16][1], READY),
        (REAL_START[17][1], READY),
        (REAL_START[0][1], None),  # the agent's own header names the command, no phase
        (REAL_START[3][1], None),
        (REAL_START[15][1], None),
    ],
)
def test_phase_of_real_lines(line, phase):
    assert phase_of(line) == phase


def test_tracker_walks_a_real_start_in_order():
    t = PhaseTracker()
    seen = [SPAWNED]
    for at, line in REAL_START:
        if t.feed(line, float(at)):
            seen.append(t.phase)
    assert seen == [SPAWNED, IMPORTED, WEIGHTS, COMPILE, KV_CACHE, GRAPHS, READY]
    assert t.offsets == {SPAWNED: 0.0, IMPORTED: 26.0, WEIGHTS: 67.0, COMPILE: 71.0, KV_CACHE: 84.0, GRAPHS: 84.0, READY: 103.0}


def test_tracker_never_goes_back_and_skips_phases():
    t = PhaseTracker()
    assert t.feed("(EngineCore pid=1) INFO ... GPU KV cache size: 10 tokens", 5.0)  # --enforce-eager: no compile
    assert not t.feed("(EngineCore pid=1) Loading safetensors checkpoint shards: 100%", 6.0)
    assert t.phase == KV_CACHE and t.since_phase(7.5) == 2.5


def test_remaining_from_the_last_start_anchors_on_the_phase():
    last = LastStart(40.0, {SPAWNED: 0.0, IMPORTED: 10.0, WEIGHTS: 20.0, READY: 40.0})
    # In weights for 5 s: that start took 20 s from weights on.
    assert remaining_s(WEIGHTS, 30.0, 5.0, last) == pytest.approx(15.0)
    # A phase the last start never showed: total minus elapsed.
    assert remaining_s(COMPILE, 30.0, 1.0, last) == pytest.approx(10.0)
    # Slower than last time: the default table of the phase, then nothing.
    assert remaining_s(IMPORTED, 60.0, 31.0, last) == pytest.approx(loadphase.DEFAULT_REMAINING_S[IMPORTED] - 31.0)
    assert remaining_s(GRAPHS, 600.0, 100.0, last) is None


def test_remaining_without_a_measure_uses_the_h200_table():
    assert remaining_s(SPAWNED, 3.0, 3.0, None) == pytest.approx(100.0)
    assert remaining_s(KV_CACHE, 90.0, 1.0, None) == pytest.approx(18.0)
    assert remaining_s("nonsense", 1.0, 1.0, None) is None


def test_wake_and_retry_after():
    assert wake_remaining_s(0.5, 2.0) == pytest.approx(1.5)
    assert wake_remaining_s(3.0, 2.0) is None and wake_remaining_s(0.0, None) is None
    assert retry_after_s(0.2, 5.0) == 1
    assert retry_after_s(7.01, 5.0) == 8
    assert retry_after_s(None, 5.0) == 5
    assert retry_after_s(0.0, 5.0) == 5
