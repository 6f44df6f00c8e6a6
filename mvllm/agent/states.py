"""Pure lifecycle rules of one model instance: allowed state changes, crash restarts, idle timers.

    stopped ──▶ starting ──▶ ready ⇄ sleeping(1|2)
       ▲           │           │          │
       └─ stopping ◀───────────┴──────────┘        any live state ──crash──▶ starting | failed

No I/O here: an engine (mvllm.agent.process) and the supervisor ask these objects what to do and do it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mvllm.common.state import FAILED, READY, SLEEPING, STARTING, STOPPED, STOPPING

_ALLOWED: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING}),
    # STARTING again = restart after a crash; STOPPED = a restart given up before any process ran.
    STARTING: frozenset({READY, STOPPING, FAILED, STARTING, STOPPED}),
    READY: frozenset({SLEEPING, STOPPING, FAILED, STARTING}),
    SLEEPING: frozenset({READY, STOPPING, FAILED, STARTING}),
    STOPPING: frozenset({STOPPED, FAILED}),
    FAILED: frozenset({STARTING, STOPPING, STOPPED}),
}


class InvalidTransition(RuntimeError):
    pass


@dataclass
class Lifecycle:
    """The state of one instance and its sleep level, changed only along the allowed edges."""

    state: str = STOPPED
    sleep_level: int = 0

    def to(self, new: str, *, level: int = 0) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(f"{self.state} -> {new}")
        if new == SLEEPING and level not in (1, 2):
            raise InvalidTransition(f"sleeping needs level 1 or 2, got {level}")
        self.state = new
        self.sleep_level = level if new == SLEEPING else 0

    @property
    def live(self) -> bool:
        """An engine process is expected to exist."""
        return self.state in (STARTING, READY, SLEEPING, STOPPING)


@dataclass
class RestartPolicy:
    """Crash restarts with exponential backoff; too many crashes in a window and the model is failed."""

    max_restarts: int = 3
    window_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    crashes: deque[float] = field(default_factory=deque)

    def on_crash(self, now: float) -> float | None:
        """Record a crash at `now`; the delay before restarting, or None to give up (failed)."""
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.window_s:
            self.crashes.popleft()
        n = len(self.crashes)
        if n > self.max_restarts:
            return None
        return min(self.backoff_max_s, self.backoff_s * (2 ** (n - 1)))

    def reset(self) -> None:
        """An operator's explicit load starts the count afresh."""
        self.crashes.clear()


# What the idle timers ask for.
IDLE_SLEEP = "sleep"
IDLE_STOP = "stop"
# unload_timeout with sleep_on_unload: sleep deep instead of stopping, when memory allows
# (mvllm.agent.placement.unload_step decides how).
IDLE_UNLOAD = "unload"


def idle_action(
    *,
    state: str,
    in_flight: int,
    busy: bool,
    pinned: bool,
    idle_for: float,
    idle_timeout: float | None,
    unload_timeout: float | None,
    sleep_level_on_idle: int,
    sleep_on_unload: bool = False,
    stop_idle_timeout: float | None = None,
    parked: bool = False,
) -> str | None:
    """IDLE_SLEEP, IDLE_STOP, IDLE_UNLOAD or None for an instance idle for `idle_for` seconds since
    its last use.

    `busy` is an operation in progress on it (load, wake, sleep). Timers count from the last use,
    so `unload_timeout` is the total idle time before stopping, sleeping included. With
    `sleep_on_unload`, unload_timeout asks for IDLE_UNLOAD once (`parked`: it was done since the
    last use), and `stop_idle_timeout` (counted like unload_timeout, and only with it) stops it.
    """
    if pinned or busy or in_flight > 0 or state not in (READY, SLEEPING):
        return None
    if unload_timeout is not None and idle_for >= unload_timeout:
        if not sleep_on_unload or (stop_idle_timeout is not None and idle_for >= stop_idle_timeout):
            return IDLE_STOP
        if not parked:
            return IDLE_UNLOAD
        return None
    if state == READY and idle_timeout is not None and idle_for >= idle_timeout:
        return IDLE_STOP if sleep_level_on_idle == 0 else IDLE_SLEEP
    return None
