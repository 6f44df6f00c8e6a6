"""common.http.json_object: a routed body is a JSON object, nested no deeper than MAX_JSON_DEPTH."""

from __future__ import annotations

import json

import pytest

from mvllm.common.http import MAX_JSON_DEPTH, BodyError, json_object, too_deep


def nested(levels: int) -> dict:
    doc: dict = {"leaf": 1}
    for _ in range(levels - 1):
        doc = {"a": doc}
    return doc


def test_depth_is_counted_per_level_of_objects_and_arrays() -> None:
    assert not too_deep(nested(MAX_JSON_DEPTH), MAX_JSON_DEPTH)
    assert too_deep(nested(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert too_deep({"m": [[[[1]]]]}, 4) and not too_deep({"m": [[[1]]]}, 4)


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 1000, 5000])
def test_too_deep_bodies_are_a_body_error(levels: int) -> None:
    body = b'{"model": "m", "x": ' + b"[" * levels + b"]" * levels + b"}"
    with pytest.raises(BodyError) as info:
        json_object(body)
    assert info.value.code == "invalid_json"


def test_wide_bodies_with_many_brackets_but_shallow_are_fine() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]} for _ in range(500)]}
    assert json_object(json.dumps(doc).encode()) == doc
    assert json_object(json.dumps(nested(MAX_JSON_DEPTH - 1))) == nested(MAX_JSON_DEPTH - 1)  # str input too
