"""The router's own bounds on a request body (router/bounds.py): `n` and `best_of` against max_n."""

from __future__ import annotations

from mvllm.router.bounds import check_choices


def test_choices_above_max_n_are_named() -> None:
    assert check_choices({"n": 17}, 16) is not None and check_choices({"n": 17}, 16).param == "n"
    assert check_choices({"best_of": 1e9}, 16).param == "best_of"
    assert "at most 16" in check_choices({"n": 10**9}, 16).message


def test_within_bounds_or_not_numbers_are_left_to_the_engine() -> None:
    for doc in ({}, {"n": 16}, {"n": 1, "best_of": 16}, {"n": "many"}, {"n": None}, {"n": True}, {"best_of": [100]}):
        assert check_choices(doc, 16) is None, doc
