"""Keeping per-key usage in the usage file (`[auth] usage_file`): read once at start, written
atomically every few seconds when it changed, at once after an admin action, and at shutdown.
Every read and write runs in the default executor, never on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path

from mvllm.router.access.gate import AuthGate
from mvllm.router.access.usage_file import UsageDoc, UsageFileError, decode_usage, encode_usage

log = logging.getLogger("mvllm.router.usage")

# How often changed usage is written: what a crash (not a clean stop, which saves) may lose.
SAVE_INTERVAL_S = 5.0
# A clean stop waits this long for a write already under way before writing the last state.
_STOP_TIMEOUT_S = 5.0
_tmp_names = itertools.count()


def read_usage_file(path: Path) -> UsageDoc | None:
    """The saved document, None when there is no file yet. Blocking: run it in an executor."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_usage(data)


def write_usage_file(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically: a crash leaves the old file or the new one, never half
    of one. Blocking: run it in an executor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_tmp_names)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The rename itself is durable once the directory is synced (best effort: not every FS allows it).
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_aside(path: Path) -> Path:
    """Keep an unreadable usage file for a human to look at, rather than overwrite it."""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    return aside


class UsageStore:
    """Loads the usage file into the gate at start and saves the gate's usage when it changes."""

    def __init__(self, gate: AuthGate, interval: float = SAVE_INTERVAL_S) -> None:
        self.gate = gate
        self.interval = interval
        self.saved: UsageDoc | None = None  # what the file holds now, as far as we know
        self.saved_path: Path | None = None
        self.saved_at: float | None = None
        self.error: str | None = None  # the last failed read or write, until one succeeds
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def path(self) -> Path | None:
        """The file to use now: None without keys (nothing per key to keep) or with usage_file = false."""
        return None if self.gate.open else self.gate.config.usage_file

    async def load(self) -> None:
        path = self.path
        if path is None:
            return
        loop = asyncio.get_running_loop()
        try:
            doc = await loop.run_in_executor(None, read_usage_file, path)
        except UsageFileError as exc:
            try:
                where = "set aside as " + (await loop.run_in_executor(None, _set_aside, path)).name
            except OSError as move_exc:
                where = f"could not be set aside ({move_exc.strerror or move_exc}) and will be overwritten"
            self.error = f"{path} was unreadable ({exc}); {where}"
            log.error("usage file %s is unreadable (%s): %s; per-key usage starts from zero", path, exc, where)
            return
        except OSError as exc:
            self.error = f"cannot read {path}: {exc.strerror or exc}"
            log.error("cannot read the usage file %s (%s): per-key usage starts from zero", path, exc.strerror or exc)
            return
        if doc is None:
            log.info("usage file %s does not exist yet: it is written once keys are used", path)
            return
        dropped = self.gate.restore(doc)
        for name in dropped:
            log.info("key %s: its saved runtime enable/disable no longer applies (the key changed or is gone)", name)
        kept = [n for n in doc.usage if self.gate.file_key(n) is not None]
        log.info("usage of %d key(s) restored from %s", len(kept), path)
        self.saved, self.saved_path, self.saved_at = doc, path, doc.saved_at

    async def save(self, *, force: bool = False) -> bool:
        """Write the usage if it changed since the last write (or `force`); True when written."""
        path = self.path
        if path is None:
            return False
        doc = self.gate.usage_doc()
        if not force and path == self.saved_path and doc.same_state(self.saved):
            return False
        data = encode_usage(doc)
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_usage_file, path, data)
        except OSError as exc:
            message = f"cannot write {path}: {exc.strerror or exc}"
            if message != self.error:  # once per distinct problem, not every few seconds
                log.error("%s; per-key usage is kept in memory and written again later", message)
            self.error = message
            return False
        if self.error is not None:
            log.info("usage file %s written again", path)
        self.saved, self.saved_path, self.saved_at, self.error = doc, path, doc.saved_at, None
        return True

    def save_soon(self) -> None:
        """Write now rather than at the next tick (after an admin action)."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()
            if self._stopping:
                break
            try:
                await self.save()
            except Exception:  # a bug here must not stop the saving for good
                log.exception("saving per-key usage failed")

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End the loop (letting a write under way finish: two writers must never overlap), then
        write the last state."""
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(task, timeout=_STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("usage file write did not finish within %.0fs", _STOP_TIMEOUT_S)
            return
        except Exception:
            log.exception("the usage saver failed")
        await self.save()
