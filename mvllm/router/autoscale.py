"""Autoscale policy: when to add or release a replica of a model (pure: no I/O, no clock of its own).

Inputs, per model and per tick: its replicas (agent, state, score) and whether it has been used.
    state: "awake" (ready, routed to), "loading" (starting or waking), "sleeping", "draining"
        (released: finishes its in-flight requests, gets no new ones).
    score: the replica's load score from the routing policy (mvllm.router.policy, least-score):
        (running + waiting_weight * waiting) / (capacity * weight); 1.0 is a full replica.
Formula:
    mean = sum(score of awake replicas) / number of awake replicas   (no awake replica: no decision,
        both timers reset; loading a model from nothing is the request path's job, not this policy's)
    active = awake + loading replicas (sleeping and draining ones do not count)
    Scale up: mean > scale_up_score without a break for scale_up_after seconds, no replica loading,
        active < max_replicas  ->  one ScaleUp (the caller picks the cheapest agent by the tiers).
        The timer is held at zero while a replica loads, so the next step up waits until the new
        replica has served for scale_up_after: one step at a time per model.
    Scale down: mean < scale_down_score without a break for scale_down_after seconds, awake > floor
        ->  one ScaleDown of the least-loaded awake replica (lowest score, ties by agent name).
        floor = min_replicas once the model has been used, else 1: the policy never releases a
        model's last awake replica (the agent's idle timers sleep and unload idle models).
    Each timer restarts when its condition breaks (hysteresis), and at each decision, so
    decisions on one model are at least scale_up_after / scale_down_after apart.
Parameters ([autoscale] in servers.toml; off unless enabled = true):
    enabled = false, min_replicas = 1, max_replicas = 4, scale_up_score = 0.8, scale_up_after = 5 s,
    scale_down_score = 0.3, scale_down_after = 60 s; scale_down_score must be below scale_up_score.
    [autoscale.models."name"] min_replicas / max_replicas override the bounds for one model.
The policy never scales up merely to reach min_replicas, so it does not fight the agents' idle timers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mvllm.common.tomlconf import Section, range_problem

ReplicaState = Literal["awake", "loading", "sleeping", "draining"]
REPLICA_STATES: tuple[str, ...] = ("awake", "loading", "sleeping", "draining")


@dataclass(frozen=True)
class ModelLimits:
    """Per-model bounds; None means: the [autoscale] table's value."""

    min_replicas: int | None = None
    max_replicas: int | None = None


@dataclass(frozen=True)
class AutoscaleConfig:
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    scale_up_score: float = 0.8
    scale_up_after: float = 5.0
    scale_down_score: float = 0.3
    scale_down_after: float = 60.0
    models: Mapping[str, ModelLimits] = field(default_factory=dict)

    def bounds(self, model: str) -> tuple[int, int]:
        """(min_replicas, max_replicas) for one model, its own limits first."""
        limits = self.models.get(model, ModelLimits())
        lo = limits.min_replicas if limits.min_replicas is not None else self.min_replicas
        hi = limits.max_replicas if limits.max_replicas is not None else self.max_replicas
        return lo, hi


def parse_autoscale(table: Any, file: str | Path | None) -> AutoscaleConfig:
    """Validate the `[autoscale]` table (None: absent, all defaults); raises ConfigError naming the
    file, the key and the fix."""
    s = Section({} if table is None else table, file, "autoscale")
    d = AutoscaleConfig()
    enabled = s.bool("enabled", d.enabled)
    lo = s.int("min_replicas", d.min_replicas, min=1)
    hi = s.int("max_replicas", d.max_replicas, min=1)
    problem = range_problem(lo, max=hi, max_name="max_replicas")
    if problem is not None:
        raise s.error("min_replicas", problem)
    up_score = s.float("scale_up_score", d.scale_up_score, min=0.0)
    up_after = s.float("scale_up_after", d.scale_up_after, min=0.0)
    down_score = s.float("scale_down_score", d.scale_down_score, min=0.0)
    down_after = s.float("scale_down_after", d.scale_down_after, min=0.0)
    if down_score >= up_score:
        raise s.error(
            "scale_down_score",
            f"must be below scale_up_score ({up_score:g}), got {down_score:g}: "
            "leave a band of scores where the replica count holds still",
        )
    models_table = s.section("models")
    models: dict[str, ModelLimits] = {}
    for name, raw in models_table.data.items():
        models_table.raw(name)
        m = Section(raw, file, f'autoscale.models."{name}"')
        limits = ModelLimits(m.int("min_replicas", None, min=1), m.int("max_replicas", None, min=1))
        m.check_unknown()
        m_lo = limits.min_replicas if limits.min_replicas is not None else lo
        m_hi = limits.max_replicas if limits.max_replicas is not None else hi
        if m_lo > m_hi:
            key = "min_replicas" if limits.min_replicas is not None else "max_replicas"
            raise m.error(key, f"min_replicas ({m_lo}) must be <= max_replicas ({m_hi}) for this model")
        models[name] = limits
    s.check_unknown()
    return AutoscaleConfig(enabled, lo, hi, up_score, up_after, down_score, down_after, models)


