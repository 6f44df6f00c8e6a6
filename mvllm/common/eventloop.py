"""The event loop the router and the agent run on: uvloop when it is installed (`pip install
mvllm[fast]`), and a garbage collector tuned for short pauses once a server is set up."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh loop of the kind `run` uses, for runners that take a loop (aiohttp's web.run_app)."""
    uvloop = _uvloop()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


# Net new container objects between two young-generation collections (CPython's default: 700).
GC_THRESHOLD0 = 10_000


def tune_gc() -> None:
    """Call once the server is set up. Full collections were the event loop's longest stalls: with
    1,000 open streams (~120,000 tracked objects) one took 40-110 ms on the reference machine.
    Everything alive after start-up (modules, classes: ~47,000 objects) is frozen out of every
    later collection, and the young generation is collected after 10,000 new objects instead of
    700, so that far fewer short-lived objects are promoted and full collections become rare (none
    during the 1,000-stream benchmark; docs/benchmarks.md). Process-wide: `mvllm run` and `mvllm
    agent` call it, tests that embed an app do not."""
    gc.collect()
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)
