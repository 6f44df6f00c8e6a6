"""The proxy's stall filter (`answering`): awake nodes holding unanswered requests step aside for
one that answers, but never for a cold load elsewhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from mvllm.router.breaker import Breaker
from mvllm.router.routing import answering


@dataclass
class Candidate:
    name: str
    tier: int
    breaker: Breaker = field(default_factory=lambda: Breaker(failure_threshold=2, cooldown=10.0))


def stall(c: Candidate, requests: int, now: float = 0.0) -> Candidate:
    for _ in range(requests):
        c.breaker.on_dispatch(now)
    return c


def test_a_stalled_awake_node_steps_aside_for_an_answering_one() -> None:
    busy, calm = stall(Candidate("busy", 0), 3), Candidate("calm", 0)
    assert busy.breaker.stalled() and not calm.breaker.stalled()
    assert answering([busy, calm], now=1.0) == [calm]


def test_every_awake_copy_stalled_keeps_them_rather_than_a_cold_load() -> None:
    a, b = stall(Candidate("a", 0), 4), stall(Candidate("b", 0), 4)
    cold = Candidate("c", 3)  # an agent with room: loading a copy there is no answer to a burst
    assert answering([a, b, cold], now=1.0) == [a, b]


def test_loading_and_cold_candidates_pass_when_nothing_is_awake() -> None:
    loading, cold = Candidate("l", 1), Candidate("c", 3)
    assert answering([loading, cold], now=1.0) == [loading, cold]
