"""Pure load-progress rules: which phase of a cold start an engine's log line marks, the phases an
engine went through (with when), and the predicted time left of a load or wake.

Phases, in the order vLLM 0.25 writes them (seen on an H200, the tiny Llama; `--enforce-eager`
skips compile and graphs, a phase may be skipped, never revisited):

    spawned   the process exists (the agent's own mark at launch)
    imported  "non-default args"                        (the server has imported vLLM, read its flags)
    weights   "Loading model from scratch", "Loading safetensors", "Loading weights took"
    compile   "Dynamo bytecode transform", "torch.compile took"
    kv_cache  "Available KV cache memory", "GPU KV cache size"
    graphs    "Capturing CUDA graphs", "Graph capturing finished"
    ready     "Starting vLLM server", "Application startup complete"

Predicted time left (`remaining_s`): with the model's last measured cold start (total and the
offset at which each phase began), what that start still took from the phase the engine is in now,
less the time spent in it; without one, or once the engine is slower than last time, the
time left from the phase's entry on the first cold start measured (DEFAULT_REMAINING_S); None when
even that has run out (the caller answers its default).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

SPAWNED = "spawned"
IMPORTED = "imported"
WEIGHTS = "weights"
COMPILE = "compile"
KV_CACHE = "kv_cache"
GRAPHS = "graphs"
READY = "ready"
PHASES = (SPAWNED, IMPORTED, WEIGHTS, COMPILE, KV_CACHE, GRAPHS, READY)
_RANK = {p: i for i, p in enumerate(PHASES)}

# A wake is one step: the agent's own mark while /wake_up (and reload_weights) run.
WAKING = "waking"

_MARKERS: tuple[tuple[str, str], ...] = (
    ("non-default args", IMPORTED),
    ("Loading model from scratch", WEIGHTS),
    ("Loading safetensors", WEIGHTS),
    ("Loading weights took", WEIGHTS),
    ("Dynamo bytecode transform", COMPILE),
    ("torch.compile took", COMPILE),
    ("Available KV cache memory", KV_CACHE),
    ("GPU KV cache size", KV_CACHE),
    ("Capturing CUDA graphs", GRAPHS),
    ("Graph capturing finished", GRAPHS),
    ("Starting vLLM server", READY),
    ("Application startup complete", READY),
)

# Seconds left at the entry of each phase, from the first cold start measured on an H200 (plain
# spawn, empty compile cache: 103 s to the first answer, /work/.device/6/cold/engine.log).
DEFAULT_REMAINING_S: Mapping[str, float] = {
    SPAWNED: 103.0,
    IMPORTED: 77.0,
    WEIGHTS: 35.0,
    COMPILE: 32.0,
    KV_CACHE: 19.0,
    GRAPHS: 19.0,
    READY: 1.0,
}


def phase_of(line: str) -> str | None:
    """The phase `line` of an engine's log marks, or None."""
    for marker, phase in _MARKERS:
        if marker in line:
            return phase
    return None


@dataclass
class PhaseTracker:
    """The phases one start has gone through: `offsets[phase]` = seconds after spawn it began."""

    phase: str = SPAWNED
    offsets: dict[str, float] = field(default_factory=lambda: {SPAWNED: 0.0})

    def feed(self, line: str, elapsed: float) -> bool:
        """Take one log line seen `elapsed` s after spawn; True when it moved the phase on."""
        found = phase_of(line)
        if found is None or _RANK[found] <= _RANK[self.phase]:
            return False
        self.phase = found
        self.offsets[found] = elapsed
        return True

    def since_phase(self, elapsed: float) -> float:
        """Seconds spent in the current phase, `elapsed` s after spawn."""
        return max(0.0, elapsed - self.offsets.get(self.phase, 0.0))


@dataclass(frozen=True)
class LastStart:
    """What the model's last measured cold start took: total seconds, and each phase's offset."""

    total_s: float
    offsets: Mapping[str, float] = field(default_factory=dict)


def remaining_s(phase: str, elapsed: float, since_phase: float, last: LastStart | None) -> float | None:
    """Predicted seconds left of a cold start in `phase` (see the module doc), or None."""
    if last is not None and last.total_s > 0:
        at = last.offsets.get(phase)
        left = last.total_s - at - since_phase if at is not None else last.total_s - elapsed
        if left > 0:
            return left
    default = DEFAULT_REMAINING_S.get(phase)
    if default is None:
        return None
    left = default - since_phase
    return left if left > 0 else None


def wake_remaining_s(elapsed: float, last_wake_s: float | None) -> float | None:
    """Predicted seconds left of a wake begun `elapsed` s ago, from the last wake at that level."""
    if last_wake_s is None:
        return None
    left = last_wake_s - elapsed
    return left if left > 0 else None


def retry_after_s(remaining: float | None, default: float) -> int:
    """Retry-After for a request that waited on a load: the predicted time left, whole seconds up, >= 1."""
    value = remaining if remaining is not None and remaining > 0 else default
    return max(1, int(-(-value // 1)))
