"""The router's event loop: uvloop when it is installed (`pip install mvllm[fast]`), a garbage
collector tuned for short pauses, and a monitor of how late the loop runs what is due
(`mvllm_event_loop_lag_seconds`), so that stalls show.

The monitor sleeps `interval` (100 ms) at a time and records by how much each wake-up came late:
a callback that holds the loop for d seconds delays the wake-up that falls due during it by up to
d. A stall longer than the interval is always seen (late by at least d − interval); a shorter one
is seen when a wake-up falls due during it.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("mvllm.router.eventloop")

T = TypeVar("T")

LAG_METRIC = "mvllm_event_loop_lag_seconds"
# Seconds. The 50 ms bound is the stall target of docs/benchmarks.md.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _uvloop() -> Any:
    """The uvloop module when it is installed and recent enough (>= 0.18, which has uvloop.run)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop if hasattr(uvloop, "run") else None


def loop_name() -> str:
    """"uvloop X.Y" when `run` uses uvloop, else "asyncio"."""
    uvloop = _uvloop()
    return f"uvloop {uvloop.__version__}" if uvloop is not None else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on uvloop when it is installed, else on the standard loop."""
    uvloop = _uvloop()
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)  # asyncio.Runner's loop_factory would need Python 3.11


# Net new container objects between two young-generation collections (CPython's default: 700).
GC_THRESHOLD0 = 10_000


def tune_gc() -> None:
    """Call once the router is set up. Full collections were the event loop's longest stalls: with
    1,000 open streams (~120,000 tracked objects) one took 40-110 ms on the reference machine.
    Everything alive after start-up (modules, classes: ~47,000 objects) is frozen out of every
    later collection, and the young generation is collected after 10,000 new objects instead of
    700, so that far fewer short-lived objects are promoted and full collections become rare (none
    during the 1,000-stream benchmark; docs/benchmarks.md). Process-wide: `mvllm run` calls it,
    tests that embed the app do not."""
    gc.collect()
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)


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

