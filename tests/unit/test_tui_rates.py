"""Rates, quantiles and errors the dashboard computes from two /metrics readings."""

from __future__ import annotations

import math

import pytest

from mvllm.tui.rates import RateHistory, parse_metrics, quantile, window


def metrics(ok: int, err: int, stream_err: int, buckets: dict[str, int]) -> str:
    lines = [
        "# HELP mvllm_requests_total Requests answered",
        "# TYPE mvllm_requests_total counter",
        f'mvllm_requests_total{{model="m",node="a",status="200"}} {ok}.0',
        f'mvllm_requests_total{{model="m",node="b",status="503"}} {err}.0',
        'mvllm_requests_total{model="m",node="a",status="404"} 1.0',
        f'mvllm_stream_errors_total{{node="a"}} {stream_err}.0',
        'mvllm_request_duration_seconds_created{model="m"} 1.7e9',
    ]
    for le, count in buckets.items():
        # Two models: their buckets add up.
        lines.append(f'mvllm_request_duration_seconds_bucket{{le="{le}",model="m"}} {count}.0')
        lines.append(f'mvllm_request_duration_seconds_bucket{{le="{le}",model="other"}} 0.0')
    return "\n".join(lines) + "\n"


def test_parse_sums_requests_errors_and_buckets() -> None:
    r = parse_metrics(metrics(10, 2, 1, {"0.1": 4, "1.0": 9, "+Inf": 12}), t=5.0)
    assert r.requests == 13  # 10 + 2 + the 404
    assert r.errors == 3  # the 503s and the broken stream; a 404 is the client's
    assert r.buckets == ((0.1, 4.0), (1.0, 9.0), (math.inf, 12.0))


def test_quantile_interpolates_inside_the_bucket() -> None:
    b = ((0.1, 50.0), (1.0, 100.0), (math.inf, 100.0))
    assert quantile(0.5, b) == pytest.approx(0.1)
    assert quantile(0.75, b) == pytest.approx(0.1 + 0.9 * 0.5)
    assert quantile(0.25, b) == pytest.approx(0.05)  # first bucket starts at 0
    assert quantile(0.5, ((0.1, 0.0), (math.inf, 0.0))) is None  # nothing observed
    assert quantile(0.5, ()) is None


def test_quantile_in_the_inf_bucket_is_the_largest_finite_bound() -> None:
    assert quantile(0.99, ((0.5, 1.0), (2.0, 1.0), (math.inf, 10.0))) == 2.0


def test_window_is_the_delta_between_readings() -> None:
    old = parse_metrics(metrics(10, 2, 1, {"0.1": 4, "1.0": 9, "+Inf": 12}), t=10.0)
    new = parse_metrics(metrics(30, 4, 1, {"0.1": 4, "1.0": 29, "+Inf": 34}), t=12.0)
    w = window(old, new)
    assert w.requests == 22 and w.rps == pytest.approx(11.0)
    assert w.errors == 2 and w.errors_total == 5
    # All 22 new observations fell in (0.1, 1.0]: the median is inside that bucket.
    assert 0.1 < w.p50 < 1.0
    assert w.p50 < w.p99 <= 1.0


def test_a_counter_that_went_down_means_a_restart() -> None:
    old = parse_metrics(metrics(100, 5, 0, {"0.1": 90, "+Inf": 105}), t=0.0)
    new = parse_metrics(metrics(3, 0, 0, {"0.1": 3, "+Inf": 4}), t=1.0)
    w = window(old, new)
    assert w.requests == 4 and w.rps == pytest.approx(4.0)
    assert w.p50 is not None and w.p50 <= 0.1


def test_history_keeps_a_span_and_one_point_per_step() -> None:
    h = RateHistory(span=5.0, points=3)
    assert h.header() is None
    for i in range(8):
        h.add(parse_metrics(metrics(10 * i, 0, 0, {"0.1": 10 * i, "+Inf": 10 * i}), t=float(i)))
    assert list(h.rps_points) == [10.0, 10.0, 10.0]  # bounded to `points`
    w = h.header()
    assert w is not None and w.rps == pytest.approx(10.0)
    assert 5.0 <= w.seconds <= 6.0  # about the span, not the whole history
