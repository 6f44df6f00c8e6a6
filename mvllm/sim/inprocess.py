"""Run simulated engines inside the current event loop, on real 127.0.0.1 ports (tests, demos).

    sim = await start_sim(SimConfig(model="m", ttft_ms=2, itl_ms=1))
    ... sim.url ...
    await sim.close()
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from mvllm.sim.app import ENGINE, STATE, SimState, build_app
from mvllm.sim.config import SimConfig
from mvllm.sim.engine import Engine


@dataclass
class RunningSim:
    config: SimConfig
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self) -> Engine:
        return self.app[ENGINE]

    @property
    def state(self) -> SimState:
        return self.app[STATE]

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_sim(config: SimConfig, *, port: int = 0, shutdown_timeout: float | None = None) -> RunningSim:
    """Serve `config` on 127.0.0.1 (port 0: any free port). Client disconnects abort requests, as in
    `mvllm sim serve`. The `crash` fault raises instead of ending the process."""

    def crash() -> None:
        raise RuntimeError("simulated crash (in-process sims do not exit)")

    app = build_app(config, crash=crash)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=config.keepalive_s,  # vLLM's uvicorn closes idle connections after 5 s
        # aiohttp reads 0 as "no limit"; vLLM's 0 means "abort in-flight requests now".
        shutdown_timeout=max(0.001, config.shutdown_timeout if shutdown_timeout is None else shutdown_timeout),
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    return RunningSim(config, app, runner, bound)
