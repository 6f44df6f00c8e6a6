"""The fleet view shared by the dashboard and `mvllm ps`: stale data marked stale, agent GPUs and
instances, where each model is awake / asleep / loadable, and the text the tables show."""

from __future__ import annotations

from typing import Any

from mvllm.client.fleet import build_fleet, fmt_num, fmt_pct
from mvllm.ctl.progress import find_instance
from mvllm.ctl.render import ps_text, status_text, table
from mvllm.tui.cells import NODE_COLUMNS, gpu_cells, model_cells, node_cells, totals_text

GIB = 2**30


def static(name: str, **kw: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "url": f"http://{name}:8000",
        "kind": "static",
        "models": ["llama"],
        "running": 3.0,
        "waiting": 1.0,
        "in_flight": 2,
        "capacity": 8,
        "score": 0.4375,
        "health": "up",
        "breaker": "closed",
        "draining": False,
        "removed": False,
        "last_scrape_age_s": 0.4,
        "scrape_error": None,
        "health_error": None,
    }
    entry.update(kw)
    return entry


def instance(name: str, state: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "served_model_names": [name], "running": 0, "waiting": 0, **kw}


def agent(name: str) -> dict[str, Any]:
    e = static(name, kind="agent", models=["qwen", "phi", "mistral", "llama"], running=1.0, waiting=0.0)
    busy_gpu = {"index": 0, "name": "H100", "memory_total_bytes": 80 * GIB, "memory_used_bytes": 60 * GIB}
    busy_gpu.update(utilization_pct=87.0, temperature_c=66.0, power_w=410.0)
    e["agent"] = {
        "state_age_s": 0.3,
        "gpus": [busy_gpu, {"index": 1, "name": "H100", "memory_total_bytes": 80 * GIB, "memory_used_bytes": 2 * GIB}],
        "instances": [
            instance("qwen", "ready", running=1, waiting=2, queued=1),
            instance("phi", "sleeping", sleep_level=2),
            instance("mistral", "failed", error="engine exited with code 1", log_tail=["boom"]),
            instance("llama", "stopped"),
        ],
        "catalog": [{"name": n, "served_model_names": [n]} for n in ("qwen", "phi", "mistral", "llama")]
        + [{"name": "gemma", "served_model_names": ["gemma"], "lora_adapters": ["gemma-sql"]}],
    }
    return e


def doc(*nodes: dict[str, Any], interval: float = 1.0) -> dict[str, Any]:
    return {
        "router": {"version": "0.1.0", "uptime_s": 75, "policy": "least-score", "settings": {"scrape_interval": interval}},
        "nodes": list(nodes),
    }


def test_fresh_static_nodes_and_totals() -> None:
    f = build_fleet(doc(static("a"), static("b", health="down", health_error="/health: timed out")))
    a, b = f.nodes
    assert not a.stale and a.state_text == "up" and a.running == 3.0
    assert b.stale and "timed out" in (b.stale_reason or "") and b.state_text == "down"
    t = f.totals
    assert (t.nodes_total, t.nodes_up, t.in_flight) == (2, 1, 4)
    assert t.running == 3.0  # the down node's last numbers are not added as if fresh


def test_old_scrape_is_stale_and_shown_with_a_question_mark_not_zero() -> None:
    f = build_fleet(doc(static("a", last_scrape_age_s=9.0, scrape_error="/metrics: timed out", running=5.0)))
    n = f.nodes[0]
    assert n.stale and n.state_text == "stale" and "9s ago" in (n.stale_reason or "")
    cells = [c.plain for c in node_cells(n)]
    assert cells[5] == "5?" and cells[8] == "0.44?"  # running and score keep their value, marked
    # The threshold follows the scrape interval: 9 s is fresh enough at a 5 s interval.
    assert not build_fleet(doc(static("a", last_scrape_age_s=9.0), interval=5.0)).nodes[0].stale
    assert build_fleet(doc(static("a", last_scrape_age_s=None))).nodes[0].stale  # never read
    assert fmt_num(None) == "–" and fmt_num(2.0) == "2" and fmt_num(2.5, stale=True) == "2.5?"


