"""Instance lifecycle: allowed transitions, crash restart backoff, idle timer decisions."""

import pytest

from mvllm.agent.states import (
    IDLE_SLEEP,
    IDLE_STOP,
    IDLE_UNLOAD,
    InvalidTransition,
    Lifecycle,
    RestartPolicy,
    idle_action,
)
from mvllm.common.state import FAILED, READY, SLEEPING, STARTING, STOPPED, STOPPING


def test_happy_path_and_levels():
    life = Lifecycle()
    for s in (STARTING, READY):
        life.to(s)
    life.to(SLEEPING, level=2)
    assert life.sleep_level == 2 and life.live
    life.to(READY)
    assert life.sleep_level == 0
    life.to(STOPPING)
    life.to(STOPPED)
    assert not life.live


@pytest.mark.parametrize(
    ("path", "bad"),
    [((), READY), ((), SLEEPING), ((STARTING,), SLEEPING), ((STARTING, READY, STOPPING), READY)],
)
def test_invalid_transitions(path, bad):
    life = Lifecycle()
    for s in path:
        life.to(s)
    with pytest.raises(InvalidTransition):
        life.to(bad, level=1)


def test_sleep_needs_a_level():
    life = Lifecycle(READY)
    with pytest.raises(InvalidTransition):
        life.to(SLEEPING)


def test_crash_restart_backoff_then_failed():
    p = RestartPolicy(max_restarts=3, window_s=100, backoff_s=1, backoff_max_s=3)
    assert [p.on_crash(t) for t in (0, 1, 2)] == [1, 2, 3]
    assert p.on_crash(3) is None
    # Crashes that left the window no longer count.
    assert p.on_crash(500) == 1


def test_restart_reset():
    p = RestartPolicy(max_restarts=0)
    assert p.on_crash(0) is None
    p.reset()
    assert len(p.crashes) == 0


def idle(**kw):
    args = dict(
        state=READY, in_flight=0, busy=False, pinned=False, idle_for=0.0,
        idle_timeout=10.0, unload_timeout=100.0, sleep_level_on_idle=1,
    )
    args.update(kw)
    return idle_action(**args)


def test_idle_timers():
    assert idle(idle_for=5) is None
    assert idle(idle_for=10) == IDLE_SLEEP
    assert idle(idle_for=10, sleep_level_on_idle=0) == IDLE_STOP
    assert idle(state=SLEEPING, idle_for=50) is None
    assert idle(state=SLEEPING, idle_for=100) == IDLE_STOP
    assert idle(idle_for=100) == IDLE_STOP  # past both timers: straight to stop
    assert idle(idle_for=1e9, idle_timeout=None, unload_timeout=None) is None


@pytest.mark.parametrize("kw", [{"in_flight": 1}, {"busy": True}, {"pinned": True}, {"state": STARTING}, {"state": FAILED}])
def test_idle_never_touches_busy_pinned_or_transient(kw):
    assert idle(idle_for=1e6, **kw) is None


def test_sleep_on_unload_asks_once_then_stops_after_stop_idle_timeout():
    kw = {"sleep_on_unload": True, "stop_idle_timeout": 1000.0}
    assert idle(idle_for=100, **kw) == IDLE_UNLOAD  # awake past both timers: sleep deep, not stop
    assert idle(state=SLEEPING, idle_for=100, **kw) == IDLE_UNLOAD
    assert idle(state=SLEEPING, idle_for=500, parked=True, **kw) is None  # done since its last use
    assert idle(state=SLEEPING, idle_for=1000, parked=True, **kw) == IDLE_STOP
    assert idle(state=SLEEPING, idle_for=1e9, stop_idle_timeout=None, sleep_on_unload=True, parked=True) is None
    assert idle(state=SLEEPING, idle_for=100, sleep_on_unload=False, stop_idle_timeout=1000.0) == IDLE_STOP
    # stop_idle_timeout only counts for a model with an unload_timeout (ad-hoc ones have none).
    assert idle(state=SLEEPING, idle_for=5000, unload_timeout=None, **kw) is None
