"""Pure statistics over load-generator records: percentiles, throughput, error and per-node counts.

No I/O and no clock here, so every figure the suite prints can be checked by a unit test.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the client saw it. Times are seconds on one monotonic clock.

    `ttft` and `e2e` are durations from `start`; `ttft` is the first SSE chunk carrying content
    (streaming) or the whole answer (non-streaming). `error` is None for a success, else a kind
    such as "http_500", "connect", "timeout", "disconnect", "stream_error", "incomplete".
    """

    start: float
    end: float
    ttft: float | None
    status: int | None
    error: str | None = None
    node: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Dist:
    """Summary of a sample of durations (seconds). All fields are NaN when the sample is empty."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of an ascending sequence, by linear interpolation between the
    two nearest ranks (numpy's default "linear" method). NaN for an empty sequence."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo]) + (float(sorted_values[hi]) - float(sorted_values[lo])) * frac


def summarize(values: Iterable[float]) -> Dist:
    data = sorted(values)
    if not data:
        nan = math.nan
        return Dist(0, nan, nan, nan, nan, nan)
    return Dist(
        n=len(data),
        mean=math.fsum(data) / len(data),
        p50=percentile(data, 50),
        p90=percentile(data, 90),
        p99=percentile(data, 99),
        max=float(data[-1]),
    )


@dataclass(frozen=True, slots=True)
class RunStats:
    """What one load run produced: counts, throughput over its wall time, latency distributions."""

    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    throughput: float  # successful requests per second of wall time
    ttft: Dist
    e2e: Dist
    per_node: dict[str, int] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return self.requests - self.ok


def wall_time(records: Sequence[RequestRecord]) -> float:
    """From the first request's start to the last request's end (0 when there are none)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def run_stats(records: Sequence[RequestRecord], wall_s: float | None = None) -> RunStats:
    """Summarise records. Latencies are of successful requests only: a fast error is not a fast answer.

    `wall_s` defaults to `wall_time(records)`; pass the run's own duration for open-loop runs, whose
    offered rate, not their last answer, fixes the time base.
    """
    wall = wall_time(records) if wall_s is None else wall_s
    good = [r for r in records if r.error is None]
    errors = Counter(r.error for r in records if r.error is not None)
    per_node = Counter(r.node or "?" for r in good)
    return RunStats(
        requests=len(records),
        ok=len(good),
        errors=dict(sorted(errors.items())),
        wall_s=wall,
        throughput=len(good) / wall if wall > 0 else 0.0,
        ttft=summarize(r.ttft for r in good if r.ttft is not None),
        e2e=summarize(r.e2e for r in good),
        per_node=dict(sorted(per_node.items())),
    )


def records_between(records: Iterable[RequestRecord], t0: float, t1: float, *, by_end: bool = False) -> list[RequestRecord]:
    """Records whose request started (or, with `by_end`, ended) in [t0, t1): the slice of a run
    around an event. By end, an error falls in the window where the client saw it."""
    if by_end:
        return [r for r in records if t0 <= r.end < t1]
    return [r for r in records if t0 <= r.start < t1]


def max_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests open at one instant (a request ending exactly when another starts is not
    counted twice): shows whether "1,000 concurrent streams" were really open together."""
    events: list[tuple[float, int]] = []
    for r in records:
        events.append((r.start, 1))
        events.append((r.end, -1))
    events.sort()  # at equal times -1 sorts before +1
    open_now = peak = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def added(through: float, direct: float) -> float:
    """Latency a proxy adds over the direct path; NaN if either side is missing."""
    if math.isnan(through) or math.isnan(direct):
        return math.nan
    return through - direct


def ratio(a: float, b: float) -> float:
    """a / b, NaN when undefined (b zero or either side missing)."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def poisson_arrivals(rate: float, duration: float, rng_random: Iterable[float]) -> list[float]:
    """Arrival offsets (seconds from 0) of a Poisson process of `rate`/s over `duration`, drawn from
    a stream of uniform [0, 1) numbers (pass a seeded RNG's values, so a run can be replayed)."""
    if rate <= 0 or duration <= 0:
        return []
    # A bound on the loop whatever the stream holds: the count exceeds 4x its mean only with
    # vanishing probability for any run this suite makes.
    cap = int(rate * duration * 4) + 1000
    t = 0.0
    out: list[float] = []
    for u in rng_random:
        t += -math.log(1.0 - u) / rate
        if t >= duration or len(out) >= cap:
            break
        out.append(t)
    return out
