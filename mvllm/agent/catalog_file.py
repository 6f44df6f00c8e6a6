"""Changes to a `[models.NAME]` table of agent.toml written back to the file: the rest of the document
kept as it was read, the previous file kept as `agent.toml.bak`, the new one put in place atomically.

The file is edited as a tomlkit document, which keeps its comments, order and layout: only the
keys of `[models.NAME]` that change are touched. Blocking file I/O: call through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from mvllm.common.tomlconf import ConfigError, load_toml


@dataclass
class SaveResult:
    saved: bool
    path: str | None
    backup: str | None = None
    reason: str | None = None  # why it was not saved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_changes(table: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`table` with `changes` applied: a value sets its key, None removes it. The budget is one of
    memory_gib or gpu_memory_utilization, so setting one removes the other; new devices carry
    tensor_parallel_size along when the table names it."""
    out = dict(table)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    if changes.get("gpu_memory_utilization") is not None and "memory_gib" not in changes:
        out.pop("memory_gib", None)
    if changes.get("memory_gib") is not None and "gpu_memory_utilization" not in changes:
        out.pop("gpu_memory_utilization", None)
    devices = changes.get("devices")
    if isinstance(devices, list) and "tensor_parallel_size" in out and "tensor_parallel_size" not in changes:
        out["tensor_parallel_size"] = len(devices)
    return out


def updated_document(
    doc: Mapping[str, Any], name: str, changes: Mapping[str, Any], full_table: Mapping[str, Any]
) -> dict[str, Any]:
    """The whole agent.toml document with the changes made to `[models.NAME]`; an entry the file
    lacks (it changed since the agent started) is written whole from `full_table`."""
    out = dict(doc)
    models = dict(out.get("models") or {})
    table = models.get(name)
    models[name] = apply_changes(table, changes) if isinstance(table, Mapping) else dict(full_table)
    out["models"] = models
    return out


def edit_document(text: str, name: str, new_table: Mapping[str, Any]) -> str:
    """`text` (a TOML document) with `[models.NAME]` made equal to `new_table`: changed keys set,
    dropped keys removed, everything else (comments included) left as it was."""
    doc = tomlkit.parse(text)
    models = doc.get("models")
    if models is None:
        models = tomlkit.table(is_super_table=True)
        doc["models"] = models
    table = models.get(name)
    if not isinstance(table, Mapping):
        models[name] = dict(new_table)
        return tomlkit.dumps(doc)
    for key in [k for k in table if k not in new_table]:
        del table[key]
    for key, value in new_table.items():
        old = table.get(key)
        if key not in table or (old.unwrap() if hasattr(old, "unwrap") else old) != value:
            table[key] = value
    return tomlkit.dumps(doc)


def save_model_changes(
    path: Path,
    name: str,
    changes: Mapping[str, Any],
    full_table: Mapping[str, Any],
    validate: Callable[[dict[str, Any]], object],
) -> SaveResult:
    """Write the changes to `[models.NAME]` of `path`. `validate(doc)` (the config loader) must
    accept the new document, else nothing is written. Never raises for I/O: the result says."""
    try:
        doc = load_toml(path)
    except ConfigError as exc:
        return SaveResult(False, str(path), reason=f"not saved: {exc}")
    new_doc = updated_document(doc, name, changes, full_table)
    try:
        validate(new_doc)
    except ConfigError as exc:
        return SaveResult(False, str(path), reason=f"not saved: the file would not load again: {exc}")
    try:
        text = edit_document(path.read_text(encoding="utf-8"), name, new_doc["models"][name])
    except (OSError, TOMLKitError, UnicodeDecodeError) as exc:
        return SaveResult(False, str(path), reason=f"not saved: {path} could not be read again: {exc}")
    backup = path.with_name(path.name + ".bak")
    tmp: str | None = None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not mode & 0o222 or not os.access(path, os.W_OK):
            # Read-only by its mode too (root passes os.access): the operator means it, and the
            # rename below would replace it all the same.
            raise PermissionError(errno.EACCES, "file not writable")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        shutil.copy2(path, backup)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the new one, never half
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            why = f"{path} is read-only ({exc.strerror}): the change holds until the agent restarts"
        else:
            why = f"{path} could not be written ({exc.strerror or exc}): the change holds until the agent restarts"
        return SaveResult(False, str(path), reason=why)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return SaveResult(True, str(path), backup=str(backup))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
