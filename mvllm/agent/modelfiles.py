"""A model's config.json on this host, for the memory estimate: in a local model directory, or in
the Hugging Face cache the engine would use. Never downloads anything (blocking file reads of a
few KiB: called while the config is loaded, before the event loop runs)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from mvllm.agent.estimate import ModelShape, shape_from_config


def hub_cache_dirs(env: Mapping[str, str]) -> list[Path]:
    """The hub cache directories, in the order huggingface_hub looks: HF_HUB_CACHE, HF_HOME/hub,
    XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub; then the legacy TRANSFORMERS_CACHE."""
    out: list[Path] = []
    if env.get("HF_HUB_CACHE"):
        out.append(Path(env["HF_HUB_CACHE"]).expanduser())
    if env.get("HF_HOME"):
        out.append(Path(env["HF_HOME"]).expanduser() / "hub")
    elif env.get("XDG_CACHE_HOME"):
        out.append(Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub")
    else:
        out.append(Path(env.get("HOME") or "~").expanduser() / ".cache" / "huggingface" / "hub")
    if env.get("TRANSFORMERS_CACHE"):
        out.append(Path(env["TRANSFORMERS_CACHE"]).expanduser())
    return out


def _snapshot_config(repo_dir: Path) -> Path | None:
    """snapshots/<refs/main>/config.json, else the newest snapshot that has one."""
    ref = repo_dir / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        commit = ""
    if commit:
        cand = repo_dir / "snapshots" / commit / "config.json"
        if cand.is_file():
            return cand
    snaps = sorted(
        (p for p in (repo_dir / "snapshots").glob("*/config.json") if p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    return snaps[0] if snaps else None


def find_config_json(model: str, env: Mapping[str, str], base: Path | None = None) -> tuple[Path | None, str]:
    """(path of config.json, or None) and where it was looked for, in words."""
    local = Path(model).expanduser()
    if not local.is_absolute() and base is not None and (base / local).is_dir():
        local = base / local
    if local.is_dir():
        cand = local / "config.json"
        return (cand, str(cand)) if cand.is_file() else (None, f"no config.json in {local}")
    looked = []
    repo = "models--" + model.strip("/").replace("/", "--")
    for cache in hub_cache_dirs(env):
        looked.append(str(cache))
        found = _snapshot_config(cache / repo)
        if found is not None:
            return found, str(found)
    return None, f"{model} not in the HF cache ({', '.join(looked)})"


def read_shape(model: str, env: Mapping[str, str], base: Path | None = None) -> tuple[ModelShape | None, str]:
    """The model's shape and the file it came from, or None and why not."""
    path, where = find_config_json(model, env, base)
    if path is None:
        return None, where
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return shape_from_config(doc), where
    except (OSError, ValueError) as exc:
        return None, f"{where}: {exc}"
