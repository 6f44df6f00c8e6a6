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


# -- under concurrency: "consecutive" by send time, sent_after_failure, forgive -----------------------


def test_success_of_a_request_sent_before_the_failure_does_not_reset_the_count() -> None:
    # Requests a, b, c are in flight on a node that starts failing: a fails at t=1; b, sent at t=0.5
    # (before the failure was seen), succeeds late; c fails: the breaker opens on the second failure.
    b = Breaker(failure_threshold=2, cooldown=10)
    assert b.on_failure(1.0, sent_at=0.4) is None
    assert b.on_success(1.1, sent_at=0.5) is None
    assert b.failures == 1
    assert b.on_failure(1.2, sent_at=0.6) == Transition(BreakerState.CLOSED, BreakerState.OPEN)


def test_success_of_a_request_sent_after_the_failure_resets_the_count() -> None:
    b = Breaker(failure_threshold=2, cooldown=10)
    b.on_failure(1.0, sent_at=0.9)
    b.on_dispatch(1.5)
    b.on_success(1.6, sent_at=1.5)
    assert b.failures == 0
    assert b.on_failure(2.0, sent_at=1.9) is None and b.state is BreakerState.CLOSED


def test_many_requests_in_flight_a_500_node_takes_one_more_after_its_first_failure() -> None:
    """The scenario of DESIGN §3: 16 requests in flight when a node starts answering 500s. The
    ones already in flight fail as they come back; of those sent after the first failure was seen,
    only one reaches the node before it is ejected (with failure_threshold 2)."""
    b = Breaker(failure_threshold=2, cooldown=10)
    now = 0.0
    in_flight = [now] * 16  # send times
    for _ in range(16):
        assert b.available(now)
        b.on_dispatch(now)
    # The first answer comes back: a 500.
    now = 1.0
    b.on_failure(now, sent_at=in_flight.pop())
    sent_after = 0
    # New requests keep arriving while the others come back; the router sends one wherever the
    # breaker lets it, and every answer from the node is a 500.
    while in_flight or sent_after < 50:
        now += 0.001
        if b.available(now):
            b.on_dispatch(now)
            in_flight.insert(0, now)
            sent_after += 1
        if in_flight:
            b.on_failure(now, sent_at=in_flight.pop())
        if b.state is BreakerState.OPEN and not in_flight:
            break
    assert b.state is BreakerState.OPEN
    assert sent_after == 1 == b.sent_after_failure
    assert not b.available(now)


def test_forgive_takes_a_failure_back_and_closes_what_it_opened() -> None:
    b = Breaker(failure_threshold=2, cooldown=10)
    b.on_failure(0)
    assert b.forgive() is None and b.failures == 0
    b.on_failure(1)
    assert b.on_failure(2) == Transition(BreakerState.CLOSED, BreakerState.OPEN)
    # The second failure was a request that failed on every node: the node is let back in.
    assert b.forgive() == Transition(BreakerState.OPEN, BreakerState.CLOSED)
    assert b.available(2) and b.failures == 1
    assert b.forgive() is None and b.failures == 0
    assert b.forgive() is None and b.failures == 0  # never below zero


def test_forgive_does_not_close_a_breaker_reopened_by_a_failed_probe() -> None:
    b = Breaker(failure_threshold=1, cooldown=5)
    b.on_failure(0)
    b.on_dispatch(6)  # the probe
    assert b.on_failure(6.5, sent_at=6) == Transition(BreakerState.HALF_OPEN, BreakerState.OPEN)
    assert b.forgive() is None
    assert b.state is BreakerState.OPEN


def test_half_open_ignores_late_answers_to_requests_sent_before_it_opened() -> None:
    b = Breaker(failure_threshold=1, cooldown=5)
    b.on_failure(1.0, sent_at=0.5)
    b.on_dispatch(6.0)  # the probe, half-open
    assert b.on_success(6.1, sent_at=0.8) is None  # an old request: not the probe
    assert b.on_failure(6.2, sent_at=0.9) is None  # nor is this one
    assert b.state is BreakerState.HALF_OPEN and not b.available(6.2)
    assert b.on_success(6.3, sent_at=6.0) == Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED)


def test_a_node_holding_more_unanswered_requests_than_the_threshold_is_stalled() -> None:
    b = Breaker(failure_threshold=2)
    for t in (1.0, 2.0, 3.0):
        b.on_dispatch(t)
    assert b.unanswered == 3 and b.stalled()  # threshold + 1 waiting, none answered
    b.on_success(4.0, sent_at=3.5)  # any answer clears the count: it works, it is only busy
    assert b.unanswered == 0 and not b.stalled()
    for t in (1.0, 2.0, 3.0):
        b.on_settled(t)  # sent before that answer: no longer counted
    assert b.unanswered == 0


def test_the_first_timeouts_keep_a_hanging_node_stalled_until_its_breaker_opens() -> None:
    b = Breaker(failure_threshold=2)
    for t in (1.0, 1.1, 1.2):
        b.on_dispatch(t)
    b.on_settled(1.0)
    b.on_failure(2.0, sent_at=1.0)  # the first timeout: two still wait, one failure counted
    assert b.stalled()  # no fourth request slips in before the second timeout
    b.on_settled(1.1)
    assert b.on_failure(2.1, sent_at=1.1) is not None and b.state is BreakerState.OPEN
    b.on_settled(1.2)
    assert b.unanswered == 0


def test_two_waiting_requests_are_not_a_stall() -> None:
    b = Breaker(failure_threshold=2)
    b.on_dispatch(1.0)
    b.on_dispatch(1.1)
    assert not b.stalled()


def test_an_answer_vouches_only_for_requests_sent_up_to_the_answered_one() -> None:
    b = Breaker(failure_threshold=2)
    for t in (1.0, 2.0, 3.0, 4.0):
        b.on_dispatch(t)
    b.on_success(5.0, sent_at=1.0)  # an old request finished: the three sent later are still unproven
    assert b.unanswered == 3 and b.stalled()
    b.on_settled(1.0)
    b.on_settled(3.0)  # one of them ends (a client went away)
    assert b.unanswered == 2 and not b.stalled()
