"""Retry decisions for one proxied request: which failures are retried, the backoff between tries,
and which failures count against a node's breaker. Pure: no I/O, randomness passed in.

A request is retried on the next-best untried node after a connect error, a timeout before the
response started, a 500/502/503/504/429 answer, or a body that broke before any byte reached the
client, up to `max_retries` times. Nothing is retried once the client has received a byte.

A timeout is retried once, not more: when the request times out on a second node too, the request
is the likely cause (an input that jams every engine it reaches), so it is not sent to a third
node, and that second timeout is not held against its node (FailureLedger).
"""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A 500 may be the request's fault (an input that crashes every engine): it counts against its node
# at once, and is taken back if it followed the request to every node tried; see FailureLedger.
_FORGIVABLE_STATUS = 500
# 429 is the node saying "busy", which is load, not a fault.
_NOT_A_FAULT_STATUS = 429


class FailureKind(enum.Enum):
    CONNECT = "connect"  # could not connect, or the connection dropped before the answer began
    TIMEOUT = "timeout"  # no answer (headers, or the first chunk of a stream) in time
    STATUS = "status"  # a retryable HTTP status from the node
    BROKEN = "broken"  # the answer broke off after it began (reported, never retried once sent)


def classify_exception(exc: BaseException) -> FailureKind:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return FailureKind.TIMEOUT
    if isinstance(exc, aiohttp.ClientPayloadError):
        return FailureKind.BROKEN
    return FailureKind.CONNECT


def backoff_delay(retry_number: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before retry number `retry_number` (1-based): exponential, capped, "equal jitter"
    (half fixed, half random) so concurrent retries after one node dies do not move in step."""
    if base <= 0 or cap <= 0:
        return 0.0
    ceiling = min(cap, base * (2 ** max(0, retry_number - 1)))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


T = TypeVar("T")


@dataclass(slots=True)
class AttemptFailure(Generic[T]):
    node: T
    kind: FailureKind
    status: int | None = None


@dataclass
class FailureLedger(Generic[T]):
    """The failed attempts of one request and which of them are the node's fault.

    Every failure but a 429 counts against its node at once, a 500 too: a node answering 500s
    must be ejected on its second failure even while many requests are in flight. A 500 may
    still be the request's doing: if every attempt of the request ended in a 500 on two or more
    nodes, the request is the likely cause, and `settle` names the nodes whose 500s to take back
    (Breaker.forgive).
    """

    failures: list[AttemptFailure[T]] = field(default_factory=list)

    def record(self, failure: AttemptFailure[T]) -> bool:
        """Add a failure; True when it counts against its node (now). A timeout counts like a
        connect error, except one that follows an earlier timeout of the same request."""
        timed_out_before = failure.kind is FailureKind.TIMEOUT and self.timeouts() > 0
        self.failures.append(failure)
        if timed_out_before:
            return False
        return not (failure.kind is FailureKind.STATUS and failure.status == _NOT_A_FAULT_STATUS)

    def timeouts(self) -> int:
        return sum(1 for f in self.failures if f.kind is FailureKind.TIMEOUT)

    def may_retry(self) -> bool:
        """False once the request has timed out twice: a third node would only wait as long."""
        return self.timeouts() < 2

    def settle(self, succeeded: bool) -> list[T]:
        """Once the request has its final outcome: the nodes whose 500s are taken back."""
        held = [f.node for f in self.failures if f.kind is FailureKind.STATUS and f.status == _FORGIVABLE_STATUS]
        if not succeeded and len(held) == len(self.failures) and len(held) >= 2:
            return held
        return []
