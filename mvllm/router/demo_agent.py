"""The demo's node agent: the agent.toml of an `mvllm agent` with simulated engines on two simulated
GPUs and a catalog that does not all fit, with short idle timers, so that loading on first request,
sleeping when idle and eviction show within a minute; and the banner lines that try it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import tomli_w

AGENT_NAME = "sim-agent"
GPU_GIB = 24
IDLE_S = 30  # idle this long: asleep
UNLOAD_S = 90  # idle this long, asleep included: stopped


@dataclass(frozen=True)
class DemoModel:
    name: str
    model: str  # what the simulated engine says it serves
    device: int
    memory_gib: float
    sleep_level: int
    startup_s: float


# GPU 0 holds one of the first two at a time (14 + 14 > 24 - 1): loading the other evicts it.
MODELS = (
    DemoModel("qwen-7b", "Qwen/Qwen2.5-7B-Instruct", 0, 14, 1, 2.0),
    DemoModel("llama-8b", "meta-llama/Llama-3.1-8B-Instruct", 0, 14, 2, 3.0),
    DemoModel("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", 1, 10, 1, 2.0),
)


def agent_toml(port: int, log_dir: Path) -> str:
    base = random.randrange(20000, 32000, 50)  # below the ephemeral ports that free ports come from
    doc = {
        "host": "127.0.0.1",
        "port": port,  # loopback and no token: the demo's router is its only client
        "engine": "sim",
        "engine_port_range": [base, base + 40],
        "log_dir": str(log_dir),
        "poll_interval": 0.5,
        "stop_timeout": 3,
        "restart_max": 1,
        "idle_timeout": IDLE_S,
        "unload_timeout": UNLOAD_S,
        "sim_gpus": [{"memory_gib": GPU_GIB, "name": f"sim-{GPU_GIB}g"} for _ in range(2)],
        "models": {
            m.name: {
                "model": m.model,
                "devices": [m.device],
                "memory_gib": m.memory_gib,
                "sleep_level_on_idle": m.sleep_level,
                "sim": {"startup_s": m.startup_s, "ttft_ms": 50, "itl_ms": 20},
            }
            for m in MODELS
        },
    }
    return tomli_w.dumps(doc)


def banner_lines(agent_url: str, router_url: str) -> list[str]:
    """What the agent offers and the commands that show it (`--router` only off the default URL)."""
    router = "" if router_url == "http://127.0.0.1:8888" else f" --router {router_url}"
    first, other, _ = MODELS
    lines = [
        f"A node agent too, {AGENT_NAME} ({agent_url}), on 2 simulated {GPU_GIB} GiB GPUs; its models load on",
        f"first request, sleep after {IDLE_S}s idle, stop after {UNLOAD_S}s, and make way for each other:",
    ]
    for m in MODELS:
        lines.append(f"  {m.name:<11} GPU {m.device}, {m.memory_gib:g} GiB, sleeps at level {m.sleep_level}")
    commands = [
        ("mvllm ps", "nodes, models (awake / asleep / loadable), GPUs"),
        (f"mvllm load {first.name}", "starts its engine, waits until it is ready"),
        (f"mvllm load {other.name}", f"GPU 0 has no room for both: {first.name} makes way"),
        (f"mvllm sleep {other.name}", f"at its own level ({other.sleep_level}); --level 1|2 to choose"),
        (f"mvllm wake {other.name}", ""),
        (f"mvllm logs {other.name}", "its engine's log (-f follows)"),
        (f"mvllm unload {other.name}", ""),
    ]
    lines += ["", "Try the models' life cycle (in another terminal; a chat request for one loads it too):"]
    width = max(len(command) for command, _ in commands) + len(router)
    for command, what in commands:
        lines.append((f"  {command + router:<{width}}" + (f"  # {what}" if what else "")).rstrip())
    return lines
