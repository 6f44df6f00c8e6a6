"""The dashboard driven by Textual's pilot against a real router (in this process, on a 127.0.0.1
port: the app reads it over HTTP only) with `mvllm sim` engines and an `mvllm agent` as subprocesses.

Covers: the nodes table with its numbers while load runs, `d` drains the selected node and routing
avoids it, a killed node turns down on screen (and its error shows), the layout as an SVG
screenshot, `r` reload (valid and invalid file), `?` help and `q` asking while requests are in
flight, and on an agent the GPU panel and `l` / `s` / `w` / `u` on the selected model.
Set MVLLM_DOCS_SCREENSHOT=1 to rewrite docs/dashboard.svg from the agent test.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mvllm.router.app import RunningRouter
from mvllm.tui.app import DashboardApp
from mvllm.tui.widgets import ConfirmQuit, HelpScreen, SyncedTable
from tests.integration.agent_support import TOKEN, model, running_agent
from tests.integration.router_support import MODEL, client, router_for, sims
from tests.procs import REPO, Proc, free_port, wait_http_ok
from tests.support import node, wait_until_async, write_servers

SIZE = (160, 48)
# Slower tokens than the other router tests: a request stays running long enough to be seen.
SLOW = ["--sim-itl-ms", "15"]


@pytest.fixture(scope="module")
def two_sims(tmp_path_factory: pytest.TempPathFactory):
    with sims(tmp_path_factory.mktemp("tui-sims"), SLOW, SLOW) as started:
        yield started


@contextlib.asynccontextmanager
async def dashboard(router: RunningRouter | str, **run: object) -> AsyncIterator[tuple[DashboardApp, object]]:
    url = router if isinstance(router, str) else router.url
    app = DashboardApp(url, refresh_interval=0.2)
    async with app.run_test(size=SIZE, **run) as pilot:  # type: ignore[arg-type]
        await wait_until_async(lambda: app.polls >= 2, 15, what="first polls of the router")
        yield app, pilot


def nodes_table(app: DashboardApp) -> SyncedTable:
    return app.query_one("#nodes", SyncedTable)


def cell(app: DashboardApp, table: str, key: str, column: str) -> str:
    try:
        return app.query_one(f"#{table}", SyncedTable).cell_text(key, column)
    except KeyError:
        return ""


async def ask(router: RunningRouter, n: int, max_tokens: int = 4) -> list[str]:
    """n chat requests at once; the node that answered each."""
    async with client(router) as c:

        async def one() -> str:
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
            )
            return raw.headers["x-mvllm-node"]

        return list(await asyncio.gather(*(one() for _ in range(n))))


def svg_text(svg: str) -> str:
    """The words of a Textual SVG screenshot (its spaces are non-breaking, one <text> per run)."""
    return html.unescape("".join(re.findall(r">([^<>]+)</text>", svg))).replace("\xa0", " ")


async def test_table_lists_nodes_with_live_numbers_help_and_quit_confirmation(tmp_path: Path, two_sims) -> None:
    nodes = [node(s.url, f"n-{x}", max_concurrent_requests=8) for s, x in zip(two_sims, "ab", strict=True)]
    async with router_for(tmp_path, nodes) as router, dashboard(router) as (app, pilot):
        assert nodes_table(app).row_count == 2
        for name in ("n-a", "n-b"):
            assert cell(app, "nodes", name, "kind") == "static"
            assert cell(app, "nodes", name, "state") == "up"
            assert cell(app, "nodes", name, "cap") == "8"
            assert cell(app, "nodes", name, "models") == MODEL
        assert cell(app, "models", MODEL, "awake") == "n-a, n-b"
        # The engines' vllm:kv_cache_usage_perc, as a percentage (the sims report one).
        await wait_until_async(
            lambda: all(cell(app, "nodes", n, "kv%").endswith("%") for n in ("n-a", "n-b")), 10, what="KV% on screen"
        )
        kv = router.state.registry.get("n-a").kv_cache_usage
        assert kv is not None and cell(app, "nodes", "n-a", "kv%") == f"{kv * 100:.0f}%"

        await ask(router, 10)  # answered requests: the header's rate and latency come from /metrics
        streams = asyncio.ensure_future(ask(router, 6, max_tokens=300))  # ~4.5 s each at 15 ms a token: still in flight at "q" on a loaded machine
        try:
            await wait_until_async(
                lambda: sum(float(cell(app, "nodes", n, "run") or 0) for n in ("n-a", "n-b")) >= 2
                and sum(int(cell(app, "nodes", n, "in-flight") or 0) for n in ("n-a", "n-b")) >= 2,
                10,
                what="running requests on screen",
            )
            await wait_until_async(lambda: app.window is not None and app.window.requests >= 10, 10, what="the answered requests' rate")
            screen = app.screen_text()
            assert "nodes 2/2 up" in screen
            rate = re.search(r"([0-9.]+) req/s", screen)
            assert rate and float(rate.group(1)) > 0, screen
            assert re.search(r"p50 \d+ ms", screen), screen

            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            assert "drain / undrain the selected node" in app.screen_text()
            await pilot.press("escape")
            assert not isinstance(app.screen, HelpScreen)

            await pilot.press("q")  # requests are in flight: it asks
            assert isinstance(app.screen, ConfirmQuit)
            assert "request(s) in flight" in app.screen_text()
            await pilot.press("n")
            assert not isinstance(app.screen, ConfirmQuit) and app.is_running
        finally:
            assert len(await streams) == 6


async def test_d_drains_the_selected_node_and_routing_avoids_it(tmp_path: Path, two_sims) -> None:
    nodes = [node(s.url, f"n-{x}") for s, x in zip(two_sims, "ab", strict=True)]
    async with router_for(tmp_path, nodes) as router, dashboard(router) as (app, pilot):
        assert set(await ask(router, 12)) == {"n-a", "n-b"}  # both take requests at first
        await pilot.press("down")  # the second row
        assert nodes_table(app).selected_key == "n-b"
        await pilot.press("d")
        await wait_until_async(lambda: router.state.registry.get("n-b").admin_drain, 5, what="n-b drained")
        await wait_until_async(lambda: "draining" in cell(app, "nodes", "n-b", "state"), 5, what="drain on screen")
        assert cell(app, "nodes", "n-b", "state") == "up, draining (admin)"
        assert set(await ask(router, 12)) == {"n-a"}  # routing avoids the drained node

        await pilot.press("d")  # again: undrain
        await wait_until_async(lambda: cell(app, "nodes", "n-b", "state") == "up", 5, what="undrained on screen")
        assert not router.state.registry.get("n-b").admin_drain


async def test_a_killed_node_turns_down_on_screen(tmp_path: Path, two_sims) -> None:
    with sims(tmp_path, SLOW) as (victim,):
        nodes = [node(two_sims[0].url, "n-a"), node(victim.url, "n-k")]
        async with router_for(tmp_path, nodes) as router, dashboard(router) as (app, _pilot):
            await wait_until_async(lambda: cell(app, "nodes", "n-k", "state") == "up", 5, what="n-k up")
            victim.proc.kill()
            await wait_until_async(lambda: cell(app, "nodes", "n-k", "state").startswith("down"), 10, what="n-k down on screen")
            assert cell(app, "nodes", "n-a", "state") == "up"
            # Its last numbers are kept, marked stale, not shown as fresh zeros.
            assert cell(app, "nodes", "n-k", "run").endswith("?")
            await wait_until_async(lambda: "node n-k is down" in app.screen_text(), 5, what="the error in the panes")
            assert "nodes 1/2 up" in app.screen_text()


async def test_layout_snapshot(tmp_path: Path, two_sims) -> None:
    nodes = [node(s.url, f"n-{x}") for s, x in zip(two_sims, "ab", strict=True)]
    async with router_for(tmp_path, nodes) as router, dashboard(router) as (app, _pilot):
        await ask(router, 4)
        await wait_until_async(lambda: app.window is not None and app.window.requests >= 4, 10, what="rates")
        path = Path(app.save_screenshot("dashboard.svg", str(tmp_path)))
        svg = await asyncio.to_thread(path.read_text)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    words = svg_text(svg)
    for title in ("Nodes", "Models", "GPUs (agents)", "Requests / s", "Latency p50 (ms)", "Recent errors", "Log"):
        assert title in words, title
    for text in ("n-a", "n-b", MODEL, "NODE", "KIND", "STATE", "BREAKER", "IN-FLIGHT", "nodes 2/2 up", "req/s"):
        assert text in words, text
    for key in ("drain/undrain", "load", "unload", "sleep", "reload config", "help", "quit"):
        assert key in words, key
    # Regions top to bottom: header, nodes, models and GPUs side by side, charts, errors and log.
    order = [words.index(t) for t in ("nodes 2/2 up", "Nodes", "Models", "GPUs (agents)", "Requests / s", "Recent errors")]
    assert order == sorted(order)
    assert words.index("Models") < words.index("GPUs (agents)") < words.index("Requests / s")


async def test_r_reloads_the_config_and_shows_a_rejected_one(tmp_path: Path, two_sims) -> None:
    a = node(two_sims[0].url, "n-a")
    async with router_for(tmp_path, [a]) as router, dashboard(router) as (app, pilot):
        path = tmp_path / "servers.toml"  # router_for wrote it; not watched: only `r` reloads it
        write_servers(path, [a, node(two_sims[1].url, "n-b")])
        await pilot.press("r")
        await wait_until_async(lambda: cell(app, "nodes", "n-b", "state") == "up", 10, what="n-b joined on screen")
        path.write_text("[servers]\nservers = [{ url = 'http://127.0.0.1:1', max_concurrent_requests = 'eight' }]\n")
        await pilot.press("r")
        await wait_until_async(lambda: "reload failed" in app.screen_text(), 5, what="the rejection in the log pane")
        assert "max_concurrent_requests" in app.screen_text()
        assert [n.name for n in router.state.registry.nodes()] == ["n-a", "n-b"]  # the old config stays


async def test_agent_gpus_and_model_keys(tmp_path: Path, two_sims) -> None:
    catalog = model("m1", sim="sim = { ttft_ms = 5, itl_ms = 2, weights_gib = 2, startup_s = 0.3 }") + model("m2")
    with running_agent(tmp_path, catalog, sim_gpus=(24,)) as agent:
        nodes = [node(two_sims[0].url, "n-a", max_concurrent_requests=8)]
        port = free_port()
        cfg = write_servers(tmp_path / "servers.toml", nodes)
        cfg.write_text(cfg.read_text() + f'\n[[agents]]\nname = "gpu-a"\nurl = "{agent.url}"\ntoken = "{TOKEN}"\n')
        router = Proc(["run", "--config", str(cfg), "--port", str(port), "--console"], tmp_path / "router.log").start()
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http_ok(url + "/health", 30, router.popen)
            async with dashboard(url) as (app, pilot):
                await wait_until_async(lambda: cell(app, "gpus", "gpu-a/0", "memory"), 10, what="the agent's GPU")
                assert "0.0G/24.0G" in cell(app, "gpus", "gpu-a/0", "memory")
                assert cell(app, "nodes", "gpu-a", "kind") == "agent"
                assert cell(app, "models", "m1", "loadable") == "gpu-a"

                await pilot.press("down")  # the agent's row (static servers come first)
                assert nodes_table(app).selected_key == "gpu-a"
                await pilot.press("tab")  # to the models table; m1 is its first row
                assert app.query_one("#models", SyncedTable).selected_key == "m1"

                async def shows(column: str, text: str, what: str) -> None:
                    await wait_until_async(lambda: cell(app, "models", "m1", column) == text, 20, what=what)

                await pilot.press("l")
                await shows("awake", "gpu-a", "m1 loaded")
                # The engine holds its budget (memory_gib = 10), as vLLM takes its share up front.
                await wait_until_async(lambda: "10.0G/24.0G" in cell(app, "gpus", "gpu-a/0", "memory"), 10, what="memory used")
                if os.environ.get("MVLLM_DOCS_SCREENSHOT"):
                    await docs_screenshot(app, url)
                await pilot.press("s")
                await shows("asleep", "gpu-a(1)", "m1 asleep")
                await pilot.press("w")
                await shows("awake", "gpu-a", "m1 awake again")
                await pilot.press("u")
                await shows("loadable", "gpu-a", "m1 unloaded")
                assert agent.inst("m1")["state"] == "stopped"
        finally:
            router.stop()


async def docs_screenshot(app: DashboardApp, url: str) -> None:
    """docs/dashboard.svg: the screen while requests run on both nodes."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:

        async def one(m: str, tokens: int) -> None:
            await c.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=tokens)

        await asyncio.gather(*(one(m, 20) for m in ("m1", MODEL) * 10))
        busy = asyncio.ensure_future(asyncio.gather(*(one(m, 300) for m in ("m1", MODEL) * 3)))
        await asyncio.sleep(2.5)
        app.save_screenshot("dashboard.svg", str(REPO / "docs"))
        await busy


