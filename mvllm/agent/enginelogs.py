"""The engines' logs in log_dir (NAME.log, rotated to NAME.log.1 ...): size cap, reads with a cursor
for `mvllm logs -f`, stats and the cleanup of old files; plus the agent's routes and loop for them.

Why the engine writes its own file and the agent copies-and-truncates it (rather than piping the
engine's output through the agent): the engine never blocks on the agent (a pipe read too slowly
would stall the engine's logging, and with it its event loop), and its log survives an agent
restart (a stale engine keeps logging). Every `log_check_interval` the agent looks at the sizes;
a file above `engine_log_max_bytes` is copied to NAME.log.1 (older copies shifted, at most
`engine_log_backups` kept) and truncated, in a worker thread. The engine opened the file with
O_APPEND, so its next write lands at the new end. Output written between the last copied byte
and the truncate (microseconds) can be lost, as with logrotate's copytruncate, and a file can
overshoot the cap by what the engine writes in one interval.

A read cursor is "GEN:OFFSET": GEN counts this agent's rotations of the file, so a reader that fell
one rotation behind reads the rest of NAME.log.1 first, then NAME.log from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from mvllm.agent.errors import BadRequest
from mvllm.common.errors import error_response
from mvllm.common.logfiles import LogConfig, file_entries, remove_older_than, rotated_files, summary
from mvllm.common.tasks import background_task

log = logging.getLogger("mvllm.agent.logs")

READ_LIMIT = 1024 * 1024  # bytes per read: a follower catches up over several polls
_COPY_CHUNK = 1024 * 1024
_CLEANUP_EVERY_S = 3600.0
_ROTATED_RE = re.compile(r"^(?P<name>.+)\.log\.(?P<n>\d+)$")


@dataclass
class LogChunk:
    text: str
    cursor: str
    more: bool = False  # more is there already: read again at once
    skipped: bool = False  # the reader fell more than one rotation behind: what it missed is gone


class EngineLogs:
    """Blocking file work on log_dir (call it through asyncio.to_thread); one lock keeps a read from
    seeing a rotation half done."""

    def __init__(self, log_dir: Path, max_bytes: int, backups: int, own: LogConfig | None = None) -> None:
        self.log_dir = log_dir
        self.max_bytes = max_bytes
        self.backups = backups
        self.own = own or LogConfig()
        self.generation: dict[str, int] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    # -- size cap ----------------------------------------------------------------------------------

    def rotate_if_big(self, name: str) -> bool:
        path = self.path(name)
        try:
            if path.stat().st_size <= self.max_bytes:
                return False
        except OSError:
            return False
        with self._lock:
            self._rotate(path)
            self.generation[name] = self.generation.get(name, 0) + 1
        return True

    def _rotate(self, path: Path) -> None:
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
            tmp = path.with_name(f"{path.name}.1.tmp")
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
                # Catch up with what the engine wrote during the copy, then truncate right away.
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
                os.truncate(path, 0)
            os.replace(tmp, path.with_name(f"{path.name}.1"))
        else:
            os.truncate(path, 0)
        for extra in rotated_files(path)[self.backups :]:
            with contextlib.suppress(OSError):
                extra.unlink()

    def check(self, names: Iterable[str]) -> list[str]:
        """Rotate every log of `names` above the cap; the names rotated."""
        return [n for n in names if self.rotate_if_big(n)]

    # -- reads ---------------------------------------------------------------------------------------

    def tail(self, name: str, lines: int) -> LogChunk:
        """The last `lines` lines, and the cursor of the end they reach."""
        path = self.path(name)
        with self._lock:
            gen = self.generation.get(name, 0)
            try:
                with open(path, "rb") as f:
                    end = f.seek(0, os.SEEK_END)
                    start = max(0, end - max(4096, lines * 400))
                    f.seek(start)
                    data = f.read(end - start)
            except OSError:
                return LogChunk("", f"{gen}:0")
        text = data.decode(errors="replace")
        picked = text.splitlines()[-lines:] if lines > 0 else []
        return LogChunk("\n".join(picked) + ("\n" if picked else ""), f"{gen}:{end}")

    def read(self, name: str, cursor: str, limit: int = READ_LIMIT) -> LogChunk:
        """What was written after `cursor` (at most `limit` bytes, cut after a full line when it can)."""
        gen, offset = parse_cursor(cursor)
        path = self.path(name)
        with self._lock:
            now = self.generation.get(name, 0)
            older = b""
            skipped = False
            if gen == now - 1:  # one rotation behind: the rest is in NAME.log.1
                older = _read_range(path.with_name(f"{path.name}.1"), offset, limit)
                if len(older) >= limit:  # still inside the rotated copy
                    older = _whole_lines(older)
                    return LogChunk(older.decode(errors="replace"), f"{gen}:{offset + len(older)}", more=True)
                offset = 0
            elif gen != now:  # several rotations behind (or another agent's cursor)
                skipped, offset = True, 0
            room = limit - len(older)
            current = _read_range(path, offset, room)
            if offset > 0 and not current and _size(path) < offset:
                offset = 0  # truncated by someone else: start over
                current = _read_range(path, 0, room)
            more = len(current) >= room
            current = _whole_lines(current)
            text = (older + current).decode(errors="replace")
            return LogChunk(text, f"{now}:{offset + len(current)}", more, skipped)

    # -- stats and cleanup -----------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """Engine logs (NAME.log, NAME.log.N) in log_dir, and the agent's own log files."""
        out: list[Path] = []
        with contextlib.suppress(OSError):
            out = sorted(p for p in self.log_dir.iterdir() if p.is_file() and (p.suffix == ".log" or _ROTATED_RE.match(p.name)))
        if self.own.file is not None:
            own = [self.own.file, *rotated_files(self.own.file)]
            out = [p for p in out if p not in own] + own
        return out

    def stats(self, names: Iterable[str]) -> dict[str, Any]:
        active = [self.path(n) for n in names]
        if self.own.file is not None:
            active.append(self.own.file)
        entries = file_entries(self.files(), active=active)
        own = {str(p) for p in ([self.own.file, *rotated_files(self.own.file)] if self.own.file else [])}
        for e in entries:
            e["kind"] = "agent" if e["path"] in own else "engine"
        return {
            "log_dir": str(self.log_dir),
            "engine_log_max_bytes": self.max_bytes,
            "engine_log_backups": self.backups,
            "agent_log_file": str(self.own.file) if self.own.file else None,
            "retention_days": self.own.retention_days,
            "total": summary(entries),
            "files": entries,
        }

    def cleanup(self, names: Iterable[str], days: float) -> list[dict[str, Any]]:
        """Remove log files last written more than `days` ago: rotated copies, and logs of models
        no longer in the catalog. The live log of a catalog model and the agent's own are kept."""
        keep = {self.path(n) for n in names}
        if self.own.file is not None:
            keep.add(self.own.file)
        with self._lock:
            return remove_older_than([p for p in self.files() if p not in keep], days)


