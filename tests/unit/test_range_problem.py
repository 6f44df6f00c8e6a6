"""tomlconf.range_problem: the one wording of a number out of bounds, as config keys, sim flags and
environment variables report it."""

from __future__ import annotations

import math

from mvllm.common.tomlconf import range_problem


def test_in_bounds_is_no_problem() -> None:
    assert range_problem(1, min=1) is None
    assert range_problem(0.5, min=0, max=1, within=True) is None
    assert range_problem(3.0, max=3.0, max_name="request_timeout") is None
    assert range_problem(0.1, above=0) is None


def test_each_bound_has_its_wording() -> None:
    assert range_problem(0, min=1) == "must be >= 1, got 0"
    assert range_problem(17000, min=1, max=16384) == "must be <= 16384, got 17000"
    assert range_problem(5, max=4, max_name="max_replicas") == "must be <= max_replicas (4), got 5"
    assert range_problem(0.0, above=0) == "must be > 0, got 0.0"
    assert range_problem(1.5, min=0, max=1, within=True, shown="1.5") == "must be within [0, 1], got 1.5"
    assert range_problem(0, above=0, shown=repr("0")) == "must be > 0, got '0'"


def test_nan_fails_within_and_above_only() -> None:
    nan = math.nan
    assert range_problem(nan, min=0, max=1, within=True) is not None
    assert range_problem(nan, above=0) is not None
    assert range_problem(nan, min=0) is None
