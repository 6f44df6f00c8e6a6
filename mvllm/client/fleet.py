"""The fleet as the operator sees it, built from the router's `/admin/nodes` (or `/load-stats`)
document: nodes with their health and load (marked stale when the router's data is old), agent
GPUs and model instances, and per model where it is awake, asleep or loadable. Pure: no I/O.

Agent nodes carry their agent's `/state` facts (common/state.py names) either under `agent`
(or `state`) or at the top level of the node entry; both are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A node whose load was last read longer ago than this many scrape intervals is stale.
STALE_INTERVALS = 3.0
STALE_MIN_S = 3.0


@dataclass
class GpuView:
    node: str
    index: int
    name: str
    memory_used: int | None
    memory_total: int | None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None

    @property
    def memory_fraction(self) -> float | None:
        if not self.memory_total or self.memory_used is None:
            return None
        return max(0.0, min(1.0, self.memory_used / self.memory_total))


@dataclass
class InstanceView:
    node: str
    name: str
    state: str
    models: list[str]
    sleep_level: int = 0
    running: float = 0
    waiting: float = 0
    queued: int = 0
    in_flight: int = 0
    capacity: int | None = None
    memory_bytes: int | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    released: bool = False  # awake but released by the router's autoscaler: finishing, no new requests
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the JSON it was read from

    @property
    def state_text(self) -> str:
        return f"sleeping({self.sleep_level})" if self.state == "sleeping" and self.sleep_level else self.state

    @property
    def load_text(self) -> str:
        """The load or wake under way as the agent reports it ("weights, ~20s left, last 37s warm"),
        "" when none is; what its last cold start took when nothing predicts the rest."""
        load = self.raw.get("load")
        if not isinstance(load, Mapping):
            return ""
        parts = [str(load.get("phase") or "?").replace("_", " ")]
        left = _num(load.get("remaining_s"))
        if left is not None:
            parts.append(f"~{left:.0f}s left")
        timings = self.raw.get("timings")
        last = _num(timings.get("cold_start_s")) if isinstance(timings, Mapping) else None
        if load.get("kind") == "cold" and last is not None:
            parts.append(f"last {last:.0f}s" + (" warm" if timings.get("cold_start_warm") else ""))
        return ", ".join(parts)


@dataclass
class NodeView:
    name: str
    kind: str
    url: str
    health: str  # up / down / unknown
    breaker: str  # closed / open / half_open
    draining: bool
    drained_by: str | None
    removed: bool
    models: list[str]
    running: float | None
    waiting: float | None
    capacity: int | None
    score: float | None
    in_flight: int
    stale: bool
    stale_reason: str | None
    error: str | None
    gpus: list[GpuView] = field(default_factory=list)
    instances: list[InstanceView] = field(default_factory=list)
    catalog: list[dict[str, Any]] = field(default_factory=list)
    per_model: dict[str, tuple[float, float]] = field(default_factory=dict)  # static: (running, waiting)
    kv_cache_usage: float | None = None  # the engine's vllm:kv_cache_usage_perc, 0..1 (static vLLM nodes)
    prefix_hit_ratio: float | None = None  # its prefix-cache hits / queries since it started
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the router's node entry

    @property
    def is_agent(self) -> bool:
        return self.kind == "agent"

    @property
    def up(self) -> bool:
        # Seen healthy: a node whose first check has not completed ("unknown") is not up yet.
        return self.health == "up" and self.breaker != "open" and not self.removed

    @property
    def state_text(self) -> str:
        """One word or two for the state column: health, then drain."""
        if self.removed:
            base = "removed"
        elif self.health == "down":
            base = "down"
        elif self.breaker == "open":
            base = "ejected"
        elif self.stale:
            base = "stale"
        else:
            base = self.health
        if self.draining and not self.removed:
            return f"{base}, draining"
        return base


@dataclass
class ModelView:
    name: str
    awake: list[str] = field(default_factory=list)  # nodes where it is served now
    starting: list[str] = field(default_factory=list)
    stopping: list[str] = field(default_factory=list)
    asleep: list[str] = field(default_factory=list)  # "node(level)"
    loadable: list[str] = field(default_factory=list)  # agents whose catalog has it, stopped
    failed: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)  # awake nodes the autoscaler released (in `awake` too)
    load_detail: dict[str, str] = field(default_factory=dict)  # node -> InstanceView.load_text of its load
    running: float = 0
    queue: float = 0  # waiting at engines + queued at agents for a load

    def loading_text(self, node: str) -> str:
        """How a copy loading on `node` is shown: "loading", or "loading: weights, ~20s left"."""
        detail = self.load_detail.get(node)
        return f"loading: {detail}" if detail else "loading"

    @property
    def replicas(self) -> int:
        """Copies that take new requests: awake and not released."""
        return len(self.awake) - len(self.released)

    @property
    def replicas_text(self) -> str:
        """The replica count, with the copies on their way in or out: "2 +1 loading -1 released"."""
        text = str(self.replicas)
        if self.starting:
            text += f" +{len(self.starting)} loading"
        if self.released:
            text += f" -{len(self.released)} released"
        return text


@dataclass
class Totals:
    nodes_total: int = 0
    nodes_up: int = 0
    draining: int = 0
    stale: int = 0
    in_flight: int = 0
    running: float = 0
    waiting: float = 0
    capacity: int = 0


@dataclass
class FleetView:
    nodes: list[NodeView]
    models: list[ModelView]
    totals: Totals
    router: dict[str, Any]

    def node(self, name: str) -> NodeView | None:
        return next((n for n in self.nodes if n.name == name), None)

    def model(self, name: str) -> ModelView | None:
        return next((m for m in self.models if m.name == name), None)

    def find_instance(self, model: str, node: str | None = None) -> InstanceView | None:
        """The instance of `model` (a served name, adapter or catalog name) on `node` (any agent if
        None): the one busy changing first, then a failed one, then an awake one."""
        found = [
            i
            for n in self.nodes
            if not node or n.name == node
            for i in n.instances
            if model in i.models or i.name == model
        ]
        found.sort(key=lambda i: _INSTANCE_ORDER.get(i.state, 5))
        return found[0] if found else None

    @property
    def gpus(self) -> list[GpuView]:
        return [g for n in self.nodes for g in n.gpus]


_INSTANCE_ORDER = {"starting": 0, "stopping": 0, "failed": 1, "ready": 2, "sleeping": 3, "stopped": 4}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def agent_part(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """The agent's /state facts in a node entry, wherever the router put them."""
    for key in ("agent", "state"):
        part = entry.get(key)
        if isinstance(part, Mapping) and any(k in part for k in ("gpus", "instances", "catalog")):
            return part
    return entry