def test_kv_cache_usage_column() -> None:
    n = build_fleet(doc(static("a", kv_cache_usage=0.953, prefix_hit_ratio=0.5))).nodes[0]
    assert (n.kv_cache_usage, n.prefix_hit_ratio) == (0.953, 0.5)
    cell = node_cells(n)[NODE_COLUMNS.index("kv%")]
    assert cell.plain == "95%" and "red" in str(cell.style)  # full: it gets no affinity traffic
    assert node_cells(build_fleet(doc(static("b"))).nodes[0])[NODE_COLUMNS.index("kv%")].plain == "–"
    stale = build_fleet(doc(static("c", kv_cache_usage=0.2, last_scrape_age_s=30.0))).nodes[0]
    assert node_cells(stale)[NODE_COLUMNS.index("kv%")].plain == "20%?"
    assert fmt_pct(None) == "–" and fmt_pct(0.5) == "50%"


def test_drain_and_breaker_in_the_state() -> None:
    n = build_fleet(doc(static("a", draining=True, drained_by="admin", breaker="open"))).nodes[0]
    assert n.state_text == "ejected, draining" and not n.up
    assert node_cells(n)[2].plain == "ejected, draining (admin)"


def test_agent_gpus_instances_and_models_view() -> None:
    f = build_fleet(doc(static("s1", models=["qwen"]), agent("gpu-a")))
    g = f.node("gpu-a")
    assert g is not None and g.is_agent and len(g.gpus) == 2
    assert g.gpus[0].memory_fraction == 0.75 and g.gpus[1].utilization_pct is None
    qwen, phi, mistral, llama, gemma = (f.model(m) for m in ("qwen", "phi", "mistral", "llama", "gemma"))
    # s1 serves only qwen (its 1 waiting counts) + the engine's 2 waiting + 1 queued at the agent.
    assert qwen.awake == ["s1", "gpu-a"] and qwen.queue == 4
    assert phi.asleep == ["gpu-a(2)"] and not phi.awake
    assert mistral.failed == ["gpu-a"]
    assert llama.loadable == ["gpu-a"]
    assert gemma.loadable == ["gpu-a"] and f.model("gemma-sql").loadable == ["gpu-a"]
    assert [c.plain for c in gpu_cells(g.gpus[0])][2:5] == ["████████░░ 60.0G/80.0G", "87%", "66°C"]
    assert model_cells(mistral)[1].plain == "gpu-a (failed)" and model_cells(mistral)[4].plain == "0"


def test_replica_count_per_model_with_loading_and_released_copies() -> None:
    a, b, c = agent("gpu-a"), agent("gpu-b"), agent("gpu-c")
    b["agent"]["instances"][0] = instance("qwen", "ready", router={"released": True, "score": 0.0})
    c["agent"]["instances"][0] = instance("qwen", "starting")
    f = build_fleet(doc(static("s1", models=["qwen"]), a, b, c))
    qwen = f.model("qwen")
    assert qwen.awake == ["s1", "gpu-a", "gpu-b"] and qwen.released == ["gpu-b"] and qwen.starting == ["gpu-c"]
    assert qwen.replicas == 2 and qwen.replicas_text == "2 +1 loading -1 released"
    cells = [t.plain for t in model_cells(qwen)]
    assert cells[4] == "2 +1 loading -1 released" and "gpu-b (released)" in cells[1]
    row = next(line for line in ps_text(f).splitlines() if line.startswith("qwen"))
    assert "2 +1 loading -1 released" in row and "gpu-b (released)" in row
    assert "REPLICAS" in ps_text(f)


def test_static_per_model_load_goes_to_its_model() -> None:
    s = static("s1", models=["base", "lora"], per_model={"base": {"running": 2, "waiting": 0}, "lora": {"running": 1, "waiting": 4}})
    f = build_fleet(doc(s))
    assert (f.model("base").running, f.model("lora").queue) == (2, 4)


