"""Per-node circuit breaker: a pure state machine driven by request outcomes and a clock value.

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(cooldown elapsed, next request is a probe)──▶ half-open
    half-open ──(success_threshold successes)──▶ closed
    half-open ──(any failure)──▶ open (cooldown starts again)

While half-open only one request at a time is let through (the probe), so a node that is still
broken costs at most one request per cooldown; that request is retried on another node anyway.
Time is passed in (`now`, monotonic seconds), never read here, so tests drive it directly.

Under concurrency, "consecutive" is judged by when requests were sent (`sent_at`): a success
resets the failure count only if its request was sent after the last failure was seen. Requests
sent earlier were in flight when the node started failing and prove nothing about it now, so with
many requests in flight the breaker still opens on the second failure, and at most one request
sent after the first failure reaches the node (`sent_after_failure` counts them). A failure can be
taken back (`forgive`) when the request turns out to be at fault (it failed alike on every node).

A node that accepts requests and never answers is found only when they time out, and every request
sent to it meanwhile waits out the timeout too. So the breaker also counts the requests in flight
that no answer has vouched for (`unanswered`: sent after the latest request the node answered);
with more than `failure_threshold` of them (and of its failures since) the node is `stalled`, and
the proxy sends it nothing more while another candidate is not (a soft rule: when all are
stalled, proxy.answering picks among them). So while another node keeps up, a hanging node holds
at most failure_threshold + 1 requests (3 by default): failure_threshold of them time out and open
the breaker.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


# Numeric values for the mvllm_node_breaker_state gauge.
STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class Transition:
    old: BreakerState
    new: BreakerState


class Breaker:
    __slots__ = (
        "_last_failure_at",
        "_opened_at",
        "_opened_from_closed",
        "_probe_in_flight",
        "_successes",
        "_unproven",
        "cooldown",
        "failure_threshold",
        "failures",
        "last_answer_at",
        "sent_after_failure",
        "state",
        "success_threshold",
    )

    def __init__(self, failure_threshold: int = 2, cooldown: float = 10.0, success_threshold: int = 1) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown = max(0.0, cooldown)
        self.success_threshold = max(1, success_threshold)
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive failures while closed
        self._successes = 0  # consecutive successes while half-open
        self._opened_at = 0.0
        self._opened_from_closed = False  # opened by failures while closed (not by a failed probe)
        self._probe_in_flight = False
        self._last_failure_at = float("-inf")
        # Requests let through while closed with a failure already counted: what the threshold costs.
        self.sent_after_failure = 0
        # Send times of the requests in flight sent after the latest one the node answered, oldest
        # first (dispatches come in time order).
        self._unproven: deque[float] = deque()
        self.last_answer_at = float("-inf")  # when the node last answered (monotonic)

    def configure(self, failure_threshold: int, cooldown: float, success_threshold: int) -> None:
        """New thresholds from a config reload; the current state is kept."""
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown = max(0.0, cooldown)
        self.success_threshold = max(1, success_threshold)

    def available(self, now: float) -> bool:
        """Would a request be let through now? Reads only; `on_dispatch` commits."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now - self._opened_at >= self.cooldown
        return not self._probe_in_flight

    def retry_after(self, now: float) -> float:
        """Seconds until this breaker lets a request through again (0 when it does now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.cooldown - now)
        return 0.0

    def on_dispatch(self, now: float) -> Transition | None:
        """A request is being sent to the node. Returns a transition when it becomes the probe.
        Each dispatch is matched by one `on_settled` with the same `now` once the attempt ends."""
        self._unproven.append(now)
        if self.state is BreakerState.CLOSED:
            if self.failures:
                self.sent_after_failure += 1
            return None
        if self.state is BreakerState.OPEN and now - self._opened_at >= self.cooldown:
            self.state = BreakerState.HALF_OPEN
            self._successes = 0
            self._probe_in_flight = True
            return Transition(BreakerState.OPEN, BreakerState.HALF_OPEN)
        if self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = True
        return None

    def on_success(self, now: float, sent_at: float | None = None) -> Transition | None:
        """The node answered properly a request sent at `sent_at` (None: count it whenever it was sent)."""
        self.last_answer_at = now
        # It answers: what it was sent up to this request is work, not a hang.
        unproven = self._unproven
        if sent_at is None:
            unproven.clear()
        else:
            while unproven and unproven[0] <= sent_at:
                unproven.popleft()
        if self.state is BreakerState.CLOSED:
            if sent_at is None or sent_at >= self._last_failure_at:
                self.failures = 0
            return None
        if self.state is BreakerState.HALF_OPEN:
            if sent_at is not None and sent_at < self._opened_at:
                return None  # sent before the breaker opened: not the probe, and no news
            self._probe_in_flight = False
            self._successes += 1
            if self._successes >= self.success_threshold:
                self.state = BreakerState.CLOSED
                self.failures = 0
                return Transition(BreakerState.HALF_OPEN, BreakerState.CLOSED)
        # OPEN: a late answer to a request sent before the breaker opened proves little; ignore it.
        return None

    def on_failure(self, now: float, sent_at: float | None = None) -> Transition | None:
        """The node failed a request sent at `sent_at` (None: whenever it was sent)."""
        if self.state is BreakerState.CLOSED:
            self.failures += 1
            self._last_failure_at = now
            if self.failures >= self.failure_threshold:
                return self._open(now, BreakerState.CLOSED)
            return None
        if self.state is BreakerState.HALF_OPEN:
            if sent_at is not None and sent_at < self._opened_at:
                return None  # an old request failing late: the probe's verdict is still to come
            self._probe_in_flight = False
            return self._open(now, BreakerState.HALF_OPEN)
        return None

    def forgive(self) -> Transition | None:
        """Take back one failure counted earlier: its request was at fault, not the node. A
        breaker that such failures opened closes again (unless a probe ran since it opened)."""
        if self.failures > 0:
            self.failures -= 1
        if (
            self.state is BreakerState.OPEN
            and self._opened_from_closed
            and self.failures < self.failure_threshold
        ):
            self.state = BreakerState.CLOSED
            return Transition(BreakerState.OPEN, BreakerState.CLOSED)
        return None

    def on_settled(self, sent_at: float) -> None:
        """The attempt dispatched at `sent_at` is over, whatever its outcome."""
        unproven = self._unproven
        if unproven and unproven[0] == sent_at:
            unproven.popleft()  # the usual case: the oldest ends first
        elif unproven and sent_at > unproven[0]:
            try:
                unproven.remove(sent_at)
            except ValueError:
                pass  # an answer vouched for it already

    @property
    def unanswered(self) -> int:
        """Requests in flight that no answer of the node has vouched for."""
        return len(self._unproven)

    def stalled(self) -> bool:
        """More requests wait on the node unanswered (or already failed, while closed) than the
        failures that open the breaker: send it no more while another node is not stalled. The
        failures count too so that the first of several timeouts does not reopen the node for
        the moment until the next one opens its breaker."""
        failed = self.failures if self.state is BreakerState.CLOSED else 0
        return self.unanswered + failed > self.failure_threshold

    def on_abandon(self) -> None:
        """The request ended without a verdict (client went away): free the probe slot."""
        self._probe_in_flight = False

    def reset(self) -> Transition | None:
        """Close at once: the node was seen coming back (its /health recovered after being down)."""
        old = self.state
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._successes = 0
        self._probe_in_flight = False
        self._last_failure_at = float("-inf")
        return Transition(old, BreakerState.CLOSED) if old is not BreakerState.CLOSED else None

    def _open(self, now: float, old: BreakerState) -> Transition:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self._opened_from_closed = old is BreakerState.CLOSED
        self._successes = 0
        return Transition(old, BreakerState.OPEN)
