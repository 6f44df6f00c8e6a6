"""The router's event loop: uvloop and the tuned garbage collector of mvllm.common.eventloop (shared
with the agent; `run`, `tune_gc` and `loop_name` are re-exported here), and a monitor of how late
the loop runs what is due (`mvllm_event_loop_lag_seconds`), so that stalls show.

The monitor sleeps `interval` (100 ms) at a time and records by how much each wake-up came late:
a callback that holds the loop for d seconds delays the wake-up that falls due during it by up to
d. A stall longer than the interval is always seen (late by at least d − interval); a shorter one
is seen when a wake-up falls due during it.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mvllm.common.eventloop import GC_THRESHOLD0 as GC_THRESHOLD0
from mvllm.common.eventloop import loop_name as loop_name
from mvllm.common.eventloop import run as run
from mvllm.common.eventloop import tune_gc as tune_gc

log = logging.getLogger("mvllm.router.eventloop")

LAG_METRIC = "mvllm_event_loop_lag_seconds"
# Seconds. The 50 ms bound is the stall target of docs/benchmarks.md.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LagStats:
    """Lag samples: a cumulative histogram and the largest sample of the last `window` seconds
    (kept as per-second maxima, so the max needs no list of every sample). Pure: times passed in."""

    __slots__ = ("_counts", "_slot_max", "_slot_sec", "count", "sum", "window")

    def __init__(self, window: int = 10) -> None:
        self.window = max(1, int(window))
        self._counts = [0] * (len(LAG_BUCKETS) + 1)  # the last one is +Inf
        self._slot_sec = [-1] * self.window
        self._slot_max = [0.0] * self.window
        self.count = 0
        self.sum = 0.0

    def observe(self, lag: float, now: float) -> None:
        lag = max(0.0, lag)
        self._counts[bisect.bisect_left(LAG_BUCKETS, lag)] += 1
        self.count += 1
        self.sum += lag
        sec = int(now)
        i = sec % self.window
        if self._slot_sec[i] != sec:
            self._slot_sec[i] = sec
            self._slot_max[i] = lag
        elif lag > self._slot_max[i]:
            self._slot_max[i] = lag

    def window_max(self, now: float) -> float:
        """The largest lag observed in the last `window` seconds (0 when none)."""
        oldest = int(now) - self.window + 1
        return max((m for s, m in zip(self._slot_sec, self._slot_max, strict=True) if s >= oldest), default=0.0)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (le, count) pairs, Prometheus style, +Inf last."""
        out: list[tuple[str, int]] = []
        total = 0
        for bound, n in zip((*LAG_BUCKETS, float("inf")), self._counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class LoopLagMonitor(Collector):
    """Measures the loop's lag on a timer and exports it: the histogram `mvllm_event_loop_lag_seconds`
    and the gauge `mvllm_event_loop_lag_seconds_max` (largest lag of the last `window` seconds)."""

    def __init__(self, interval: float = 0.1, window: int = 10, warn_after: float = 0.5) -> None:
        self.interval = interval
        self.warn_after = warn_after
        self.stats = LagStats(window)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            now = loop.time()
            lag = now - due
            self.stats.observe(lag, now)
            if lag >= self.warn_after:
                log.warning("the event loop was blocked for about %.0f ms", lag * 1000)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        st = self.stats
        h = HistogramMetricFamily(LAG_METRIC, "How late the router's event loop ran a timer, sampled every 100 ms")
        h.add_metric([], st.buckets(), st.sum)
        yield h
        now = self._loop.time() if self._loop is not None else 0.0
        g = GaugeMetricFamily(LAG_METRIC + "_max", "Largest event-loop lag of the last 10 seconds")
        g.add_metric([], st.window_max(now))
        yield g

