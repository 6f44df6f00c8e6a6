"""Profile the mvllm router's relay with py-spy: `python -m benchmarks.profile_relay [--chunks 16] [-c 32] [--seconds 6] [--no-stream]`.

Starts the emulated vLLM backend (`benchmarks/fakevllm.py`) and the router, both pinned to CPU 0 as
in the relay scenario, drives streamed chat completions from CPU 1, records the router with
`py-spy record --nonblocking --format raw` and prints the main thread's top frames (self and
inclusive) and the share of its samples per layer (aiohttp server, aiohttp client, mvllm, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import Harness, Unavailable, raise_nofile_limit
from benchmarks.loadgen import ChatRequest, closed_loop, make_session
from benchmarks.profile import summarize_collapsed
from benchmarks.scenarios.relay import MODEL, load_generator_cpu, start_backend, start_mvllm_router

EVENT_LOOP = "event loop (uvloop's C code, socket reads)"
# Layers, first match wins: a frame's file path (py-spy prints "function (path:line)") names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mvllm", ("mvllm/",)),
    # http_writer sends for both sides (the client's request upstream, the server's answer down).
    ("aiohttp writes (send, both sides)", ("aiohttp/http_writer",)),
    ("aiohttp client", ("aiohttp/client", "aiohttp/connector", "aiohttp/streams", "aiohttp/payload")),
    ("aiohttp server", ("aiohttp/web", "aiohttp/base_protocol", "aiohttp/abc")),
    ("aiohttp other", ("aiohttp/",)),
    ("json / orjson", ("json/", "orjson")),
    ("prometheus", ("prometheus_client/",)),
    # uvloop is C: its epoll waits and socket reads are sampled in the Python frame that runs it.
    (EVENT_LOOP, ("asyncio/", "uvloop")),
)


@dataclass(frozen=True)
class Frame:
    """One py-spy frame split into its function and its file (line number dropped)."""

    function: str
    path: str


def parse_frame(text: str) -> Frame:
    """`"_request (aiohttp/client.py:612)"` -> Frame("_request", "aiohttp/client.py"); a frame
    without a location (native, idle) keeps its whole text as the function."""
    head, sep, rest = text.partition(" (")  # a path may hold " (", a function name not
    if not sep or not rest.endswith(")"):
        return Frame(text.strip(), "")
    path = rest[:-1]
    base, colon, line = path.rpartition(":")
    if colon and line.isdigit():
        path = base
    return Frame(head.strip(), path)


def layer_of(frame: Frame) -> str:
    for name, needles in LAYERS:
        if any(n in frame.path for n in needles):
            return name
    return "other (C, stdlib, sockets)"


def layer_shares(own: Counter[str]) -> list[tuple[str, float]]:
    """Share of self samples per layer, largest first (sums to 1 over the samples given)."""
    total = sum(own.values())
    if not total:
        return []
    by: Counter[str] = Counter()
    for frame, n in own.items():
        by[layer_of(parse_frame(frame))] += n
    return [(name, n / total) for name, n in by.most_common()]


def render(total: int, own: Counter[str], inclusive: Counter[str], top: int = 15) -> str:
    if total == 0:
        return "no samples of the router's main thread"
    out = [f"router main thread: {total} samples", "", "by layer (self samples):"]
    out += [f"  {share * 100:5.1f}%  {name}" for name, share in layer_shares(own)]
    out += ["", f"top {top} frames, self:"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", f"top {top} frames, inclusive (excluding the event loop's own frames):"]
    shown = [
        (f, n) for f, n in inclusive.most_common() if layer_of(parse_frame(f)) != EVENT_LOOP and n < total
    ]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in shown[:top]]
    return "\n".join(out)


async def profile(args: argparse.Namespace) -> str:
    with load_generator_cpu():
        async with Harness("profile-relay") as h:
            backend = await start_backend(h)
            rt = await start_mvllm_router(h, backend.url, auth=False)
            req = ChatRequest(MODEL, args.chunks, not args.no_stream)
            async with make_session() as session:
                await closed_loop(session, rt.url, req, 8, duration=1.0)  # warm-up
                spy = await asyncio.create_subprocess_exec(
                    args.py_spy, "record", "--nonblocking", "--rate", str(args.rate),
                    "--duration", str(int(args.seconds)), "--format", "raw", "--output", str(args.out),
                    "--pid", str(rt.pid),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                result = await closed_loop(
                    session, rt.url, req, args.concurrency, duration=args.seconds + 1.0
                )
                _, err = await asyncio.wait_for(spy.communicate(), 60)
            if spy.returncode != 0:
                raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
    st = result.stats()
    return (
        f"load: {'non-streamed' if args.no_stream else 'stream'} {args.chunks} chunks c={args.concurrency}, {st.ok} ok, {st.error_count} errors, "
        f"{st.throughput:.0f} req/s"
    )


def _find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # pip puts it beside the venv's python
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def _install_loop() -> None:
    # The load generator's loop as in benchmarks.run: the cheaper, the less it disturbs the profile.
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_relay", description=__doc__.splitlines()[0]
    )
    p.add_argument("--chunks", type=int, default=16, help="content chunks per streamed answer")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--no-stream", action="store_true", help="non-streamed answers (the json legs)")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15)
    p.add_argument(
        "--out", type=Path, default=Path("relay-profile.txt"), help="raw collapsed stacks (flamegraph input)"
    )
    p.add_argument("--py-spy", default=_find_py_spy(), help="path of the py-spy binary")
    args = p.parse_args(argv)
    if not args.py_spy:
        print("py-spy not found: `pip install py-spy` (or '.[bench]') or pass --py-spy PATH", file=sys.stderr)
        return 2
    raise_nofile_limit()
    _install_loop()
    try:
        head = asyncio.run(profile(args))
    except Unavailable as exc:
        print(f"router not available: {exc}", file=sys.stderr)
        return 1
    print(head)
    print(render(*summarize_collapsed(args.out.read_text().splitlines()), top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
