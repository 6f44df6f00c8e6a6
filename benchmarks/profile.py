"""Profile the router under load with py-spy: `python -m benchmarks.profile [--stream] [-c 32] [--seconds 8]`.

Starts one instant-answer sim node and the router, drives a closed loop through it, records the
router's stacks with `py-spy record --format raw` (install it with `pip install py-spy`), and
prints where the router's main thread spends its samples (self and inclusive), so that changes to
the hot path can be checked against a profile rather than a guess.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from benchmarks.harness import Harness, SimSpec, Unavailable, raise_nofile_limit
from benchmarks.loadgen import ChatRequest, closed_loop, make_session

_LINE_NO = re.compile(r":\d+\)")


def summarize_collapsed(lines: Iterable[str], thread_marker: str = "mvllm/__main__.py") -> tuple[int, Counter[str], Counter[str]]:
    """From py-spy's raw (collapsed) stacks, the samples of the thread whose stacks contain
    `thread_marker` (the router's main thread): total, self counts and inclusive counts per frame."""
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or thread_marker not in stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE_NO.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return total, own, inclusive


def render(total: int, own: Counter[str], inclusive: Counter[str], top: int = 20) -> str:
    if total == 0:
        return "no samples of the router's main thread"
    out = [f"router main thread: {total} samples", "", "self:"]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive (mvllm, aiohttp request paths, metrics, json):"]
    keys = ("mvllm/router", "ClientSession._request", "_handle_request", "finish_response", "prometheus", "json", "uuid")
    shown = [(f, n) for f, n in inclusive.most_common() if any(k in f for k in keys)]
    out += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in shown[: top * 2]]
    return "\n".join(out)


async def profile(py_spy: str, stream: bool, concurrency: int, seconds: float, out: Path, rate: int) -> tuple[str, Path]:
    async with Harness("profile") as h:
        [node] = await h.start_sims([SimSpec(max_num_seqs=1024)])
        rt = await h.start_router([("n0", node.url, 1024)])
        req = ChatRequest(node.model, 8, stream)
        async with make_session() as session:
            await closed_loop(session, rt.url, req, 8, duration=1.0)  # warm-up
            spy = await asyncio.create_subprocess_exec(
                py_spy, "record", "--rate", str(rate), "--duration", str(int(seconds)),
                "--format", "raw", "--output", str(out), "--pid", str(rt.pid),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            result = await closed_loop(session, rt.url, req, concurrency, duration=seconds + 1.0)
            _, err = await asyncio.wait_for(spy.communicate(), 30)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
    st = result.stats()
    return f"load: {'stream' if stream else 'json'} c={concurrency}, {st.ok} ok, {st.error_count} errors, {st.throughput:.0f} req/s", out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    p.add_argument("--stream", action="store_true", help="streaming requests (default: non-streaming)")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("router-profile.txt"), help="raw collapsed stacks (flamegraph input)")
    p.add_argument("--py-spy", default=shutil.which("py-spy"), help="path of the py-spy binary")
    args = p.parse_args(argv)
    if not args.py_spy:
        print("py-spy not found: `pip install py-spy` or pass --py-spy PATH", file=sys.stderr)
        return 2
    raise_nofile_limit()
    try:
        head, out = asyncio.run(profile(args.py_spy, args.stream, args.concurrency, args.seconds, args.out, args.rate))
        print(head)
        print(render(*summarize_collapsed(out.read_text().splitlines())))
    except Unavailable as exc:
        print(f"router not available: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
