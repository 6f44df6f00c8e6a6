"""Pure: a static server's load from its /metrics text, in the metric names of its engine
(`engine` of a [servers] entry): vLLM's, or SGLang's.

SGLang (python/sglang/srt/metrics/collector.py, SchedulerMetricsCollector) exports the gauges
`sglang:num_running_reqs` and `sglang:num_queue_reqs` with the labels `model_name` (its
--served-model-name), `engine_type`, `tp_rank`, `pp_rank` and, with data parallelism, `dp_rank`.
By default only tensor-parallel rank 0 of each data-parallel group records them; with
`--enable-metrics-for-all-schedulers` every TP rank repeats the same requests. So per model and
`dp_rank` only the label sets of the lowest (tp_rank, pp_rank) present are summed: one count per
data-parallel replica, never the same request twice.
"""

from __future__ import annotations

from mvllm.common.prom import iter_samples

SGLANG_RUNNING = "sglang:num_running_reqs"
SGLANG_WAITING = "sglang:num_queue_reqs"
_SGLANG = (SGLANG_RUNNING, SGLANG_WAITING)

Load = tuple[float, float, dict[str, tuple[float, float]]]


def _rank(labels: dict[str, str], name: str) -> int:
    try:
        return int(labels.get(name, "0"))
    except ValueError:
        return 0


def parse_sglang_load(text: str) -> Load | None:
    """(running, waiting, {model_name: (running, waiting)}) of an SGLang server, or None when the
    text has neither gauge (SGLang started without --enable-metrics)."""
    # (model, dp_rank) -> lowest (tp_rank, pp_rank) seen, and the sums at that rank.
    groups: dict[tuple[str, str], tuple[tuple[int, int], list[float]]] = {}
    for s in iter_samples(text, _SGLANG):
        key = (s.labels.get("model_name", ""), s.labels.get("dp_rank", ""))
        rank = (_rank(s.labels, "tp_rank"), _rank(s.labels, "pp_rank"))
        held = groups.get(key)
        if held is None or rank < held[0]:
            held = (rank, [0.0, 0.0])
            groups[key] = held
        elif rank > held[0]:
            continue  # a repeat of the same requests by another rank
        held[1][0 if s.name == SGLANG_RUNNING else 1] += s.value
    if not groups:
        return None
    per_model: dict[str, list[float]] = {}
    for (model, _dp), (_, sums) in groups.items():
        slot = per_model.setdefault(model, [0.0, 0.0])
        slot[0] += sums[0]
        slot[1] += sums[1]
    total_running = sum(v[0] for v in per_model.values())
    total_waiting = sum(v[1] for v in per_model.values())
    return total_running, total_waiting, {m: (v[0], v[1]) for m, v in per_model.items()}


def missing_metrics_message(engine: str) -> str:
    if engine == "sglang":
        return f"no {SGLANG_RUNNING}/{SGLANG_WAITING} in /metrics (start SGLang with --enable-metrics)"
    return "no vllm:num_requests_running/waiting in /metrics"
