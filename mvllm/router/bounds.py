"""Bounds the router puts on a request body itself, before it is routed or charged: how many
choices (`n`, `best_of`) one request may ask for (config `max_n`). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The body fields that multiply the work of one request by their value.
CHOICE_FIELDS = ("n", "best_of")


@dataclass(frozen=True, slots=True)
class OutOfBounds:
    param: str
    message: str


def check_choices(doc: Mapping[str, Any], max_n: int) -> OutOfBounds | None:
    """The first choice field above `max_n`, or None. Only numbers are judged here: a value of
    the wrong type is the engine's to refuse (its 400 comes back as is)."""
    for name in CHOICE_FIELDS:
        value = doc.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > max_n:
            return OutOfBounds(name, f"'{name}' is {value:g}; this router allows at most {max_n} choices per request")
    return None
