"""Log files of the router and the agent: their config keys, a size-rotated file written off the
event loop, and the listing and age-based cleanup of log files.

Why a queue: `RotatingFileHandler` writes, flushes and (at the size limit) renames files in the
thread that logs. Behind a `QueueHandler`, a log call on the event loop only appends the record
to an in-memory queue; the stdlib `QueueListener` thread formats, writes and rotates, so a slow
disk or a rotation never stalls a request.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvllm.common.tomlconf import Section

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_BYTES = 20 * 1024**2
DEFAULT_BACKUPS = 5
_DAY = 86400.0
_BACKUP_RE = re.compile(r"\.(\d+)$")


@dataclass(frozen=True)
class LogConfig:
    """`log_level`, `log_file`, `log_max_bytes`, `log_backups`, `log_retention_days`."""

    level: str | None = None  # None: the command line's or the default ("info")
    file: Path | None = None  # None: stderr only
    max_bytes: int = DEFAULT_MAX_BYTES
    backups: int = DEFAULT_BACKUPS
    retention_days: float | None = None  # rotated files older than this are removed; None: kept


def parse_log_keys(sec: Section, base: Path | None) -> LogConfig:
    """The log keys of one config table; a relative `log_file` is relative to `base` (the config's directory)."""
    level = sec.str("log_level", None)
    if level is not None and level.lower() not in LEVELS:
        raise sec.error("log_level", f"expected one of {', '.join(LEVELS)}, got {level!r}")
    raw = sec.str("log_file", None)
    file = None
    if raw:
        file = Path(raw).expanduser()
        if not file.is_absolute() and base is not None:
            file = base / file
    return LogConfig(
        level=level.lower() if level else None,
        file=file,
        max_bytes=sec.int("log_max_bytes", DEFAULT_MAX_BYTES, min=4096) or DEFAULT_MAX_BYTES,
        backups=sec.int("log_backups", DEFAULT_BACKUPS, min=0, max=1000) or 0,
        retention_days=sec.float("log_retention_days", None, min=0.0),
    )


@contextlib.contextmanager
def file_logging(cfg: LogConfig, fmt: str = LOG_FORMAT) -> Iterator[Path | None]:
    """While inside, the root logger also writes to `cfg.file`, rotated at `cfg.max_bytes` with
    `cfg.backups` old files kept (name.1 newest); written by a listener thread (module doc)."""
    if cfg.file is None:
        yield None
        return
    cfg.file.parent.mkdir(parents=True, exist_ok=True)
    target = logging.handlers.RotatingFileHandler(
        cfg.file, maxBytes=cfg.max_bytes, backupCount=cfg.backups, encoding="utf-8"
    )  # opened here, so an unwritable path fails at start, not in the writer thread
    target.setFormatter(logging.Formatter(fmt))
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(q)
    listener = logging.handlers.QueueListener(q, target, respect_handler_level=False)
    listener.start()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield cfg.file
    finally:
        root.removeHandler(handler)
        listener.stop()  # writes what is queued, then ends the thread
        target.close()


def rotated_files(active: Path) -> list[Path]:
    """`active`'s rotated copies (name.1, name.2 ...) that exist, newest first."""
    try:
        entries = list(active.parent.iterdir())
    except OSError:
        return []
    prefix = active.name + "."
    found = [(int(m.group(1)), p) for p in entries if p.name.startswith(prefix) and (m := _BACKUP_RE.search(p.name))
             and p.name[: m.start()] == active.name]  # fmt: skip
    return [p for _, p in sorted(found)]


def file_entries(paths: Iterable[Path], *, active: Iterable[Path] = ()) -> list[dict[str, Any]]:
    """{name, path, bytes, modified, active} of each file that exists (blocking stat: use a thread)."""
    live = {p.resolve() for p in active}
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append({"name": p.name, "path": str(p), "bytes": st.st_size, "modified": st.st_mtime,
                    "active": p.resolve() in live})  # fmt: skip
    return out


def summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"files": len(entries), "bytes": sum(e["bytes"] for e in entries)}


def remove_older_than(paths: Iterable[Path], days: float, now: float | None = None) -> list[dict[str, Any]]:
    """Delete the files of `paths` last modified more than `days` ago; what was removed (blocking)."""
    cutoff = (time.time() if now is None else now) - days * _DAY
    removed = []
    for p in paths:
        try:
            st = p.stat()
            if st.st_mtime < cutoff:
                p.unlink()
                removed.append({"name": p.name, "path": str(p), "bytes": st.st_size, "modified": st.st_mtime})
        except OSError:
            continue  # gone meanwhile, or not ours to delete: the next run tries again
    return removed
