"""Fault injection policy: which inference request fails, and how (pure; app.py acts on the draw).

Kinds: `500` / `503` answer that status in vLLM's error shape; `hang` accepts and never answers;
`reset` closes the connection before any header; `midstream` sends a few chunks (or part of the
body) then drops the connection; `crash` ends the whole process at once with exit code 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mvllm.sim.config import FAIL_KINDS

MIDSTREAM_CHUNKS = 2  # token chunks a `midstream` fault lets through before dropping the connection


@dataclass
class FaultInjector:
    kind: str = "500"
    rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.configure(self.kind, self.rate)
        self._rng = random.Random(f"faults-{self.seed}")

    def configure(self, kind: str, rate: float) -> None:
        if kind not in FAIL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAIL_KINDS)}, got {kind!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {rate}")
        self.kind, self.rate = kind, rate

    def draw(self) -> str | None:
        """The fault for the next inference request, or None. Deterministic for a given seed."""
        if self.rate <= 0.0:
            return None
        if self.rate >= 1.0 or self._rng.random() < self.rate:
            return self.kind
        return None
