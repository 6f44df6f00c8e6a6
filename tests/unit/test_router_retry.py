"""Retry decisions: exception classes, backoff bounds, and which failures blame a node."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from mvllm.router.retry import (
    RETRY_STATUSES,
    AttemptFailure,
    FailureKind,
    FailureLedger,
    backoff_delay,
    classify_exception,
)


def test_retry_statuses() -> None:
    assert {429, 500, 502, 503, 504} == set(RETRY_STATUSES)
    assert not {400, 401, 404, 413, 422} & RETRY_STATUSES


def test_classify() -> None:
    assert classify_exception(asyncio.TimeoutError()) is FailureKind.TIMEOUT
    assert classify_exception(aiohttp.ServerTimeoutError("read")) is FailureKind.TIMEOUT
    assert classify_exception(aiohttp.ServerDisconnectedError()) is FailureKind.CONNECT
    assert classify_exception(ConnectionRefusedError()) is FailureKind.CONNECT
    assert classify_exception(aiohttp.ClientPayloadError("cut")) is FailureKind.BROKEN


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_backoff_is_jittered_within_bounds(n: int) -> None:
    rng = random.Random(n)
    ceiling = min(0.5, 0.02 * 2 ** (n - 1))
    delays = [backoff_delay(n, 0.02, 0.5, rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100  # jittered, not a fixed step
    assert backoff_delay(n, 0, 0.5, rng) == 0


def f(node: str, kind: FailureKind, status: int | None = None) -> AttemptFailure[str]:
    return AttemptFailure(node, kind, status)


def test_ledger_counts_transport_failures_at_once() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    assert ledger.record(f("a", FailureKind.CONNECT))
    assert ledger.record(f("b", FailureKind.TIMEOUT))
    assert ledger.record(f("c", FailureKind.STATUS, 503))
    assert not ledger.record(f("d", FailureKind.STATUS, 429))  # busy, not broken
    assert ledger.settle(succeeded=True) == []


def test_a_500_counts_at_once_and_stays_once_another_node_answered() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    assert ledger.record(f("a", FailureKind.STATUS, 500))  # counted now, not when the request ends
    assert ledger.settle(succeeded=True) == []  # nothing taken back


def test_a_500_on_every_node_is_taken_back() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    for node in ("a", "b", "c"):
        assert ledger.record(f(node, FailureKind.STATUS, 500))
    assert ledger.settle(succeeded=False) == ["a", "b", "c"]  # the request's doing: forgive all


def test_a_500_on_the_only_node_tried_stays() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    ledger.record(f("a", FailureKind.STATUS, 500))
    assert ledger.settle(succeeded=False) == []


def test_a_500_mixed_with_other_failures_stays() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    ledger.record(f("a", FailureKind.STATUS, 500))
    ledger.record(f("b", FailureKind.CONNECT))
    assert ledger.settle(succeeded=False) == []


def test_a_timeout_is_retried_once_and_the_second_is_the_requests_fault() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    assert ledger.record(f("a", FailureKind.TIMEOUT))  # the first counts, like a connect error
    assert ledger.may_retry()
    assert not ledger.record(f("b", FailureKind.TIMEOUT))  # followed the request: not b's fault
    assert not ledger.may_retry()  # a third node would only wait as long


def test_other_failures_do_not_use_up_the_timeout_retry() -> None:
    ledger: FailureLedger[str] = FailureLedger()
    assert ledger.record(f("a", FailureKind.CONNECT))
    assert ledger.record(f("b", FailureKind.TIMEOUT))
    assert ledger.record(f("c", FailureKind.CONNECT))
    assert ledger.may_retry()
