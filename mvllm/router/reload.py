"""Hot reload of servers.toml (and of the keys file it names): watch the files with watchfiles and
apply a valid new version in place.

An invalid file is rejected whole: the error is logged, the old config (keys included) stays, and
the next save is tried again. The directories are watched (not the files) so that editors that save
by writing a new file and renaming it over the old one are seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from watchfiles import Change, awatch

from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import load_config
from mvllm.router.state import ReloadStatus, RouterState

log = logging.getLogger("mvllm.router.reload")


async def reload_config(state: RouterState, path: Path) -> bool:
    """Read `path` and apply it; False (and the old config kept) when it is invalid."""
    try:
        config = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        log.error("config reload rejected, keeping the previous config: %s", exc)
        state.metrics.reloads.labels("rejected").inc()
        state.last_reload = ReloadStatus(time.time(), False, str(exc))
        return False
    diff = state.apply_config(config)
    state.metrics.reloads.labels("applied").inc()
    summary = f"{len(diff.added)} added, {len(diff.removed)} removed, {len(diff.changed)} changed"
    state.last_reload = ReloadStatus(time.time(), True, summary)
    if diff:
        log.info("config reloaded from %s: %s; %d node(s) now", path, summary, len(state.registry.nodes()))
    else:
        log.info("config reloaded from %s: no node changed", path)
    return True


class ConfigWatcher:
    def __init__(self, state: RouterState, path: Path) -> None:
        self.state = state
        self.path = path.resolve()
        self._stop = asyncio.Event()

    def _targets(self) -> frozenset[Path]:
        """servers.toml and the keys file its current config names ([auth] keys_file)."""
        keys_file = self.state.config.auth.keys_file
        return frozenset({self.path} if keys_file is None else {self.path, keys_file.resolve()})

    async def run(self) -> None:
        log.info("watching %s for changes", self.path)
        try:
            # A reload that names another keys file changes what is watched: start over with it.
            while not self._stop.is_set() and await self._watch(self._targets()):
                pass
        except Exception:
            log.exception("watching %s failed: edits are not applied until the router restarts", self.path)

    async def _watch(self, targets: frozenset[Path]) -> bool:
        """Reload on each change of `targets`; True when a reload changed the files to watch."""
        wanted = {(str(t.parent), t.name) for t in targets}
        for t in sorted(targets - {self.path}):
            log.info("watching keys file %s for changes", t)

        def ours(change: Change, path: str) -> bool:
            p = Path(path)
            return (str(p.parent), p.name) in wanted

        dirs = sorted({t.parent for t in targets})
        async with contextlib.aclosing(
            awatch(*dirs, watch_filter=ours, stop_event=self._stop, recursive=False, step=50)
        ) as changes:
            async for _ in changes:
                missing = [t for t in targets if not t.exists()]
                if missing:
                    # Mid-save (deleted before the new file lands) or removed on purpose: keep what we have.
                    log.warning("%s disappeared; keeping the current config", missing[0])
                    continue
                await reload_config(self.state, self.path)
                if self._targets() != targets:
                    return True
        return False

    async def stop(self, task: asyncio.Task[None]) -> None:
        # The watch thread checks this event every step; setting it first lets the task end at once
        # (cancelling alone would wait for the thread's own timeout).
        self._stop.set()
        try:
            await asyncio.wait_for(task, timeout=5)  # cancels the task if it does not end in time
        except asyncio.TimeoutError:
            log.warning("config watcher did not stop within 5s")