def _gpus(node: str, raw: Any) -> list[GpuView]:
    out = []
    for g in raw if isinstance(raw, list) else []:
        if not isinstance(g, Mapping):
            continue
        out.append(
            GpuView(
                node=node,
                index=_int(g.get("index")) or 0,
                name=str(g.get("name") or "GPU"),
                memory_used=_int(g.get("memory_used_bytes")),
                memory_total=_int(g.get("memory_total_bytes")),
                utilization_pct=_num(g.get("utilization_pct")),
                temperature_c=_num(g.get("temperature_c")),
                power_w=_num(g.get("power_w")),
            )
        )
    return out


def _instances(node: str, raw: Any) -> list[InstanceView]:
    items = raw if isinstance(raw, list) else []
    return [instance_view(node, i) for i in items if isinstance(i, Mapping) and i.get("name")]


def instance_view(node: str, i: Mapping[str, Any]) -> InstanceView:
    """One instance of an agent's /state (or of its answer to a lifecycle call) on `node`."""
    names = i.get("served_model_names") or [i.get("name")]
    return InstanceView(
        node=node,
        name=str(i.get("name") or ""),
        state=str(i.get("state") or "unknown"),
        models=[str(m) for m in names] + [str(m) for m in i.get("loras") or []],
        sleep_level=_int(i.get("sleep_level")) or 0,
        running=_num(i.get("running")) or 0,
        waiting=_num(i.get("waiting")) or 0,
        queued=_int(i.get("queued")) or 0,
        in_flight=_int(i.get("in_flight")) or 0,
        capacity=_int(i.get("capacity")),
        memory_bytes=_int(i.get("memory_bytes")),
        error=i.get("error"),
        log_tail=[str(x) for x in i.get("log_tail") or []],
        released=bool(i["router"].get("released")) if isinstance(i.get("router"), Mapping) else False,
        raw=dict(i),
    )


def _stale(entry: Mapping[str, Any], stale_after: float) -> str | None:
    if entry.get("health") == "down":
        return "node down: " + str(entry.get("health_error") or "health check failed")
    age = _num(entry.get("last_scrape_age_s"))
    if age is None:
        return "not scraped yet" if not entry.get("scrape_error") else str(entry["scrape_error"])
    if age > stale_after:
        why = f"load last read {age:.0f}s ago"
        return f"{why} ({entry['scrape_error']})" if entry.get("scrape_error") else why
    return None


