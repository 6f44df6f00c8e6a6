import math

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from mvllm.common.prom import iter_samples, sum_by_label


def test_reads_what_prometheus_client_writes():
    reg = CollectorRegistry()
    g = Gauge("vllm:num_requests_running", "running", ["model_name", "engine"], registry=reg)
    g.labels(model_name="a", engine="0").set(3)
    g.labels(model_name="a", engine="1").set(2)
    g.labels(model_name='b"q', engine="0").set(1)
    c = Counter("vllm:prompt_tokens", "prompt", ["model_name"], registry=reg)
    c.labels(model_name="a").inc(7)
    text = generate_latest(reg).decode()
    samples = list(iter_samples(text, {"vllm:num_requests_running", "vllm:prompt_tokens_total"}))
    assert sum_by_label(samples, "vllm:num_requests_running", "model_name") == {"a": 5.0, 'b"q': 1.0}
    assert sum_by_label(samples, "vllm:prompt_tokens_total", "model_name") == {"a": 7.0}


def test_skips_bad_lines_and_reads_special_values():
    text = "\n".join(
        [
            "# HELP x y",
            "x_bucket{le=\"+Inf\"} 4",
            "broken{a=1} 2",
            "novalue",
            "plain 2.5",
            "inf +Inf",
        ]
    )
    samples = {s.name: s for s in iter_samples(text)}
    assert samples["x_bucket"].labels == {"le": "+Inf"}
    assert samples["plain"].value == 2.5
    assert math.isinf(samples["inf"].value)
    assert "broken" not in samples and "novalue" not in samples
