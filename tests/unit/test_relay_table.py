"""The relay table's pure parts: case names split into target and leg, figures against the baseline."""

from __future__ import annotations

from benchmarks.relay_table import collect, parse_case, render


def test_parse_case_by_known_leg_names() -> None:
    assert parse_case("mvllm agent stream16 c=32") == ("mvllm agent", "stream16 c=32")
    assert parse_case("vllm-router json c=1") == ("vllm-router", "json c=1")
    assert parse_case("mvllm json c=7") is None


def _row(case: str, rps: float, p50: float, extra: str = "", errors: int = 0) -> dict:
    return {"case": case, "reqs": 100, "errors": errors, "rps": rps, "e2e_p50": p50, "extra": extra}


def test_render_against_direct() -> None:
    rows = [
        _row("direct json c=1", 1000, 0.50),
        _row("direct json c=32", 4000, 5.0),
        _row("mvllm json c=1", 800, 1.10, "CPU 0.500 ms/req; added p50 +0.60 ms"),
        _row("mvllm json c=32", 1000, 20.0, "CPU 0.400 ms/req", errors=2),
        _row("mvllm stream64 c=32", 16, 2000, "CPU 6.400 ms/req; 0.1 ms/chunk"),
    ]
    doc = {
        "scenarios": [
            {"name": "overhead", "rows": [_row("x json c=1", 1, 1)]},
            {"name": "relay", "rows": rows},
        ]
    }
    figs = collect(doc)
    assert list(figs) == ["direct", "mvllm"]  # the other scenario's rows are not read
    table = render(figs).splitlines()
    assert table[2].startswith("| direct | – |")
    assert table[3] == "| mvllm | 0.400 | – | 6.40 | 0.1000 | +0.60 | 0.25× | – | 2 / 300 |"
