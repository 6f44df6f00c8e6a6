"""A small, fast reader of Prometheus text exposition, for the few vLLM samples we score on.

prometheus_client's parser builds an object per family and sample (about 10x slower on vLLM's
66 families); the router scrapes every node every second, so it reads lines itself and keeps
only the families it is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            break
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        if i >= n or text[i] != '"':
            raise ValueError(f"label {key!r} has no quoted value")
        i += 1
        out: list[str] = []
        while i < n and text[i] != '"':
            ch = text[i]
            if ch == "\\" and i + 1 < n:
                nxt = text[i + 1]
                out.append("\n" if nxt == "n" else nxt)
                i += 2
                continue
            out.append(ch)
            i += 1
        labels[key] = "".join(out)
        i += 1
    return labels


def _parse_value(text: str) -> float:
    text = text.strip()
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    return float(text)


def iter_samples(text: str, names: Iterable[str] | None = None) -> Iterator[Sample]:
    """Yield the samples of `text` whose metric name is in `names` (all of them if None).

    Malformed lines are skipped: one bad line from an engine must not blind the router.
    """
    wanted = set(names) if names is not None else None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if wanted is not None and name not in wanted:
                continue
            close = line.rfind("}")
            if close == -1:
                continue
            try:
                labels = _parse_labels(line[brace + 1 : close])
                value = _parse_value(line[close + 1 :].split()[0])
            except (ValueError, IndexError):
                continue
        else:
            if space == -1:
                continue
            name = line[:space]
            if wanted is not None and name not in wanted:
                continue
            try:
                labels = {}
                value = _parse_value(line[space + 1 :].split()[0])
            except (ValueError, IndexError):
                continue
        yield Sample(name, labels, value)


def sum_by_label(samples: Iterable[Sample], name: str, label: str) -> dict[str, float]:
    """Sum the samples called `name` per value of `label` (e.g. running requests per model_name)."""
    totals: dict[str, float] = {}
    for s in samples:
        if s.name == name:
            key = s.labels.get(label, "")
            totals[key] = totals.get(key, 0.0) + s.value
    return totals