async def test_without_the_admin_key_the_view_is_read_only_and_with_it_actions_work(tmp_path: Path) -> None:
    from mvllm.router.app import running_router
    from mvllm.router.config import load_config

    admin_key = "sk-dash-admin-0123456789"
    path = write_servers(tmp_path / "servers.toml", [node(f"http://127.0.0.1:{free_port()}", "n-x")])
    path.write_text(path.read_text() + f'\n[[auth.keys]]\nname = "ops"\nrole = "admin"\nkey = "{admin_key}"\n')
    async with running_router(load_config(path), host="127.0.0.1", port=0, config_path=path, watch=False) as router:
        async with dashboard(router) as (app, pilot):
            assert nodes_table(app).row_count == 1  # /load-stats is open: the nodes still show
            await wait_until_async(lambda: "read-only view" in app.screen_text(), 5, what="the read-only notice")
            await pilot.press("d")
            await wait_until_async(lambda: "drain n-x failed" in app.screen_text(), 5, what="the refused drain")
            assert not router.state.registry.get("n-x").admin_drain
        app = DashboardApp(router.url, key=admin_key, refresh_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await wait_until_async(lambda: app.polls >= 1 and nodes_table(app).row_count == 1, 10, what="first poll")
            await pilot.press("d")
            await wait_until_async(lambda: router.state.registry.get("n-x").admin_drain, 5, what="drained with the key")
