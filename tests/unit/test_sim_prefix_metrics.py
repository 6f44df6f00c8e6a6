from mvllm.sim.config import SimConfig
from mvllm.sim.metrics import SimMetrics
from mvllm.sim.scheduler import Seq


def counts(m: SimMetrics) -> tuple[float, float]:
    labels = {"model_name": "m", "engine": "0"}
    return (m.registry.get_sample_value("vllm:prefix_cache_queries_total", labels),
            m.registry.get_sample_value("vllm:prefix_cache_hits_total", labels))


def seq(**kw) -> Seq:
    return Seq(seq_id=1, prompt_tokens=40, target_tokens=4, finish_reason="length", arrival=0.0, **kw)


def test_counts_tokens_of_new_lookups_only_as_vllm():
    m = SimMetrics(SimConfig(model="m"))
    m.on_scheduled(seq(cached_tokens=32), 0.0, True)
    assert counts(m) == (40, 32)
    # A preempted sequence's new lookup is counted apart in vLLM and not exported.
    m.on_scheduled(seq(cached_tokens=32, generated=3, preemptions=1), 1.0, False)
    assert counts(m) == (40, 32)


def test_no_prefix_counts_with_caching_off():
    m = SimMetrics(SimConfig(model="m", enable_prefix_caching=False))
    m.on_scheduled(seq(), 0.0, True)
    assert counts(m) == (0, 0)
