"""Request rate, latency quantiles and errors computed from two readings of the router's
`/metrics` (counter and histogram deltas, as Prometheus' rate() and histogram_quantile() do). Pure.

- requests:  mvllm_requests_total summed over model, node and status
- errors:    the part of it with status >= 500, plus mvllm_stream_errors_total (answers that broke
             after their first byte)
- latency:   mvllm_request_duration_seconds buckets summed over models; a quantile is interpolated
             linearly inside the bucket that holds its rank; in the +Inf bucket it is the largest
             finite bound (the histogram knows no more)
A counter that went down means the router restarted: the new reading counts from zero.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from mvllm.common.prom import iter_samples

REQUESTS = "mvllm_requests_total"
STREAM_ERRORS = "mvllm_stream_errors_total"
LATENCY_BUCKET = "mvllm_request_duration_seconds_bucket"
_NAMES = (REQUESTS, STREAM_ERRORS, LATENCY_BUCKET)


@dataclass(frozen=True)
class MetricsReading:
    t: float  # monotonic seconds when read
    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), sorted by bound


def parse_metrics(text: str, t: float) -> MetricsReading:
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for s in iter_samples(text, _NAMES):
        if s.name == REQUESTS:
            requests += s.value
            status = s.labels.get("status", "")
            if status.isdigit() and int(status) >= 500:
                errors += s.value
        elif s.name == STREAM_ERRORS:
            errors += s.value
        else:
            try:
                le = float(s.labels.get("le", "nan"))
            except ValueError:
                continue
            if not math.isnan(le):
                buckets[le] = buckets.get(le, 0.0) + s.value
    return MetricsReading(t, requests, errors, tuple(sorted(buckets.items())))


def quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """The q-quantile (0..1) of cumulative `buckets`; None when they hold no observation."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


@dataclass(frozen=True)
class Window:
    seconds: float
    requests: float  # answered in the window
    rps: float
    errors: float  # in the window
    errors_total: float  # since the router started
    p50: float | None  # seconds
    p99: float | None


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # a reset: the router restarted


def window(old: MetricsReading, new: MetricsReading) -> Window:
    dt = max(new.t - old.t, 1e-9)
    requests = _delta(new.requests, old.requests)
    errors = _delta(new.errors, old.errors)
    old_b = dict(old.buckets)
    reset = new.requests < old.requests
    diff = tuple((le, c if reset else max(0.0, c - old_b.get(le, 0.0))) for le, c in new.buckets)
    return Window(
        seconds=dt,
        requests=requests,
        rps=requests / dt,
        errors=errors,
        errors_total=new.errors,
        p50=quantile(0.5, diff),
        p99=quantile(0.99, diff),
    )


class RateHistory:
    """Readings of the last `span` seconds; `header()` is the window over all of them (smooth
    numbers for the header), `last_step()` the window of the latest step (one sparkline point)."""

    def __init__(self, span: float = 5.0, points: int = 120) -> None:
        self.span = span
        self._readings: deque[MetricsReading] = deque()
        self.rps_points: deque[float] = deque(maxlen=points)
        self.p50_points: deque[float] = deque(maxlen=points)
        self.p99_points: deque[float] = deque(maxlen=points)

    def add(self, reading: MetricsReading) -> None:
        if self._readings:
            step = window(self._readings[-1], reading)
            self.rps_points.append(step.rps)
            # No request in the step: latency has no value; 0 keeps the line's time axis honest.
            self.p50_points.append((step.p50 or 0.0) * 1000)
            self.p99_points.append((step.p99 or 0.0) * 1000)
        self._readings.append(reading)
        while len(self._readings) > 2 and reading.t - self._readings[1].t >= self.span:
            self._readings.popleft()

    def header(self) -> Window | None:
        if len(self._readings) < 2:
            return None
        return window(self._readings[0], self._readings[-1])
