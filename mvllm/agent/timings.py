"""What the agent measured of each model's loads (last cold start, last wake from each level), in
memory and, with a state_dir, in `STATE_DIR/timings.json` so an agent restart keeps them.

The file is read once at start and written after each new measure (a whole new file renamed over
the old one, in a thread): a crash mid-write leaves the previous file, and a file that cannot be
read is logged and ignored (timings are a prediction aid, never a reason not to start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from mvllm.common.state import LoadTimings

log = logging.getLogger("mvllm.agent")

TIMINGS_FILE = "timings.json"
_VERSION = 1


class TimingStore:
    """Per model name: its `LoadTimings`; persisted under `state_dir` when one is given."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.path = state_dir / TIMINGS_FILE if state_dir is not None else None
        self.models: dict[str, LoadTimings] = {}
        self._write_lock = asyncio.Lock()

    def get(self, name: str) -> LoadTimings:
        return self.models.setdefault(name, LoadTimings())

    def load(self) -> None:
        """Read the file if there is one (blocking; at agent start)."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            models = data.get("models") if isinstance(data, dict) else None
            if not isinstance(models, dict):
                raise ValueError("no 'models' table")
            self.models = {str(k): LoadTimings.from_dict(v) for k, v in models.items() if isinstance(v, dict)}
            log.info("load timings of %d model(s) read from %s", len(self.models), self.path)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)

    def _write(self, text: str) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    async def save(self) -> None:
        """Write every model's timings (in a thread); a failure is logged, never raised."""
        if self.path is None:
            return
        text = json.dumps({"version": _VERSION, "models": {k: v.to_dict() for k, v in self.models.items()}}, indent=1)
        async with self._write_lock:
            try:
                await asyncio.to_thread(self._write, text)
            except OSError as exc:
                log.warning("could not write %s: %s", self.path, exc)