def test_ps_and_status_text() -> None:
    f = build_fleet(doc(static("a", kv_cache_usage=0.4231), static("b", last_scrape_age_s=30.0), agent("gpu-a")))
    out = ps_text(f)
    lines = out.splitlines()
    assert lines[0].split() == ["NODE", "KIND", "STATE", "BREAKER", "RUN/WAIT/CAP", "SCORE", "KV%", "IN-FLIGHT", "MODELS"]
    assert lines[1].split()[:8] == ["a", "static", "up", "closed", "3/1/8", "0.44", "42%", "2"]
    assert lines[2].split()[6] == "-"  # no kv_cache_usage known: a dash, never 0%
    assert "3?/1?/8" in lines[2]  # the stale node's numbers, marked
    assert "? b: stale data (load last read 30s ago)" in out
    assert "gpu-a  0    H100  60.0G/80.0G (75%)" in out
    st = status_text("http://r:8888", {"status": "ok"}, f)
    assert "nodes    3/3 up (1 stale)" in st and "up 1m15s" in st
    assert table(["A", "B"], [["x", "yy"], ["long", "z"]]) == "A     B\nx     yy\nlong  z"


def test_totals_line_and_unreachable_router() -> None:
    f = build_fleet(doc(static("a"), static("b", breaker="open")))
    text = totals_text("http://r:1", f, None, None).plain
    assert "nodes 1/2 up" in text and "– req/s" in text
    assert "router unreachable" in totals_text("http://r:1", f, None, "router unreachable").plain


def test_the_header_shows_the_whole_cluster_and_a_redis_outage() -> None:
    d = doc(static("a"))
    assert "routers" not in totals_text("http://r:1", build_fleet(d), None, None).plain
    d["router"]["cluster"] = {"routers": 3, "in_flight": 17, "redis": "ok", "shared_limits": True}
    text = totals_text("http://r:1", build_fleet(d), None, None).plain
    assert "3 routers, 17 in flight" in text and "Redis down" not in text
    d["router"]["cluster"] = {"routers": 1, "in_flight": 2, "redis": "down", "shared_limits": False}
    assert "Redis down: per-router limits" in totals_text("http://r:1", build_fleet(d), None, None).plain


def test_find_instance_prefers_the_one_changing() -> None:
    d = doc(agent("gpu-a"), agent("gpu-b"))
    d["nodes"][1]["agent"]["instances"][3]["state"] = "starting"  # llama loading on gpu-b
    assert find_instance(d, "llama", None).node == "gpu-b"
    assert find_instance(d, "llama", "gpu-a").state == "stopped"
    assert find_instance(d, "nope", None) is None


def test_a_load_shows_its_phase_time_left_and_last_cold_start() -> None:
    a, b = agent("gpu-a"), agent("gpu-b")
    a["agent"]["instances"][3] = instance(
        "llama", "starting",
        load={"kind": "cold", "phase": "kv_cache", "started_at": 1.0, "phase_at": 9.0, "elapsed_s": 9.0, "remaining_s": 11.6},
        timings={"cold_start_s": 37.1, "cold_start_warm": True},
    )  # fmt: skip
    b["agent"]["instances"][1] = instance(
        "phi", "sleeping", sleep_level=2,
        load={"kind": "wake", "phase": "waking", "started_at": 1.0, "phase_at": 1.0, "elapsed_s": 0.2, "remaining_s": None},
    )  # fmt: skip
    f = build_fleet(doc(a, b))
    llama = f.model("llama")
    assert llama.loading_text("gpu-a") == "loading: kv cache, ~12s left, last 37s warm"
    row = next(line for line in ps_text(f).splitlines() if line.startswith("llama"))
    assert "gpu-a (loading: kv cache, ~12s left, last 37s warm)" in row
    assert "gpu-a (loading: kv cache, ~12s left" in model_cells(llama)[1].plain
    assert f.model("phi").asleep == ["gpu-a(2)", "gpu-b(2, waking)"]
    # Nothing reported (an older agent): just "loading".
    c = agent("gpu-c")
    c["agent"]["instances"][3] = instance("llama", "starting")
    assert build_fleet(doc(c)).model("llama").loading_text("gpu-c") == "loading"
