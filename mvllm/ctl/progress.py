"""A model action (load/unload/sleep/wake) through the router, with progress until it settles:
the POST runs while `/admin/nodes` is polled for the instance's state, shown with elapsed time; a
failure ends with the router's message and the engine's log tail."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from mvllm.client import APIConnectionError, AsyncClient, MvllmError
from mvllm.client.fleet import InstanceView, build_fleet

POLL_S = 0.5
LOG_TAIL_LINES = 20
# The state each action ends in, on the instance of the agent that did it.
SETTLED = {"load": ("ready",), "wake": ("ready",), "sleep": ("sleeping",), "unload": ("stopped",)}
_MOVING = ("starting", "stopping")
# After the router answered, how long its view of the agent may take to show the new state.
SETTLE_S = 5.0
# After a failure, how long to wait for the router to show the engine's log tail.
TAIL_WAIT_S = 3.0
_VERB = {"load": "loading", "unload": "unloading", "sleep": "putting to sleep", "wake": "waking"}


@dataclass
class Outcome:
    ok: bool
    message: str
    elapsed: float
    result: Any = None
    log_tail: list[str] = field(default_factory=list)


def find_instance(doc: dict[str, Any], model: str, node: str | None) -> InstanceView | None:
    """The instance of `model` on `node` (any agent if None) in an /admin/nodes document."""
    return build_fleet(doc).find_instance(model, node)


class Progress:
    """One line redrawn in place on a terminal; one line per change otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last = ""

    def show(self, text: str, changed_key: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif changed_key != self._last:
            self.stream.write(text + "\n")
            self.stream.flush()
        self._last = changed_key

    def done(self) -> None:
        if self.tty and self._last:
            self.stream.write("\r\033[K")
            self.stream.flush()


async def run_model_action(
    client: AsyncClient,
    action: str,
    model: str,
    *,
    node: str | None = None,
    level: int | None = None,
    timeout: float = 900.0,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    t0 = clock()
    where = f" on {node}" if node else ""
    call = asyncio.ensure_future(client.model_action(action, model, node=node, level=level, timeout=timeout))
    result: Any = None
    inst: InstanceView | None = None
    answered_at: float | None = None
    try:
        while True:
            if call is not None:
                await asyncio.wait({call}, timeout=POLL_S)
                if call.done():
                    result = call.result()  # MvllmError / APIConnectionError propagate
                    call = None
            else:
                await asyncio.sleep(POLL_S)
            elapsed = clock() - t0
            try:
                inst = (await client.fleet()).find_instance(model, node or _node_of(result))
            except MvllmError:
                inst = None
            if call is None:
                # The router answered. Done when the instance shows the end state (or no instance
                # is visible to check it against); a failed instance is a failure whatever it said.
                # The router reads agents on its scrape cycle, so its view may lag a little.
                answered_at = answered_at or clock()
                if inst is None or inst.state in SETTLED[action]:
                    break
                if inst.state == "failed":
                    return _failed(model, action, inst.error or "the engine failed", clock() - t0, inst.log_tail, result)
                if inst.state not in _MOVING and clock() - answered_at > SETTLE_S:
                    break
            if elapsed > timeout:
                return Outcome(False, f"{action} {model}{where}: not settled after {timeout:.0f}s", elapsed, result)
            if progress is not None:
                state = inst.state_text if inst else "asked"
                on = f" on {inst.node}" if inst else where
                progress.show(f"{_VERB[action]} {model}{on}: {state}  {elapsed:.1f}s", state)
    except APIConnectionError:
        raise
    except MvllmError as exc:
        tail = _log_tail(exc.body) or await _failed_tail(client, model, node or _node_of(exc.body))
        return _failed(model, action, exc.message, clock() - t0, tail, exc.body)
    finally:
        if call is not None:
            call.cancel()
        if progress is not None:
            progress.done()
    elapsed = clock() - t0
    on = f" on {inst.node}" if inst else (f" on {_node_of(result)}" if _node_of(result) else where)
    state = inst.state_text if inst else _state_of(result) or "done"
    return Outcome(True, f"{model}{on}: {state} ({elapsed:.1f}s)", elapsed, result)


async def _failed_tail(client: AsyncClient, model: str, node: str | None) -> list[str]:
    """The log tail of a failed instance, as the router shows it (its view of the agent may lag)."""
    for _ in range(round(TAIL_WAIT_S / POLL_S)):
        try:
            inst = (await client.fleet()).find_instance(model, node)
        except MvllmError:
            return []
        if inst is None or (inst.state != "failed" and inst.state not in _MOVING):
            return []
        if inst.log_tail:
            return inst.log_tail
        await asyncio.sleep(POLL_S)
    return []


def _failed(model: str, action: str, message: str, elapsed: float, tail: list[str], result: Any) -> Outcome:
    return Outcome(False, f"{action} {model} failed after {elapsed:.1f}s: {message}", elapsed, result, tail[-LOG_TAIL_LINES:])


def _node_of(result: Any) -> str | None:
    if isinstance(result, dict):
        for key in ("node", "agent"):
            if isinstance(result.get(key), str):
                return result[key]
    return None


def _state_of(result: Any) -> str | None:
    if isinstance(result, dict):
        inner = result.get("instance") if isinstance(result.get("instance"), dict) else result
        if isinstance(inner.get("state"), str):
            return inner["state"]
    return None


def _log_tail(body: Any) -> list[str]:
    """An engine log tail carried by an error answer (`log_tail` at the top or in `error`)."""
    if not isinstance(body, dict):
        return []
    for holder in (body, body.get("error"), body.get("instance")):
        if isinstance(holder, dict) and isinstance(holder.get("log_tail"), list):
            return [str(x) for x in holder["log_tail"]]
    return []
