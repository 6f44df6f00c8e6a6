"""A catalog model's LoRA adapter directory (`lora_dir`): each subdirectory holding an
`adapter_config.json` is an adapter of that name, loadable on demand (vLLM's filesystem resolver).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# An adapter's name is its directory's: one path segment, never hidden, never a flag.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ADAPTER_CONFIG = "adapter_config.json"


def adapter_path(lora_dir: Path, name: str) -> str | None:
    """The path of adapter `name` in `lora_dir`, or None when there is no such adapter there."""
    if not _NAME_RE.match(name):
        return None
    path = lora_dir / name
    return str(path) if (path / ADAPTER_CONFIG).is_file() else None


def adapters(lora_dir: Path) -> dict[str, str]:
    """Every adapter in `lora_dir` (name -> path), sorted by name; {} when it cannot be read."""
    try:
        names = sorted(e.name for e in os.scandir(lora_dir) if e.is_dir() and _NAME_RE.match(e.name))
    except OSError:
        return {}
    return {n: str(lora_dir / n) for n in names if (lora_dir / n / ADAPTER_CONFIG).is_file()}
