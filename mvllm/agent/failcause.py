"""Pure: the one line that says why an engine failed to start, from its log since the start, with a
hint of what to change (the whole log stays a `mvllm logs` away)."""

from __future__ import annotations

import re

# The agent writes this header into the engine log at each start (mvllm.agent.process).
START_HEADER = "=== mvllm agent "
_MAX_CHARS = 300
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last such line of a failed start is the cause: a Python exception's last line
# ("ValueError: ...", "torch.OutOfMemoryError: ..."), an argparse refusal ("...: error: ..."),
# or a line logged at ERROR.
_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b: |: error: |^ERROR\b")
# vLLM's process prefix ("(EngineCore_DP0 pid=123) "), and its closing lines that only point back.
_PREFIX = re.compile(r"^\([^)]*pid=\d+\)\s*")
_POINTERS = ("See root cause above", "Failed core proc")
_MEMORY = re.compile(r"memory|cache blocks|max seq len|out of memory|OutOfMemory", re.IGNORECASE)


def since_start(tail: list[str]) -> list[str]:
    """The lines of `tail` after the last start header (all of them when none is there)."""
    for i in range(len(tail) - 1, -1, -1):
        if tail[i].lstrip().startswith(START_HEADER):
            return tail[i + 1 :]
    return tail


def cause_line(tail: list[str]) -> str | None:
    """The last error line of the start in `tail`, cleaned and cut to one short line."""
    for raw in reversed(since_start(tail)):
        line = _PREFIX.sub("", _ANSI.sub("", raw).strip())
        if line and _ERROR_LINE.search(line) and not any(p in line for p in _POINTERS):
            return line if len(line) <= _MAX_CHARS else line[: _MAX_CHARS - 1] + "…"
    return None


def hint(cause: str | None) -> str | None:
    """What to change for a cause of a known kind."""
    if cause and _MEMORY.search(cause):
        return "give the model more memory (memory_gib or gpu_memory_utilization in its catalog entry) or a smaller max_model_len"
    return None


def failure_text(code: int | None, tail: list[str], model: str) -> str:
    """'engine exited with code 1: CAUSE (hint: ...; `mvllm logs MODEL` for the log)', one line."""
    cause = cause_line(tail)
    text = f"engine exited with code {code}" + (f": {cause}" if cause else "")
    tips = [t for t in (hint(cause), f"`mvllm logs {model}` shows the engine log") if t]
    return f"{text} ({'; '.join(tips)})"