def parse_cursor(cursor: str) -> tuple[int, int]:
    gen, sep, offset = cursor.partition(":")
    try:
        g, o = int(gen), int(offset)
    except ValueError:
        g = o = -1
    if not sep or g < 0 or o < 0:
        raise BadRequest(f"cursor must be GEN:OFFSET as a previous answer's X-Log-Cursor gave it, got {cursor!r}")
    return g, o


def _whole_lines(data: bytes) -> bytes:
    """`data` up to its last newline: a line being written comes whole with the next read (a chunk
    without any newline is returned as it is, so an endless line still moves on)."""
    if data and not data.endswith(b"\n") and b"\n" in data:
        return data[: data.rindex(b"\n") + 1]
    return data


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_range(path: Path, offset: int, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except OSError:
        return b""


# ----------------------------------------------------------------------------- the agent's routes


ENGINE_LOGS = web.AppKey("mvllm_agent_engine_logs", EngineLogs)


def _days(request: web.Request, default: float | None) -> float:
    raw = request.query.get("days")
    if raw is None:
        if default is None:
            raise BadRequest("no log_retention_days is configured: give ?days=N")
        return default
    try:
        days = float(raw)
    except ValueError:
        days = -1.0
    if days < 0:
        raise BadRequest(f"days must be a number >= 0, got {raw!r}")
    return days


async def model_logs(request: web.Request, name: str) -> web.Response:
    """GET /models/NAME/logs?tail=N | ?cursor=GEN:OFFSET: text, with X-Log-Cursor for the next read."""
    logs = request.app[ENGINE_LOGS]
    cursor = request.query.get("cursor")
    if cursor:
        chunk = await asyncio.to_thread(logs.read, name, cursor)
    else:
        try:
            tail = int(request.query.get("tail", "100"))
        except ValueError:
            raise BadRequest("tail must be an integer") from None
        chunk = await asyncio.to_thread(logs.tail, name, max(0, min(tail, 10000)))
    headers = {"X-Log-Cursor": chunk.cursor, "X-Log-More": "1" if chunk.more else "0"}
    if chunk.skipped:
        headers["X-Log-Skipped"] = "1"
    return web.Response(text=chunk.text, content_type="text/plain", headers=headers)


def register_log_routes(
    app: web.Application, logs: EngineLogs, names: Callable[[web.Application], Iterable[str]], interval: float
) -> None:
    """GET /logs/stats, POST /logs/cleanup[?days=N], and the loop that caps engine logs and, with
    log_retention_days, removes old files once an hour. `names` gives the catalog names now."""
    app[ENGINE_LOGS] = logs

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(logs.stats, list(names(request.app))))

    async def cleanup(request: web.Request) -> web.Response:
        try:
            days = _days(request, logs.own.retention_days)
        except BadRequest as exc:
            return error_response(exc.status, exc.message, code="invalid_parameter")
        removed = await asyncio.to_thread(logs.cleanup, list(names(request.app)), days)
        if removed:
            log.info("log cleanup (older than %g days): removed %d file(s)", days, len(removed))
        return web.json_response({"days": days, "removed": removed, "freed_bytes": sum(r["bytes"] for r in removed)})

    async def loop_ctx(app: web.Application) -> AsyncIterator[None]:
        async with background_task(_loop(app, logs, names, interval), name="mvllm-engine-logs"):
            yield

    app.router.add_get("/logs/stats", stats)
    app.router.add_post("/logs/cleanup", cleanup)
    app.cleanup_ctx.append(loop_ctx)


async def _loop(
    app: web.Application, logs: EngineLogs, names: Callable[[web.Application], Iterable[str]], interval: float
) -> None:
    last_cleanup: float | None = None  # at start, then hourly
    while True:
        try:
            current = list(names(app))
            for name in await asyncio.to_thread(logs.check, current):
                log.info("%s: engine log over %d bytes: rotated to %s.log.1", name, logs.max_bytes, name)
            days = logs.own.retention_days
            if days is not None and (last_cleanup is None or time.monotonic() - last_cleanup >= _CLEANUP_EVERY_S):
                last_cleanup = time.monotonic()
                removed = await asyncio.to_thread(logs.cleanup, current, days)
                if removed:
                    log.info("log cleanup (older than %g days): removed %d file(s)", days, len(removed))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("engine log check failed")
        await asyncio.sleep(interval)