@dataclass(frozen=True)
class Replica:
    agent: str
    state: ReplicaState
    score: float = 0.0


@dataclass(frozen=True)
class ModelObservation:
    model: str
    replicas: tuple[Replica, ...]
    used: bool  # has the model had a request since the router started (min_replicas applies once used)


@dataclass(frozen=True)
class ScaleUp:
    model: str
    reason: str


@dataclass(frozen=True)
class ScaleDown:
    model: str
    agent: str  # the replica to release
    reason: str


Decision = ScaleUp | ScaleDown


@dataclass
class _Timers:
    up_since: float | None = None
    down_since: float | None = None


class AutoscalePolicy:
    """Per-model hysteresis timers over successive observations; `tick` returns the decisions due."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._timers: dict[str, _Timers] = {}

    def reconfigure(self, config: AutoscaleConfig) -> None:
        """New thresholds apply from the next tick; running timers continue if their condition
        still holds under them. Disabling forgets every timer."""
        self.config = config
        if not config.enabled:
            self._timers.clear()

    def forget(self, model: str) -> None:
        self._timers.pop(model, None)

    def tick(self, now: float, observations: Iterable[ModelObservation]) -> list[Decision]:
        if not self.config.enabled:
            return []
        decisions: list[Decision] = []
        seen: set[str] = set()
        for obs in observations:
            seen.add(obs.model)
            decision = self._decide(now, obs, self._timers.setdefault(obs.model, _Timers()))
            if decision is not None:
                decisions.append(decision)
        for model in set(self._timers) - seen:  # unobserved: its conditions are broken
            del self._timers[model]
        return decisions

    def _decide(self, now: float, obs: ModelObservation, timers: _Timers) -> Decision | None:
        cfg = self.config
        awake = [r for r in obs.replicas if r.state == "awake"]
        if not awake:
            timers.up_since = timers.down_since = None
            return None
        loading = sum(1 for r in obs.replicas if r.state == "loading")
        mean = sum(r.score for r in awake) / len(awake)
        lo, hi = cfg.bounds(obs.model)

        if mean > cfg.scale_up_score and not loading:
            timers.up_since = now if timers.up_since is None else timers.up_since
            held = now - timers.up_since
            if held >= cfg.scale_up_after and len(awake) + loading < hi:
                timers.up_since = now
                return ScaleUp(
                    obs.model,
                    f"mean score {mean:.2f} > {cfg.scale_up_score:g} for {held:.1f} s "
                    f"({len(awake)} awake, max_replicas {hi})",
                )
        else:
            timers.up_since = None

        if mean < cfg.scale_down_score:
            timers.down_since = now if timers.down_since is None else timers.down_since
            held = now - timers.down_since
            floor = lo if obs.used else 1
            if held >= cfg.scale_down_after and len(awake) > floor:
                timers.down_since = now
                victim = min(awake, key=lambda r: (r.score, r.agent))
                return ScaleDown(
                    obs.model,
                    victim.agent,
                    f"mean score {mean:.2f} < {cfg.scale_down_score:g} for {held:.1f} s "
                    f"({len(awake)} awake, floor {floor}); releasing {victim.agent} (score {victim.score:.2f})",
                )
        else:
            timers.down_since = None
        return None
