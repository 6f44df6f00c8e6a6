"""The warm launcher's standby process: imports the engine's modules ahead of time (about 40 s of
Python imports for vLLM, before any GPU work), then waits for the arguments of the next engine and
becomes that engine in place: `python -m mvllm.agent.standby --preload vllm|sim`.

Protocol, over the pipes the agent (mvllm.agent.warm_launcher) gave it:
- once the imports are done it writes one line `ready <seconds>` to stdout;
- it reads one JSON line from stdin: `{"argv", "env", "cwd", "log_path", "header"}`;
- it appends `header` to `log_path`, points stdout and stderr there and stdin at /dev/null, takes
  `env` as its whole environment and `cwd` as its directory, and runs the engine's own entry point
  with `argv` (so it logs, serves and stops exactly as `vllm serve` / `mvllm sim serve` would).
It was started as the leader of a session of its own, so the engine's process group (vLLM's engine
core and workers join it) and the agent's stop semantics are those of a plain spawn. No CUDA call
happens before the hand-off: CUDA_VISIBLE_DEVICES from `env` is what the engine sees.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
import time
from importlib.metadata import entry_points

# What each engine kind imports while it waits; a module that fails to import makes the standby
# exit, and the agent falls back to a plain spawn.
PRELOAD = {
    "vllm": ("vllm.entrypoints.cli.main", "vllm.entrypoints.cli.serve", "vllm.entrypoints.openai.api_server"),
    "sim": ("mvllm.sim.cli", "mvllm.sim.app", "mvllm.sim.engine"),
}
# Imported too when they exist (best effort: module names move between vLLM releases): what vLLM's
# engine core process imports after the API server forks it, ~15 s more of a cold start otherwise.
PRELOAD_EXTRA = {
    "vllm": (
        "vllm.v1.engine.async_llm", "vllm.v1.engine.core", "vllm.v1.executor.abstract",
        "vllm.distributed.parallel_state", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner",
        "vllm.v1.worker.gpu.model_runner", "vllm.v1.attention.backends.flash_attn",
        "vllm.model_executor.models.llama", "vllm.model_executor.models.registry",
        "vllm.tokenizers", "vllm.renderers", "vllm.inputs.preprocess", "vllm.v1.engine.input_processor",
        "transformers", "transformers.models.auto.tokenization_auto", "transformers.models.auto.configuration_auto",
        "tokenizers",
    ),
    "sim": (),
}
# Console scripts the standby can become when the package metadata does not name them (a wheel
# unpacked without its dist-info).
KNOWN_SCRIPTS = {"vllm": "vllm.entrypoints.cli.main:main"}


def engine_entry(argv: list[str]) -> None:
    """Run `argv` as exec would, in this process: `python -m MODULE ...` as that module's
    __main__, anything else as the console script named argv[0]."""
    if len(argv) >= 3 and argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        return
    name = os.path.basename(argv[0])
    found = list(entry_points(group="console_scripts", name=name))
    target = found[0].value if found else KNOWN_SCRIPTS[name]
    module, _, attr = target.partition(":")
    func = getattr(importlib.import_module(module), attr)
    sys.argv = list(argv)
    raise SystemExit(func())


def become(job: dict) -> None:
    """Turn this process into the engine of `job` (never returns normally)."""
    log_fd = os.open(job["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(log_fd, job.get("header", "").encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mvllm.agent.standby")
    parser.add_argument("--preload", choices=sorted(PRELOAD), required=True)
    opts = parser.parse_args(argv)
    t0 = time.monotonic()
    for name in PRELOAD[opts.preload]:
        try:
            importlib.import_module(name)
        except Exception as exc:  # the agent reads this line and spawns plainly instead
            print(f"failed {name}: {type(exc).__name__}: {exc}", flush=True)
            return 3
    for name in PRELOAD_EXTRA[opts.preload]:
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"standby: skipped preloading {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        # CUDA_VISIBLE_DEVICES is read once, at CUDA's start: this process could not honour the engine's.
        print("failed CUDA was initialized while preloading", flush=True)
        return 3
    print(f"ready {time.monotonic() - t0:.2f}", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the agent closed the pipe: stood down without a job
    job = json.loads(line)
    become(job)
    engine_entry(job["argv"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
