"""Linux process facts read from /proc: sessions of engines, launch markers, stale engines of dead agents."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from mvllm.agent.launch import MARKER_AGENT, MARKER_ENGINE

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start_ticks: int
    state: str
    cmdline: str


def read_stat(pid: int) -> ProcInfo | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rpar = raw.rfind(")")
    rest = raw[rpar + 2 :].split()
    try:
        cmd = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        start_ticks=int(rest[19]),
        state=rest[0],
        cmdline=cmd or raw[raw.find("(") + 1 : rpar],
    )


def all_pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    info = read_stat(pid)
    return info is not None and info.state != "Z"


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (an engine and everything it forked, unless they setsid'd)."""
    out = []
    for pid in all_pids():
        info = read_stat(pid)
        if info is not None and info.sid == sid and info.state != "Z":
            out.append(pid)
    return out


def read_environ(pid: int) -> dict[str, str]:
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def agent_id(pid: int | None = None) -> str:
    """`pid:start_ticks` of an agent process: unique even when pids are reused."""
    pid = pid or os.getpid()
    info = read_stat(pid)
    return f"{pid}:{info.start_ticks if info else 0}"


def _agent_alive(agent: str) -> bool:
    pid_s, _, ticks = agent.partition(":")
    if not pid_s.isdigit():
        return False
    info = read_stat(int(pid_s))
    return info is not None and info.state != "Z" and str(info.start_ticks) == ticks


@dataclass(frozen=True)
class Stale:
    pid: int
    cmdline: str
    instance: str | None
    group: int | None  # its engine's process group, only for processes carrying our marker


def find_stale(my_id: str) -> list[Stale]:
    """Engine processes no live agent owns: our launch marker naming a dead agent, or orphaned `VLLM::`.

    A `VLLM::` process (vLLM's EngineCore/worker) without our marker counts only when orphaned
    (parent is init or gone): one whose parent lives belongs to someone's running server.
    """
    out = []
    me = os.getpid()
    for pid in all_pids():
        if pid == me:
            continue
        info = read_stat(pid)
        if info is None or info.state == "Z":
            continue
        env = read_environ(pid)
        owner = env.get(MARKER_AGENT)
        if owner is not None:
            if owner != my_id and not _agent_alive(owner):
                group = info.pgid if info.pgid == info.sid else None
                out.append(Stale(pid, info.cmdline[:200], env.get(MARKER_ENGINE), group))
        elif info.cmdline.startswith("VLLM::") and (info.ppid == 1 or not alive(info.ppid)):
            # Not started by us: its group may be someone's login session, so only the process itself.
            out.append(Stale(pid, info.cmdline[:200], None, None))
    return out


def kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def reap(stale: list[Stale], grace_s: float = 5.0) -> None:
    """SIGTERM each stale process group (and process), then SIGKILL what is left after `grace_s`."""
    groups = {s.group for s in stale if s.group is not None}
    for g in groups:
        kill_group(g, signal.SIGTERM)
    for s in stale:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(s.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(s.pid) for s in stale):
        time.sleep(0.1)
    for g in groups:
        kill_group(g, signal.SIGKILL)
    for s in stale:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(s.pid, signal.SIGKILL)
