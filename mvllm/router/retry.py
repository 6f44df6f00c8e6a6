"""Retry decisions for one proxied request: which failures are retried, the backoff between tries,
and which failures count against a node's breaker. Pure: no I/O, randomness passed in.

A request is retried on the next-best untried node after a connect error, a timeout before the
response started, a 500/502/503/504/429 answer, or a body that broke before any byte reached the
client, up to `max_retries` times. Nothing is retried once the client has received a byte.
"""

from __future__ import annotations

import asyncio
import enum
import random
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import aiohttp

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# A 500 may be the request's fault (an input that crashes every engine), so it only counts against
# a node once another node has shown that the request itself was fine; see FailureLedger.
_DEFERRED_STATUS = 500
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

    Connect errors, timeouts, broken bodies and 502/503/504 count at once. A 500 is held back: if
    every attempt of the request ended in a 500 on two or more nodes, the request is the likely
    cause and no node is blamed; otherwise (another node answered, or failed differently, or only
    one node was tried) each 500 counts against its node.
    """

    failures: list[AttemptFailure[T]] = field(default_factory=list)

    def record(self, failure: AttemptFailure[T]) -> bool:
        """Add a failure; True when it counts against its node right now."""
        self.failures.append(failure)
        if failure.kind is not FailureKind.STATUS:
            return True
        return failure.status not in (_DEFERRED_STATUS, _NOT_A_FAULT_STATUS)

    def settle(self, succeeded: bool) -> list[T]:
        """The nodes whose held-back 500s count, once the request has its final outcome."""
        held = [f.node for f in self.failures if f.kind is FailureKind.STATUS and f.status == _DEFERRED_STATUS]
        if not held:
            return []
        if not succeeded and len(held) == len(self.failures) and len(held) >= 2:
            return []
        return held
