"""`POST /models/NAME/assign`: change a catalog entry's devices, memory budget, max length or extra args
at run time, checked as the config loader checks agent.toml, and saved to agent.toml.

The new entry takes effect at once when no engine runs for it, else at its next start; with
`restart` a running engine is drained (in-flight requests finish, up to drain_timeout), stopped
and started again with it. The supervisor swaps `EngineProcess.pending_spec` in when it starts it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mvllm.agent import report
from mvllm.agent.catalog_file import SaveResult, apply_changes, save_model_changes
from mvllm.agent.config import ModelSpec, model_from_table, parse_config
from mvllm.agent.errors import AgentError, BadRequest, Conflict, LoadFailed
from mvllm.agent.supervisor import Supervisor
from mvllm.common.tomlconf import ConfigError

log = logging.getLogger("mvllm.agent.assign")

ASSIGNABLE = ("devices", "gpu_memory_utilization", "memory_gib", "max_model_len", "max_num_seqs", "extra_args")

APPLIED_NOW = "now"  # no engine ran: the entry is changed
APPLIED_NEXT_START = "next_start"  # an engine runs with the old entry until it stops
APPLIED_RESTARTED = "restarted"  # the engine was restarted with the new entry


def parse_body(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(changes, restart) of an assign request; unknown fields are refused by name."""
    unknown = sorted(set(body) - {*ASSIGNABLE, "restart"})
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; assign takes {', '.join(ASSIGNABLE)} and restart")
    restart = body.get("restart", False)
    if not isinstance(restart, bool):
        raise BadRequest("`restart` must be true or false")
    changes = {k: body[k] for k in ASSIGNABLE if k in body}
    devices = changes.get("devices")
    if isinstance(devices, str):  # "0,1" as the CLI and vllama write it
        try:
            changes["devices"] = [int(d) for d in devices.split(",") if d.strip()]
        except ValueError:
            raise BadRequest(f"`devices` must be GPU indices like [0, 1] or \"0,1\", got {devices!r}") from None
    elif isinstance(devices, int) and not isinstance(devices, bool):
        changes["devices"] = [devices]
    if "devices" in changes and changes["devices"] is None:
        raise BadRequest("`devices` cannot be removed, only changed")
    if not changes and not restart:
        raise BadRequest(f"nothing to change: give one of {', '.join(ASSIGNABLE)}")
    return changes, restart


def spec_table(spec: ModelSpec) -> dict[str, Any]:
    """A `[models.NAME]` table that the loader reads back into `spec` (every default written out)."""
    t: dict[str, Any] = {
        "model": spec.model,
        "served_model_name": list(spec.served_model_names),
        "devices": list(spec.devices),
        "tensor_parallel_size": spec.tensor_parallel_size,
        "idle_timeout": spec.idle_timeout or 0,
        "sleep_level_on_idle": spec.sleep_level_on_idle,
        "unload_timeout": spec.unload_timeout or 0,
        "sleep_on_unload": spec.sleep_on_unload,
        "stop_idle_timeout": spec.stop_idle_timeout or 0,
        "pinned": spec.pinned,
        "preload": spec.preload,
        "max_loras": spec.max_loras,
        "max_lora_rank": spec.max_lora_rank,
    }
    optional = {
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "memory_gib": spec.memory_gib,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "param_count": spec.param_count,
        "dtype": spec.dtype,
    }
    t.update({k: v for k, v in optional.items() if v is not None})
    if spec.extra_args:
        t["extra_args"] = list(spec.extra_args)
    if spec.env:
        t["env"] = dict(spec.env)
    if spec.lora_adapters:
        t["lora_adapters"] = dict(spec.lora_adapters)
    if spec.lora_dir is not None:
        t["lora_dir"] = str(spec.lora_dir)
    if spec.sim:
        t["sim"] = dict(spec.sim)
    return t


class Assigner:
    """Applies assignments one at a time (each may rewrite agent.toml)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._lock = asyncio.Lock()

    async def assign(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._lock:
            return await self._assign(name, body)

    async def _assign(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        sup = self.sup
        cfg = sup.cfg
        inst = sup.get(name)
        if inst.spec.adhoc is not None:
            raise Conflict(f"{name} is an ad-hoc instance: assign changes catalog models; start a new instance instead")
        changes, restart = parse_body(body)
        base = inst.pending_spec or inst.spec  # a second assignment builds on a pending one
        try:
            new = model_from_table(cfg, name, apply_changes(spec_table(base), changes), sup.catalog.specs())
        except ConfigError as exc:
            raise BadRequest(f"invalid assignment: {exc.key or 'models.' + name}: {exc.problem}") from None
        new.shape, new.shape_source = base.shape, base.shape_source  # same model, same config.json
        if cfg.path is not None:
            saved = await asyncio.to_thread(
                save_model_changes, cfg.path, name, changes, spec_table(new), lambda doc: parse_config(doc, cfg.path)
            )
        else:
            saved = SaveResult(False, None, reason="the agent runs without a config file: the change holds until it restarts")
        if not saved.saved:
            log.warning("%s: assignment not saved: %s", name, saved.reason)
        sup.catalog.replace(new)
        running = not inst.assign(new)
        applied = APPLIED_NEXT_START if running else APPLIED_NOW
        log.info("%s: assigned %s (%s%s)", name, changes, applied, "; saved" if saved.saved else "; not saved")
        if running and restart:
            restart_error = None
            try:
                await sup.unload(name, reason="assign")
                await asyncio.wait_for(sup.load(name), cfg.load_timeout)
                applied = APPLIED_RESTARTED
            except AgentError as exc:
                restart_error = exc.message
            except asyncio.TimeoutError:
                restart_error = f"not ready within load_timeout ({cfg.load_timeout:g} s); see GET /state"
            if restart_error:
                log.error("%s: restart after assignment failed: %s", name, restart_error)
                kept = "saved to " + str(saved.path) if saved.saved else "not saved"
                raise LoadFailed(f"{name}: assignment made ({kept}), but the engine did not come back: {restart_error}")
        return {
            "name": name,
            "changes": changes,
            "applied": applied,
            "saved": saved.to_dict(),
            "catalog": report.catalog_entry(sup, inst).to_dict(),
            "pending": spec_table(inst.pending_spec) if inst.pending_spec is not None else None,
            "instance": report.instance_state(sup, inst).to_dict(),
        }
