"""The benchmark scenarios; each starts what it needs, runs bounded load, and returns its rows."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from benchmarks.harness import Harness


@dataclass
class Context:
    """What every scenario gets from the runner."""

    quick: bool = False
    keep_logs: bool = False
    router_ok: bool = False  # `mvllm run --help` works; a leg still skips if the router won't start
    router_reason: str = ""

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def harness(self, name: str) -> Harness:
        return Harness(name, keep_logs=self.keep_logs)

    def pick(self, quick: float, full: float) -> float:
        return quick if self.quick else full


NAMES = ("overhead", "balancing", "failover", "scale", "prefix")
# Run only when asked (`--only relay`): longer than a minute, and it needs vllm-router installed.
EXTRA = ("relay",)
