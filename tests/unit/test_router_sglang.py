"""SGLang's load metrics (mvllm.router.fleet.engines) and `engine = "sglang"` in [servers]."""

from __future__ import annotations

import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import parse_config
from mvllm.router.fleet.engines import parse_sglang_load
from mvllm.router.fleet.scraper import parse_load

# As SGLang's SchedulerMetricsCollector exports them (labels model_name, engine_type, tp_rank, pp_rank).
ONE_RANK = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 3.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 2.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="0"} 0.28
"""


def test_running_and_queued_requests_of_one_rank():
    assert parse_sglang_load(ONE_RANK) == (3.0, 2.0, {"qwen": (3.0, 2.0)})
    assert parse_load(ONE_RANK) is None  # the vLLM reader sees nothing in it


def test_tp_ranks_repeating_the_same_requests_count_once_and_dp_replicas_add_up():
    # --enable-metrics-for-all-schedulers with tp 2 and dp 2: every TP rank reports its replica's requests.
    lines = []
    for dp, (running, queued) in {"0": (4, 1), "1": (2, 0)}.items():
        for tp in ("0", "1"):
            labels = f'dp_rank="{dp}",engine_type="unified",model_name="qwen",pp_rank="0",tp_rank="{tp}"'
            lines.append(f"sglang:num_running_reqs{{{labels}}} {running}")
            lines.append(f"sglang:num_queue_reqs{{{labels}}} {queued}")
    assert parse_sglang_load("\n".join(lines) + "\n") == (6.0, 1.0, {"qwen": (6.0, 1.0)})


def test_two_models_and_no_metrics():
    text = ONE_RANK + 'sglang:num_running_reqs{model_name="other",tp_rank="0"} 5\n'
    running, waiting, per_model = parse_sglang_load(text)
    assert (running, waiting) == (8.0, 2.0) and per_model["other"] == (5.0, 0.0)
    assert parse_sglang_load("vllm:num_requests_running 1\n") is None


def test_servers_entry_engine():
    cfg = parse_config({"servers": {"servers": [{"url": "http://a:30000", "engine": "sglang"}, {"url": "http://b:8000"}]}})
    assert [n.engine for n in cfg.nodes] == ["sglang", "vllm"]
    with pytest.raises(ConfigError, match=r"servers\.servers\[0\]\.engine"):
        parse_config({"servers": {"servers": [{"url": "http://a:30000", "engine": "tgi"}]}})
