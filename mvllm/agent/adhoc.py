"""Ad-hoc instances of one agent (`POST /instances`): an engine for a model that is not in agent.toml,
with vLLM flags checked against `[adhoc]`'s allow-list, removed when its ttl ends or on DELETE.

An ad-hoc instance is a catalog entry that lives in memory only (`ModelSpec.adhoc` set): once
created, the supervisor treats it like any catalog model (routing by served name, placement and
eviction, crash restarts, `/state`, `/models/NAME/*`). Its lease starts at creation; when it ends
the instance is stopped and forgotten, but never while a request is in flight or waiting for it:
those postpone the stop until they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from mvllm.agent import report
from mvllm.agent.adhoc_params import AdhocInfo, ParamError, merged_params, param_args, validate_params
from mvllm.agent.config import ModelSpec
from mvllm.agent.engine import read_log_tail
from mvllm.agent.errors import AgentError, BadRequest, Conflict, UnknownModel
from mvllm.agent.estimate import VLLM_DTYPES
from mvllm.agent.modelfiles import read_shape
from mvllm.agent.process import EngineProcess
from mvllm.agent.supervisor import Supervisor

log = logging.getLogger("mvllm.agent.adhoc")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL_RE = re.compile(r"^[^\s\-][^\s]{0,511}$")  # an HF id or a path: no blanks, never a flag
_REQUEST_KEYS = frozenset({"model", "name", "served_model_name", "params", "devices", "ttl", "memory_gib"})
_START_FAILED_TAIL = 8  # engine log lines quoted when a start fails


class ParamRejected(BadRequest):
    """A vLLM flag that is not allowed or has a bad value (400, code `invalid_parameter`)."""

    code = "invalid_parameter"

    def __init__(self, exc: ParamError) -> None:
        super().__init__(exc.message)
        self.param = exc.flag


@dataclass
class AdhocRequest:
    model: str
    name: str | None
    served_model_names: list[str] | None
    params: dict[str, Any]  # the request's flags, checked
    devices: list[int] | None
    ttl: float | None
    memory_gib: float | None


def parse_request(body: dict[str, Any], sup: Supervisor) -> AdhocRequest:
    """The body of `POST /instances`, checked (BadRequest / ParamRejected say what is wrong)."""
    acfg = sup.cfg.adhoc
    unknown = sorted(set(body) - _REQUEST_KEYS)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(_REQUEST_KEYS))}")
    model = body.get("model")
    if not isinstance(model, str) or not _MODEL_RE.match(model):
        raise BadRequest("`model` is required: an HF id or a path (no blanks, not starting with '-')")
    if not acfg.model_allowed(model):
        raise BadRequest(f"model {model!r} is not allowed here ([adhoc] allowed_models: {', '.join(acfg.allowed_models)})")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
        raise BadRequest("`name` must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    served = body.get("served_model_name")
    if isinstance(served, str):
        served = [served]
    if served is not None and (
        not isinstance(served, list) or not served or not all(isinstance(s, str) and _MODEL_RE.match(s) for s in served)
    ):
        raise BadRequest("`served_model_name` must be a name or a non-empty list of names (no blanks)")
    try:
        params = validate_params(
            body.get("params"), acfg.allowed_params, trust_remote_code=acfg.allow_trust_remote_code
        )
    except ParamError as exc:
        raise ParamRejected(exc) from None
    devices = body.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool):
        devices = [devices]
    if devices is not None and (
        not isinstance(devices, list)
        or not devices
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
        or len(set(devices)) != len(devices)
    ):
        raise BadRequest("`devices` must be a non-empty list of distinct GPU indices")
    ttl = body.get("ttl")
    if ttl is None:
        ttl = acfg.default_ttl
    elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
        raise BadRequest("`ttl` must be a number of seconds >= 0 (0: no expiry)")
    else:
        ttl = float(ttl) or None
    if acfg.max_ttl is not None and (ttl is None or ttl > acfg.max_ttl):
        raise BadRequest(f"`ttl` may be at most {acfg.max_ttl:g} s on this agent ([adhoc] max_ttl)")
    mem = body.get("memory_gib")
    if mem is not None and (isinstance(mem, bool) or not isinstance(mem, (int, float)) or mem <= 0):
        raise BadRequest("`memory_gib` must be a number > 0 (the budget on each of its GPUs)")
    return AdhocRequest(model, name, served, params, devices, ttl, float(mem) if mem is not None else None)


def _default_name(model: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]).strip("-._") or "adhoc"
    return f"{base[:48]}-{secrets.token_hex(3)}"


class AdhocManager:
    """Create, list and remove the ad-hoc instances of one supervisor, and end them when their ttl is over."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._removals: dict[str, asyncio.Task] = {}

    # ----------------------------------------------------------------- reading

    def instances(self) -> list[EngineProcess]:
        return [i for i in self.sup.instances.values() if i.spec.adhoc is not None and not i.retired]

    def get(self, name: str) -> EngineProcess:
        inst = self.sup.instances.get(name)
        if inst is None or inst.spec.adhoc is None or inst.retired:
            raise UnknownModel(f"no ad-hoc instance named {name!r} on this agent")
        return inst

    def describe(self, inst: EngineProcess) -> dict[str, Any]:
        """/state's instance entry plus what it was started with."""
        info = inst.spec.adhoc
        assert info is not None
        doc = report.instance_state(self.sup, inst).to_dict()
        doc.update(
            model=inst.spec.model,
            params=dict(info.params),
            requested_params=dict(info.requested),
            ttl_s=info.ttl,
            created_at=info.created_at,
            engine_flags=list(inst.spec.extra_args),
        )
        return doc

    # ---------------------------------------------------------------- creating

    async def create(self, body: dict[str, Any], *, wait: bool) -> tuple[EngineProcess, bool]:
        """Register an ad-hoc instance and start its engine; (instance, ready) once ready, or at
        once with `wait` false. A start that fails removes it again and says why."""
        sup = self.sup
        acfg = sup.cfg.adhoc
        if acfg.max_instances == 0:
            raise Conflict("ad-hoc instances are off on this agent ([adhoc] max_instances = 0)")
        req = parse_request(body, sup)
        shape = None
        if req.memory_gib is None and acfg.memory_gib is None and "gpu_memory_utilization" not in merged_params(acfg, req.params):
            # No budget: its need is estimated from the model's config.json, as for catalog models.
            shape = await asyncio.to_thread(read_shape, req.model, dict(os.environ), None)
        await sup.refresh_gpus()
        # From here to the registration nothing yields: the count and the names cannot race.
        live = self.instances()
        if len(live) >= acfg.max_instances:
            names = ", ".join(i.name for i in live)
            raise Conflict(f"{len(live)} ad-hoc instance(s) already run here ({names}); [adhoc] max_instances = {acfg.max_instances}")
        spec = self._spec(req)
        if shape is not None:
            spec.shape, spec.shape_source = shape
        inst = sup.add(spec)
        log.info(
            "ad-hoc instance %s: %s on GPU(s) %s, served as %s, ttl %s, flags %s",
            spec.name, spec.model, spec.devices, ", ".join(spec.served_model_names),
            f"{spec.adhoc.ttl:g}s" if spec.adhoc and spec.adhoc.ttl else "none", " ".join(spec.extra_args) or "-",
        )  # fmt: skip
        task = asyncio.ensure_future(sup.load(spec.name))
        if not wait:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return inst, False
        try:
            await asyncio.wait_for(asyncio.shield(task), sup.cfg.load_timeout)
        except asyncio.TimeoutError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            return inst, False
        except AgentError as exc:
            tail = await asyncio.to_thread(read_log_tail, inst.log_path, _START_FAILED_TAIL)
            await self.remove(spec.name, reason="start_failed")
            where = f"; engine log {inst.log_path}: " + " | ".join(tail) if tail else ""
            exc.message = f"ad-hoc instance {spec.name} did not start, removed: {exc.message}{where}"
            raise
        return inst, True

    def _spec(self, req: AdhocRequest) -> ModelSpec:
        sup = self.sup
        acfg = sup.cfg.adhoc
        taken = {n for n, _inst, _lora in sup.routable()} | set(sup.instances) | set(sup.catalog)
        if req.name is not None:
            name = req.name
            if name in taken:
                raise Conflict(f"the name {name!r} is taken on this agent (a catalog model or another instance)")
        else:
            name = next((n for n in (_default_name(req.model) for _ in range(8)) if n not in taken), None)
            if name is None:
                raise Conflict("no free name found; give one with `name`")
        if req.served_model_names is not None:
            served = list(dict.fromkeys(req.served_model_names))
        else:
            # Its name, and the model id too, so clients may send either (unless another model
            # of this agent already answers to that id).
            served = [name] + ([req.model] if req.model not in taken and req.model != name else [])
        clash = [s for s in served if s in taken and s != name]
        if clash:
            raise Conflict(f"served name(s) {', '.join(clash)} already name another model of this agent")
        params = merged_params(acfg, req.params)
        tp = int(params.get("tensor_parallel_size", len(req.devices) if req.devices else 1))
        devices = req.devices if req.devices is not None else self._pick_devices(tp)
        if len(devices) != tp:
            raise BadRequest(f"tensor_parallel_size is {tp} but devices lists {len(devices)} GPU(s)")
        known = [g.index for g in sup.sample.gpus]
        if known and any(d not in known for d in devices):
            raise BadRequest(f"devices {devices}: this agent has GPU(s) {known}")
        util = None
        mem = req.memory_gib
        if mem is None:
            if "gpu_memory_utilization" in req.params:
                util = req.params["gpu_memory_utilization"]
            elif acfg.memory_gib is not None:
                mem = acfg.memory_gib
            else:
                util = params.get("gpu_memory_utilization")
        dtype = params.get("dtype")
        now = time.time()
        return ModelSpec(
            name=name,
            model=req.model,
            served_model_names=served,
            devices=list(devices),
            tensor_parallel_size=tp,
            gpu_memory_utilization=util,
            memory_gib=mem,
            max_model_len=params.get("max_model_len"),
            max_num_seqs=params.get("max_num_seqs"),
            extra_args=param_args(params),
            idle_timeout=None,  # its lease governs it, not the idle timers
            unload_timeout=None,
            sim=dict(acfg.sim) if sup.cfg.engine == "sim" else {},
            dtype=VLLM_DTYPES[dtype] if isinstance(dtype, str) else None,
            adhoc=AdhocInfo(req.model, params, dict(req.params), req.ttl, now, time.monotonic()),
        )

    def _pick_devices(self, count: int) -> list[int]:
        """The `count` GPUs with the most free memory now (lowest index on ties)."""
        gpus = sorted(self.sup.sample.gpus, key=lambda g: (-g.memory_free_bytes, g.index))
        if not gpus:
            return list(range(count))  # nothing measured (no NVML): let the engine see
        if len(gpus) < count:
            raise BadRequest(f"tensor_parallel_size {count} needs {count} GPUs; this agent has {len(gpus)}")
        return sorted(g.index for g in gpus[:count])

    # ---------------------------------------------------------------- removing

    async def remove(self, name: str, *, reason: str) -> EngineProcess:
        """Stop it (in-flight requests drain first, up to drain_timeout) and forget it. Concurrent
        calls share one removal."""
        inst = self.sup.instances.get(name)
        if inst is None or inst.spec.adhoc is None:
            raise UnknownModel(f"no ad-hoc instance named {name!r} on this agent")
        task = self._removals.get(name)
        if task is None or task.done():
            task = asyncio.ensure_future(self._remove(inst, reason))
            self._removals[name] = task
            task.add_done_callback(lambda t, n=name: self._removals.pop(n, None) if self._removals.get(n) is t else None)
        await asyncio.shield(task)
        return inst

    async def _remove(self, inst: EngineProcess, reason: str) -> None:
        sup = self.sup
        inst.retire()  # no start from here on (mvllm.agent.supervisor checks it)
        sup.catalog.remove(inst.spec)  # new requests for its names now get 404
        log.info("ad-hoc instance %s: removing (%s)", inst.name, reason)
        await sup.unload(inst.name, reason=reason)
        if sup.forget(inst):
            log.info("ad-hoc instance %s: removed", inst.name)

    # ------------------------------------------------------------------ expiry

    async def tick(self) -> None:
        """End the instances whose ttl is over and that nothing uses now; finish removals that failed."""
        now = time.monotonic()
        for inst in list(self.sup.instances.values()):
            info = inst.spec.adhoc
            if info is None or inst.name in self._removals:
                continue
            if not inst.retired:
                deadline = info.deadline()
                if deadline is None or now < deadline:
                    continue
                if inst.in_flight or inst.queued or inst.busy:
                    continue  # postponed: a request is in flight or waits, or an operation is under way
                log.info("ad-hoc instance %s: ttl of %g s is over", inst.name, info.ttl)
            try:
                await self.remove(inst.name, reason="ttl")
            except AgentError as exc:
                log.warning("ad-hoc instance %s: removal failed, tried again later: %s", inst.name, exc.message)

    async def close(self) -> None:
        for task in list(self._removals.values()):
            task.cancel()
        for task in list(self._removals.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
