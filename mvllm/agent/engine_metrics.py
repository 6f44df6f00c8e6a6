"""Engines' Prometheus text: read the load signal, and re-export all of it with an `instance` label.

Several engines export the same families; the text format wants each family once, so families are
merged across engines (HELP/TYPE once, then every engine's samples), each sample labelled with the
catalog name of its engine. Behind a Prometheus server without `honor_labels`, the label shows up
as `exported_instance`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

from mvllm.common.prom import iter_samples

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
LABEL = "instance"


def load_signal(text: str) -> tuple[int, int]:
    """(running, waiting) summed over the engine's label sets (base model and LoRAs alike)."""
    running = waiting = 0.0
    for s in iter_samples(text, (RUNNING, WAITING)):
        if s.name == RUNNING:
            running += s.value
        else:
            waiting += s.value
    return int(running), int(waiting)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def add_label(line: str, label: str) -> str:
    """`name{a="b"} 1` -> `name{instance="x",a="b"} 1`; `name 1` -> `name{instance="x"} 1`."""
    brace = line.find("{")
    space = line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        inner_empty = line[brace + 1 : brace + 2] == "}"
        return line[: brace + 1] + label + ("" if inner_empty else ",") + line[brace + 1 :]
    if space == -1:
        return line
    return line[:space] + "{" + label + "}" + line[space:]


def merge(texts: Mapping[str, str]) -> str:
    """One exposition from several engines' texts keyed by instance name."""
    families: dict[str, dict] = {}  # name -> {"help": line, "type": line, "samples": [lines]}
    for instance, text in texts.items():
        label = f'{LABEL}="{_escape(instance)}"'
        current: str | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                parts = line.split(" ", 3)
                if len(parts) < 3:
                    continue
                current = parts[2]
                fam = families.setdefault(current, {"help": None, "type": None, "samples": []})
                key = "help" if parts[1] == "HELP" else "type"
                if fam[key] is None:
                    fam[key] = line
                continue
            if line.startswith("#"):
                continue
            if current is None:
                # A sample with no TYPE before it: its own untyped family.
                name = line.split("{", 1)[0].split(" ", 1)[0]
                fam = families.setdefault(name, {"help": None, "type": None, "samples": []})
            else:
                fam = families[current]
            fam["samples"].append(add_label(line, label))
    out: list[str] = []
    for fam in families.values():
        if fam["help"]:
            out.append(fam["help"])
        if fam["type"]:
            out.append(fam["type"])
        out.extend(fam["samples"])
    return "\n".join(out) + ("\n" if out else "")


async def fetch(session: aiohttp.ClientSession, url: str, timeout_s: float = 2.0) -> str | None:
    """An engine's /metrics text, or None when it does not answer in time."""
    try:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
        return None
