"""Fixtures shared by every test module: simulated engines served in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from mvllm.sim.config import SimConfig
from mvllm.sim.inprocess import RunningSim, start_sim
from tests.support import FAST_SIM

SimFactory = Callable[..., Awaitable[RunningSim]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    """`await sim_factory(**SimConfig fields)`: a simulated engine in this event loop on a free
    127.0.0.1 port (model "sim-model", FAST_SIM timings unless given); all are closed afterwards.
    For tests that need an engine, not a process (those use tests/procs.py's run_sim)."""
    started: list[RunningSim] = []

    async def start(**fields: Any) -> RunningSim:
        sim = await start_sim(SimConfig(**{"model": "sim-model", **FAST_SIM, **fields}))
        started.append(sim)
        return sim

    yield start
    for sim in started:
        await sim.close()
