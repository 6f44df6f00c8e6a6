"""The event-loop lag statistics behind mvllm_event_loop_lag_seconds: histogram buckets and the
largest lag of a sliding window, with time passed in."""

from __future__ import annotations

from mvllm.router.eventloop import LAG_BUCKETS, LagStats


def test_histogram_is_cumulative_with_inf_last() -> None:
    st = LagStats(window=10)
    for lag in (0.0, 0.0004, 0.003, 0.07, 0.07, 9.0):
        st.observe(lag, now=100.0)
    b = dict(st.buckets())
    assert list(b)[-1] == "+Inf" and len(b) == len(LAG_BUCKETS) + 1
    assert b["0.001"] == 2 and b["0.005"] == 3 and b["0.05"] == 3 and b["0.1"] == 5 and b["5.0"] == 5
    assert b["+Inf"] == st.count == 6
    assert abs(st.sum - (0.0004 + 0.003 + 0.14 + 9.0)) < 1e-9


def test_negative_lag_counts_as_zero() -> None:
    st = LagStats()
    st.observe(-0.002, now=1.0)  # a timer that fired a hair early
    assert st.sum == 0.0 and dict(st.buckets())["0.001"] == 1


def test_window_max_forgets_what_is_older_than_the_window() -> None:
    st = LagStats(window=10)
    st.observe(0.3, now=100.2)
    st.observe(0.01, now=101.5)
    st.observe(0.02, now=101.9)
    assert st.window_max(102.0) == 0.3
    assert st.window_max(109.9) == 0.3  # second 100 is still within the last 10 (100..109)
    assert st.window_max(110.0) == 0.02  # now 101..110
    assert st.window_max(112.0) == 0.0
    # Second 110 reuses second 100's slot: its old 0.3 is gone, not merged.
    st.observe(0.005, now=110.5)
    assert st.window_max(110.6) == 0.02  # 101's 0.02 is still in the window
    assert st.window_max(112.0) == 0.005
