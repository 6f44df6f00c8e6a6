"""The relay profiler's pure parsing: py-spy frames, layers and their shares of the samples."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.profile import summarize_collapsed
from benchmarks.profile_relay import EVENT_LOOP, Frame, layer_of, layer_shares, parse_frame, render


@pytest.mark.parametrize(
    ("text", "frame"),
    [
        ("_request (aiohttp/client.py:612)", Frame("_request", "aiohttp/client.py")),
        ("Proxy._relay (mvllm/router/proxy.py)", Frame("Proxy._relay", "mvllm/router/proxy.py")),
        ("<lambda> (/srv/x (copy)/mod.py:3)", Frame("<lambda>", "/srv/x (copy)/mod.py")),
        ('process 123:"python -m mvllm"', Frame('process 123:"python -m mvllm"', "")),
        ("idle", Frame("idle", "")),
    ],
)
def test_parse_frame(text: str, frame: Frame) -> None:
    assert parse_frame(text) == frame


def test_layers_first_match_wins() -> None:
    assert layer_of(Frame("Proxy.handle", "/v/lib/mvllm/router/proxy.py")) == "mvllm"
    assert (
        layer_of(Frame("StreamWriter._writelines", "aiohttp/http_writer.py"))
        == "aiohttp writes (send, both sides)"
    )
    assert layer_of(Frame("ResponseHandler.data_received", "aiohttp/client_proto.py")) == "aiohttp client"
    assert layer_of(Frame("RequestHandler.start", "aiohttp/web_protocol.py")) == "aiohttp server"
    assert layer_of(Frame("Runner.run", "asyncio/runners.py")) == EVENT_LOOP
    assert layer_of(Frame("send", "")) == "other (C, stdlib, sockets)"


def test_layer_shares_sum_to_one_and_sort() -> None:
    own = Counter(
        {"a (mvllm/x.py)": 1, "b (aiohttp/web_app.py)": 3, "c (aiohttp/web_protocol.py)": 4, "d": 2}
    )
    shares = layer_shares(own)
    assert shares[0] == ("aiohttp server", 0.7)
    assert dict(shares) == {"aiohttp server": 0.7, "other (C, stdlib, sockets)": 0.2, "mvllm": 0.1}
    assert layer_shares(Counter()) == []


def test_render_from_collapsed_stacks() -> None:
    lines = [
        "main (mvllm/__main__.py:1);Runner.run (asyncio/runners.py:118) 6",
        "main (mvllm/__main__.py:1);Proxy.handle (mvllm/router/proxy.py:40);_request (aiohttp/client.py:600) 4",
        "other_thread (threading.py:1) 9",  # not the router's main thread: left out
    ]
    total, own, inclusive = summarize_collapsed(lines)
    assert total == 10
    text = render(total, own, inclusive, top=5)
    assert "60.0%  event loop" in text
    assert "40.0%  aiohttp client" in text
    assert "40.0%  Proxy.handle (mvllm/router/proxy.py)" in text  # inclusive, not the loop's frames
    assert "Runner.run (asyncio/runners.py)" in text.split("inclusive")[0]
    assert "no samples" in render(0, Counter(), Counter())