def build_fleet(doc: Mapping[str, Any]) -> FleetView:
    """The view of one /admin/nodes or /load-stats document."""
    router = dict(doc.get("router") or {})
    settings = router.get("settings") or {}
    interval = _num(settings.get("scrape_interval")) or 1.0
    stale_after = max(STALE_MIN_S, STALE_INTERVALS * interval)
    nodes: list[NodeView] = []
    for e in doc.get("nodes") or []:
        if not isinstance(e, Mapping) or not e.get("name"):
            continue
        name = str(e["name"])
        part = agent_part(e)
        reason = _stale(e, stale_after)
        nodes.append(
            NodeView(
                name=name,
                kind=str(e.get("kind") or "static"),
                url=str(e.get("url") or ""),
                health=str(e.get("health") or "unknown"),
                breaker=str(e.get("breaker") or "closed"),
                draining=bool(e.get("draining")),
                drained_by=e.get("drained_by"),
                removed=bool(e.get("removed")),
                models=[str(m) for m in e.get("models") or []],
                running=_num(e.get("running")),
                waiting=_num(e.get("waiting")),
                capacity=_int(e.get("capacity")),
                score=_num(e.get("score")),
                in_flight=_int(e.get("in_flight")) or 0,
                stale=reason is not None,
                stale_reason=reason,
                error=e.get("health_error") or e.get("scrape_error") or e.get("error"),
                gpus=_gpus(name, part.get("gpus")),
                instances=_instances(name, part.get("instances")),
                catalog=[c for c in part.get("catalog") or [] if isinstance(c, Mapping)],
                per_model=_per_model(e.get("per_model")),
                kv_cache_usage=_num(e.get("kv_cache_usage")),
                prefix_hit_ratio=_num(e.get("prefix_hit_ratio")),
                raw=dict(e),
            )
        )
    return FleetView(nodes=nodes, models=_models(nodes), totals=_totals(nodes), router=router)


def _totals(nodes: Iterable[NodeView]) -> Totals:
    t = Totals()
    for n in nodes:
        if n.removed:
            continue
        t.nodes_total += 1
        t.nodes_up += n.up
        t.draining += n.draining
        t.stale += n.stale
        t.in_flight += n.in_flight
        if not n.stale:
            t.running += n.running or 0
            t.waiting += n.waiting or 0
        t.capacity += n.capacity or 0
    return t


def _models(nodes: list[NodeView]) -> list[ModelView]:
    views: dict[str, ModelView] = {}

    def view(name: str) -> ModelView:
        return views.setdefault(name, ModelView(name))

    for n in nodes:
        if n.removed:
            continue
        if not n.is_agent:
            per_model = n.per_model
            for m in n.models:
                v = view(m)
                v.awake.append(n.name)
                if m in per_model:
                    v.running += per_model[m][0]
                    v.queue += per_model[m][1]
                elif len(n.models) == 1 and not n.stale:
                    v.running += n.running or 0
                    v.queue += n.waiting or 0
            continue
        seen: set[str] = set()
        for inst in n.instances:
            for m in inst.models:
                seen.add(m)
                v = view(m)
                v.running += inst.running
                v.queue += inst.waiting + inst.queued
                if inst.state == "ready":
                    v.awake.append(n.name)
                    if inst.released:
                        v.released.append(n.name)
                elif inst.state == "sleeping":
                    waking = ", waking" if inst.load_text else ""
                    v.asleep.append(f"{n.name}({inst.sleep_level}{waking})" if inst.sleep_level else n.name)
                elif inst.state == "starting":
                    v.starting.append(n.name)
                    if inst.load_text:
                        v.load_detail[n.name] = inst.load_text
                elif inst.state == "stopping":
                    v.stopping.append(n.name)
                elif inst.state == "failed":
                    v.failed.append(n.name)
                else:
                    v.loadable.append(n.name)
        for entry in n.catalog:
            names = [*(entry.get("served_model_names") or [entry.get("name")]), *(entry.get("lora_adapters") or [])]
            for m in names:
                if m and m not in seen:
                    seen.add(str(m))
                    view(str(m)).loadable.append(n.name)
        for m in n.models:  # names the router lists for the agent that neither list above has
            if m not in seen:
                view(m).loadable.append(n.name)
    return [views[k] for k in sorted(views)]


def _per_model(raw: Any) -> dict[str, tuple[float, float]]:
    if not isinstance(raw, Mapping):
        return {}
    return {
        str(m): (_num(v.get("running")) or 0.0, _num(v.get("waiting")) or 0.0)
        for m, v in raw.items()
        if isinstance(v, Mapping)
    }


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "–"
    gib = n / 2**30
    return f"{gib:.1f}G" if gib < 100 else f"{gib:.0f}G"


def fmt_pct(fraction: float | None, stale: bool = False) -> str:
    """A 0..1 fraction as a whole percentage ("–" when unknown, "?" appended when stale)."""
    if fraction is None:
        return "–"
    return f"{fraction * 100:.0f}%" + ("?" if stale else "")


def fmt_num(x: float | None, stale: bool = False) -> str:
    """Load numbers: '–' when unknown; a stale number keeps its value with a '?' (not a fresh 0)."""
    if x is None:
        return "–"
    s = f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"
    return s + "?" if stale else s
