"""The circuit breaker as a pure state machine driven by outcomes and a clock value."""

from __future__ import annotations

from mvllm.router.breaker import Breaker, BreakerState, Transition


def test_opens_after_threshold_consecutive_failures() -> None:
    b = Breaker(failure_threshold=2, cooldown=10)
    assert b.on_failure(0) is None
    assert b.state is BreakerState.CLOSED and b.available(0)
    assert b.on_failure(1) == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    assert not b.available(1)
    assert b.retry_after(1) == 10


def test_success_resets_the_count() -> None:
    b = Breaker(failure_threshold=2, cooldown=10)
    b.on_failure(0)
    b.on_success(1)
    assert b.on_failure(2) is None
    assert b.state is BreakerState.CLOSED


def test_half_open_after_cooldown_lets_one_probe_through() -> None:
    b = Breaker(failure_threshold=1, cooldown=5)
    b.on_failure(0)
    assert not b.available(4.9)
    assert b.available(5.0)
    assert b.on_dispatch(5.0) == Transition(BreakerState.OPEN, BreakerState.HALF_OPEN)
    assert not b.available(5.1)  # the probe is in flight
    assert b.on_success(5.2) == Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED)
    assert b.available(5.3) and b.state is BreakerState.CLOSED


def test_failed_probe_reopens_with_a_fresh_cooldown() -> None:
    b = Breaker(failure_threshold=1, cooldown=5)
    b.on_failure(0)
    b.on_dispatch(6)
    assert b.on_failure(6.5) == Transition(BreakerState.HALF_OPEN, BreakerState.OPEN)
    assert not b.available(10)
    assert b.available(11.5)


def test_success_threshold_needs_several_probes() -> None:
    b = Breaker(failure_threshold=1, cooldown=1, success_threshold=2)
    b.on_failure(0)
    b.on_dispatch(1)
    assert b.on_success(1) is None
    assert b.state is BreakerState.HALF_OPEN and b.available(1)
    b.on_dispatch(1)
    assert b.on_success(1) == Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED)


def test_abandoned_probe_frees_the_slot() -> None:
    b = Breaker(failure_threshold=1, cooldown=1)
    b.on_failure(0)
    b.on_dispatch(2)
    assert not b.available(2)
    b.on_abandon()
    assert b.available(2) and b.state is BreakerState.HALF_OPEN


def test_late_success_while_open_does_not_close() -> None:
    b = Breaker(failure_threshold=1, cooldown=10)
    b.on_failure(0)
    assert b.on_success(1) is None
    assert b.state is BreakerState.OPEN


def test_reset_and_configure() -> None:
    b = Breaker(failure_threshold=1, cooldown=10)
    b.on_failure(0)
    assert b.reset() == Transition(BreakerState.OPEN, BreakerState.CLOSED)
    assert b.reset() is None
    b.configure(failure_threshold=3, cooldown=1, success_threshold=1)
    b.on_failure(0)
    b.on_failure(0)
    assert b.state is BreakerState.CLOSED
    assert b.on_failure(0) is not None
    assert b.available(1.0)
