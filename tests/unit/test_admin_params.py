"""admin.errors.non_negative_param: the one reading of a query parameter that must be >= 0
(?days of the log cleanup, ?since and ?limit of /admin/events)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from mvllm.router.admin.errors import AdminError, non_negative_param

MESSAGE = "query parameter {name!r} must be a non-negative integer, got {raw!r}"


def query(qs: str):
    return make_mocked_request("GET", "/admin/events?" + qs)


def test_absent_or_empty_is_the_default_and_a_number_is_parsed() -> None:
    assert non_negative_param(query(""), "since", int, MESSAGE, 0) == 0
    assert non_negative_param(query("since="), "since", int, MESSAGE, 0) == 0
    assert non_negative_param(query(""), "limit", int, MESSAGE) is None
    assert non_negative_param(query("limit=0"), "limit", int, MESSAGE) == 0
    assert non_negative_param(query("days=2.5"), "days", float, "days must be a number >= 0, got {raw!r}") == 2.5


DAYS = "days must be a number >= 0, got {raw!r}"


@pytest.mark.parametrize("raw", ["-1", "x", "1.5"])
def test_a_count_negative_or_not_an_integer_is_a_400_with_the_callers_message(raw: str) -> None:
    with pytest.raises(AdminError) as info:
        non_negative_param(query("limit=" + raw), "limit", int, MESSAGE)
    assert info.value.status == 400 and info.value.code == "invalid_parameter"
    assert info.value.message == f"query parameter 'limit' must be a non-negative integer, got {raw!r}"


@pytest.mark.parametrize("raw", ["-0.5", "soon"])
def test_days_negative_or_not_a_number_is_a_400_with_the_callers_message(raw: str) -> None:
    with pytest.raises(AdminError) as info:
        non_negative_param(query("days=" + raw), "days", float, DAYS)
    assert info.value.status == 400 and info.value.code == "invalid_parameter"
    assert info.value.message == f"days must be a number >= 0, got {raw!r}"
