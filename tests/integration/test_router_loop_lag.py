"""The router measures its own event-loop lag (mvllm_event_loop_lag_seconds): a deliberate stall of
the loop shows in /metrics, and a quiet loop shows none."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from mvllm.common.prom import iter_samples
from tests.integration.router_support import router_for


async def _lag(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(largest lag of the window, samples in the histogram)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    values = {s.name: s.value for s in iter_samples(text) if s.name.startswith("mvllm_event_loop_lag_seconds")}
    return values["mvllm_event_loop_lag_seconds_max"], values["mvllm_event_loop_lag_seconds_count"]


async def test_a_stalled_loop_shows_in_the_lag_metric(tmp_path: Path) -> None:
    async with router_for(tmp_path, []) as r, aiohttp.ClientSession() as s:
        await asyncio.sleep(0.35)  # a few samples of a quiet loop
        quiet, count = await _lag(s, r.url)
        assert count >= 2
        assert quiet < 0.5  # nothing blocks it (generous: the machine is shared), well below the stall
        # A slow callback on the loop the router runs on (as blocking I/O would be).
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)
        await asyncio.sleep(1.25)  # the stall, then the monitor's late wake-up is recorded
        stalled, _ = await _lag(s, r.url)
        # The monitor's next wake-up fell due at most 100 ms into the 1 s stall.
        assert 0.85 <= stalled < 5.0, stalled
