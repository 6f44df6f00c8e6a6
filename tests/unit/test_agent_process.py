"""The agent's run-time catalog, an engine's request bookkeeping and assignments, and the frozen config."""

import dataclasses

import aiohttp
import pytest

from mvllm.agent.catalog import Catalog
from mvllm.agent.config import apply_env, parse_config
from mvllm.agent.engine import EngineClient
from mvllm.agent.errors import Conflict
from mvllm.agent.launcher import PlainLauncher
from mvllm.agent.metrics import AgentMetrics
from mvllm.agent.process import EngineContext, EngineProcess
from mvllm.common.state import READY, STARTING

CATALOG = {"models": {"a": {"model": "org/a", "memory_gib": 1}, "b": {"model": "org/b", "memory_gib": 1}}}


async def _none() -> None:
    return None


async def _held(pids: set[int]) -> set[int]:
    return set()


def test_config_is_frozen_and_apply_env_is_the_last_write():
    cfg = parse_config(CATALOG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]
    assert apply_env(cfg, {"MVLLM_AGENT_PORT": "7009"}) is cfg and cfg.port == 7009


def test_catalog_owns_its_table():
    cfg = parse_config(CATALOG)
    cat = Catalog(cfg.models)
    extra = dataclasses.replace(cfg.models["a"], name="c", served_model_names=["c"])
    cat.add(extra)
    assert "c" in cat and "c" not in cfg.models  # the loaded config stays as it was
    assert cat.model_for("c") == (extra, None) and cat.model_for("nope") is None
    with pytest.raises(Conflict):
        cat.add(extra)
    assert not cat.remove(dataclasses.replace(extra))  # only that very entry
    assert cat.remove(extra) and "c" not in cat
    new_a = dataclasses.replace(cfg.models["a"], devices=[1])
    cat.replace(new_a)
    assert cat.get("a") is new_a and cfg.models["a"] is not new_a
    with pytest.raises(KeyError):
        cat.replace(extra)


async def test_engine_requests_queue_drain_and_assign():
    cfg = parse_config(CATALOG)
    async with aiohttp.ClientSession() as session:
        ctx = EngineContext(cfg, PlainLauncher(), EngineClient(session), AgentMetrics(), "1:2", _none, _held)
        eng = EngineProcess(cfg.models["a"], ctx)
        assert not eng.can_serve_now() and eng.log_path == cfg.log_dir / "a.log"
        eng.life.to(STARTING)
        eng.life.to(READY)
        assert eng.can_serve_now() and not eng.can_serve_now("some-lora")
        eng.begin()
        assert eng.in_flight == 1 and not eng.idle.is_set() and eng.last_used > 0
        with eng.queue_slot():
            assert eng.queued == 1
        assert eng.queued == 0
        await eng.drain(timeout=0.01)  # one still in flight: drain gives up after the timeout
        assert eng.draining and not eng.can_serve_now()
        eng.end()
        assert eng.idle.is_set()
        eng.resume()
        assert eng.can_serve_now()
        # No process and nothing under way: an assignment applies at once; else at the next start.
        moved = dataclasses.replace(cfg.models["a"], devices=[1])
        assert eng.assign(moved) and eng.spec is moved and eng.pending_spec is None
        eng.op = "start"
        again = dataclasses.replace(moved, devices=[2])
        assert not eng.assign(again) and eng.spec is moved and eng.pending_spec is again
        eng.op = None
        eng.take_pending_spec()
        assert eng.spec is again and eng.pending_spec is None
