"""The benchmark suite's pure statistics: percentiles, run summaries, Poisson schedules."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from benchmarks.stats import (
    RequestRecord,
    added,
    max_concurrency,
    percentile,
    poisson_arrivals,
    ratio,
    records_between,
    run_stats,
    summarize,
    wall_time,
)


def test_percentile_interpolates_linearly_between_ranks():
    data = [1.0, 2.0, 3.0, 4.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 4.0
    assert percentile(data, 50) == pytest.approx(2.5)
    # rank (n-1)*q = 3*0.9 = 2.7 -> 3 + 0.7*(4-3)
    assert percentile(data, 90) == pytest.approx(3.7)


def test_percentile_matches_statistics_quantiles_inclusive():
    rng = random.Random(7)
    data = sorted(rng.expovariate(10.0) for _ in range(1001))
    cuts = statistics.quantiles(data, n=100, method="inclusive")
    assert percentile(data, 50) == pytest.approx(cuts[49])
    assert percentile(data, 99) == pytest.approx(cuts[98])


def test_percentile_edge_cases():
    assert math.isnan(percentile([], 50))
    assert percentile([0.25], 99) == 0.25
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_summarize_sorts_its_input_and_reports_the_tail():
    d = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert d.n == 5
    assert d.mean == pytest.approx(3.0)
    assert d.p50 == 3.0
    assert d.max == 5.0
    assert d.p99 == pytest.approx(4.96)
    empty = summarize([])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.p99)


def _rec(start, end, ttft=None, error=None, node=None, status=200):
    return RequestRecord(start=start, end=end, ttft=ttft, status=status, error=error, node=node)


def test_run_stats_counts_errors_nodes_and_throughput():
    records = [
        _rec(0.0, 0.1, 0.02, node="a"),
        _rec(0.1, 0.3, 0.05, node="b"),
        _rec(0.2, 0.4, 0.04, node="a"),
        _rec(0.3, 0.35, None, error="http_500", status=500, node="b"),
        _rec(0.5, 2.0, None, error="timeout", status=None),
    ]
    st = run_stats(records)
    assert st.requests == 5
    assert st.ok == 3
    assert st.error_count == 2
    assert st.errors == {"http_500": 1, "timeout": 1}
    # Only successes count per node: an error's node served nothing.
    assert st.per_node == {"a": 2, "b": 1}
    assert st.wall_s == pytest.approx(2.0)
    assert st.throughput == pytest.approx(1.5)
    # Latencies are of successes only.
    assert st.e2e.max == pytest.approx(0.2)
    assert st.e2e.mean == pytest.approx((0.1 + 0.2 + 0.2) / 3)
    assert st.ttft.p50 == pytest.approx(0.04)


def test_run_stats_uses_a_given_time_base_and_handles_no_records():
    st = run_stats([_rec(0.0, 1.0, 0.5)], wall_s=4.0)
    assert st.throughput == pytest.approx(0.25)
    none = run_stats([])
    assert none.requests == 0 and none.throughput == 0.0 and none.per_node == {}
    assert wall_time([]) == 0.0


def test_success_without_ttft_is_left_out_of_the_ttft_distribution():
    st = run_stats([_rec(0.0, 1.0, None), _rec(0.0, 2.0, 0.5)])
    assert st.ok == 2
    assert st.ttft.n == 1
    assert st.e2e.n == 2


def test_records_between_selects_by_start_or_end_half_open():
    records = [_rec(t, t + 1) for t in (0.0, 1.0, 2.0, 3.0)]
    assert [r.start for r in records_between(records, 1.0, 3.0)] == [1.0, 2.0]
    assert [r.end for r in records_between(records, 1.0, 3.0, by_end=True)] == [1.0, 2.0]


def test_max_concurrency_counts_overlap_not_touching_intervals():
    assert max_concurrency([]) == 0
    assert max_concurrency([_rec(0.0, 1.0), _rec(1.0, 2.0), _rec(2.0, 3.0)]) == 1
    nested = [_rec(0.0, 10.0), _rec(1.0, 5.0), _rec(2.0, 3.0), _rec(4.0, 6.0), _rec(7.0, 8.0)]
    assert max_concurrency(nested) == 3
    assert max_concurrency([_rec(0.0, 1.0) for _ in range(1000)]) == 1000


def test_added_and_ratio_propagate_missing_values():
    assert added(0.012, 0.010) == pytest.approx(0.002)
    assert math.isnan(added(math.nan, 0.01))
    assert ratio(1.0, 4.0) == 0.25
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(math.nan, 1.0))


def test_poisson_arrivals_are_seeded_ordered_bounded_and_near_the_rate():
    a = poisson_arrivals(200.0, 30.0, iter(random.Random(1).random, None))
    b = poisson_arrivals(200.0, 30.0, iter(random.Random(1).random, None))
    c = poisson_arrivals(200.0, 30.0, iter(random.Random(2).random, None))
    assert a == b
    assert a != c
    assert all(x < y for x, y in itertools.pairwise(a))
    assert 0 < a[0] and a[-1] < 30.0
    # 6000 expected; the standard deviation of a Poisson count is sqrt(6000) ~ 77.
    assert abs(len(a) - 6000) < 6 * 77
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 200.0, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean.
    assert statistics.pstdev(gaps) == pytest.approx(1 / 200.0, rel=0.1)


def test_poisson_arrivals_degenerate_inputs():
    assert poisson_arrivals(0.0, 10.0, iter(random.Random(0).random, None)) == []
    assert poisson_arrivals(10.0, 0.0, iter(random.Random(0).random, None)) == []
    # A stream of zeros never advances time: the cap still ends the loop.
    zeros = poisson_arrivals(1.0, 1.0, iter(lambda: 0.0, None))
    assert len(zeros) == 1004
