"""Selection policies as pure functions of a snapshot: least-score (formula, idle set, ties, weight)
and round-robin."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from mvllm.router.config import PolicyConfig
from mvllm.router.policy import LeastScore, RoundRobin, load_score, make_policy


@dataclass
class N:
    name: str
    running: float = 0
    waiting: float = 0
    capacity: int = 10
    weight: float = 1.0


def test_formula() -> None:
    assert load_score(4, 2, 10) == pytest.approx(0.5)
    assert load_score(4, 2, 10, weight=2) == pytest.approx(0.25)
    assert load_score(4, 2, 10, waiting_weight=1.0) == pytest.approx(0.6)
    assert load_score(1, 0, 0) == float("inf")
    assert LeastScore().score(N("a", running=3, waiting=4, capacity=10)) == pytest.approx(0.5)


def test_empty_and_single() -> None:
    p = LeastScore(rng=random.Random(0))
    assert p.choose([], "m") is None
    a = N("a", running=100)
    assert p.choose([a], "m") is a


def test_picks_among_idle_nodes_at_random() -> None:
    # a and b are under 0.5, c is not: c is never picked, a and b both are.
    a, b, c = N("a", running=1), N("b", running=4), N("c", running=6)
    p = LeastScore(rng=random.Random(1))
    picks = Counter(p.choose([a, b, c], "m").name for _ in range(400))
    assert set(picks) == {"a", "b"}
    assert 120 < picks["a"] < 280  # uniform among the idle ones, not "always the lowest"


def test_busy_fleet_picks_the_lowest_score() -> None:
    a, b, c = N("a", running=8), N("b", running=6, waiting=2), N("c", running=10)
    p = LeastScore(rng=random.Random(2))
    assert {p.choose([a, b, c], "m").name for _ in range(50)} == {"b"}  # 0.7 < 0.8 < 1.0


def test_ties_at_the_minimum_are_broken_at_random() -> None:
    a, b, c = N("a", running=7), N("b", running=7), N("c", running=9)
    p = LeastScore(rng=random.Random(3))
    assert {p.choose([a, b, c], "m").name for _ in range(100)} == {"a", "b"}


def test_weight_scales_score_and_share() -> None:
    heavy = N("heavy", running=8, weight=2.0)  # score 0.4: idle thanks to its weight
    light = N("light", running=8)  # 0.8
    p = LeastScore(rng=random.Random(4))
    assert {p.choose([heavy, light], "m").name for _ in range(50)} == {"heavy"}
    a, b = N("a", weight=3.0), N("b", weight=1.0)  # both idle: picked in proportion to weight
    picks = Counter(p.choose([a, b], "m").name for _ in range(2000))
    assert 0.65 < picks["a"] / 2000 < 0.85


def test_threshold_and_waiting_weight_are_parameters() -> None:
    a, b = N("a", running=2), N("b", waiting=6)
    # with waiting counted fully, b scores 0.6; with a 0.7 idle threshold both are idle
    p = LeastScore(idle_threshold=0.1, waiting_weight=1.0, rng=random.Random(5))
    assert {p.choose([a, b], "m").name for _ in range(30)} == {"a"}  # 0.2 < 0.6, nobody idle
    p = LeastScore(idle_threshold=0.7, waiting_weight=1.0, rng=random.Random(5))
    assert {p.choose([a, b], "m").name for _ in range(100)} == {"a", "b"}


def test_round_robin_cycles_per_model() -> None:
    a, b, c = N("a", running=100), N("b"), N("c")
    p = RoundRobin()
    assert [p.choose([a, b, c], "m").name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert p.choose([a, b, c], "other").name == "a"  # its own counter
    assert p.choose([], "m") is None


def test_make_policy() -> None:
    assert make_policy(PolicyConfig()).type == "least-score"
    assert make_policy(PolicyConfig(type="round-robin")).type == "round-robin"
    p = make_policy(PolicyConfig(idle_threshold=0.3, waiting_weight=0.25))
    assert isinstance(p, LeastScore) and p.idle_threshold == 0.3 and p.waiting_weight == 0.25
