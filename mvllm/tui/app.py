"""The dashboard: a Textual app that polls one router over HTTP (`/admin/nodes` or `/load-stats`,
`/metrics`, `/admin/events`) about once a second and acts on it through `/admin/*`.

It never touches the router's objects, so the same screen runs inside `mvllm run` (same process
and event loop) and against a remote router (`mvllm top --router URL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from rich.console import Console
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, RichLog, Sparkline, Static

from mvllm.client import APIConnectionError, AsyncClient, MvllmError
from mvllm.client.fleet import FleetView, build_fleet
from mvllm.client.keyview import KEY_COLUMNS
from mvllm.tui.cells import (
    GPU_COLUMNS,
    MODEL_COLUMNS,
    NODE_COLUMNS,
    event_text,
    fmt_ms,
    gpu_cells,
    key_cells,
    model_cells,
    node_cells,
    totals_text,
)
from mvllm.tui.rates import RateHistory, Window, parse_metrics
from mvllm.tui.widgets import ConfirmQuit, HelpScreen, SyncedTable, TryItScreen

REFRESH_S = 1.0
# A model load may take minutes on a real GPU: the action waits that long for the router's answer.
MODEL_ACTION_TIMEOUT_S = 900.0
_FIRST_EVENTS = 300
# q asks the router how many requests are in flight, for at most this long.
QUIT_CHECK_S = 1.0
_WARNING_LEVELS = ("WARNING", "ERROR", "CRITICAL")


class DashboardApp(App[None]):
    CSS_PATH = "dashboard.tcss"
    TITLE = "mvllm"
    BINDINGS = [  # noqa: RUF012 - Textual's declaration style
        Binding("d", "drain", "drain/undrain"),
        Binding("l", "model('load')", "load"),
        Binding("u", "model('unload')", "unload"),
        Binding("s", "model('sleep')", "sleep"),
        Binding("S", "model('sleep', 2)", "sleep 2", show=False),
        Binding("w", "model('wake')", "wake"),
        Binding("r", "reload", "reload config"),
        Binding("t", "try_it", "try it"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    ]

    def __init__(
        self,
        router_url: str,
        *,
        key: str | None = None,
        embedded: bool = False,
        refresh_interval: float = REFRESH_S,
        notes: str | None = None,
    ) -> None:
        super().__init__()
        self.notes = notes  # the demo's "try it" lines, behind the t key
        self.client = AsyncClient(router_url, admin_key=key, timeout=max(2.0, 3 * refresh_interval))
        self.router_url = self.client.base_url
        self.embedded = embedded
        self.refresh_interval = refresh_interval
        self.fleet: FleetView | None = None
        self.rates = RateHistory()
        self.window: Window | None = None
        self.problem: str | None = None
        self.polls = 0  # completed polls (tests wait on it)
        self._doc: dict[str, Any] | None = None
        self._admin: bool | None = None  # None: not tried yet; False: 401/403/404, read-only
        self._last_event = 0
        self._polling = False
        self._keys: list[dict[str, Any]] | None = None  # /admin/keys entries; None: no keys configured

    # -- layout ------------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static(id="totals")
        with Vertical(id="nodes-pane", classes="pane"):
            yield SyncedTable(NODE_COLUMNS, id="nodes")
        with Horizontal(id="middle"):
            with Vertical(id="models-pane", classes="pane"):
                yield SyncedTable(MODEL_COLUMNS, id="models")
            with Vertical(id="gpus-pane", classes="pane"):
                yield SyncedTable(GPU_COLUMNS, id="gpus")
        # Shown only while the router has API keys (and we may read /admin/keys).
        with Vertical(id="keys-pane", classes="pane"):
            yield SyncedTable(KEY_COLUMNS, id="keys")
        with Horizontal(id="charts"):
            with Vertical(id="rps-chart", classes="chart pane"):
                yield Static(id="rps-label", classes="chart-label")
                yield Sparkline([], summary_function=max, id="rps-spark")
            with Vertical(id="lat-chart", classes="chart pane"):
                yield Static(id="lat-label", classes="chart-label")
                yield Sparkline([], summary_function=max, id="lat-spark")
        with Horizontal(id="bottom"):
            with Vertical(id="errors-pane", classes="pane"):
                yield RichLog(id="errors", max_lines=200, wrap=True)
            with Vertical(id="log-pane", classes="pane"):
                yield RichLog(id="log", max_lines=1000, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        titles = {
            "#nodes-pane": "Nodes",
            "#models-pane": "Models",
            "#gpus-pane": "GPUs (agents)",
            "#keys-pane": "API keys (requests today / total, as used/quota)",
            "#rps-chart": "Requests / s",
            "#lat-chart": "Latency p50 (ms)",
            "#errors-pane": "Recent errors",
            "#log-pane": "Log",
        }
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.sub_title = self.router_url
        self.query_one("#errors", RichLog).write(Text("warnings and errors of the router show here", style="dim"))
        self._render_all()
        self.set_interval(self.refresh_interval, self.poll)
        self.poll()
        if self.notes:
            self.notify("press t for the demo's commands to try", timeout=20)

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- data --------------------------------------------------------------------------------------

    def poll(self) -> None:
        # One poll at a time: a slow router delays the next one instead of piling requests up.
        if not self._polling:
            self._polling = True
            self._poll()

    @work(group="poll", exit_on_error=False)
    async def _poll(self) -> None:
        try:
            nodes, metrics, events, keys = await asyncio.gather(
                self._fetch_nodes(), self.client.metrics_text(), self._fetch_events(), self._fetch_keys(),
                return_exceptions=True,
            )
            self._take_nodes(nodes)
            if isinstance(metrics, str):
                self.rates.add(parse_metrics(metrics, time.monotonic()))
                self.window = self.rates.header()
            if isinstance(events, dict):
                self._take_events(events)
            if not isinstance(keys, BaseException):
                self._keys = keys  # on an error the last rows stay
            self._render_all()
            self.polls += 1
        finally:
            self._polling = False

    async def _fetch_nodes(self) -> dict[str, Any]:
        if self._admin is not False:
            try:
                doc = await self.client.nodes_document()
                self._admin = True
                return doc
            except APIConnectionError:
                raise
            except MvllmError as exc:
                if exc.status not in (401, 403, 404):
                    raise
                self._admin = False
                self._log_line(Text(f"admin API not available ({exc.message}): read-only view of /load-stats", style="yellow"))
        return await self.client.load_stats()

    async def _fetch_events(self) -> dict[str, Any] | None:
        if not self._admin:
            return None
        limit = _FIRST_EVENTS if self._last_event == 0 else None
        return (await self.client.events(self._last_event, limit)).raw

    async def _fetch_keys(self) -> list[dict[str, Any]] | None:
        """Per-key usage from /admin/keys, asked only when the router has keys (its last /admin/nodes
        said so): None hides the keys panel."""
        auth = (self._doc or {}).get("auth") or {}
        if not self._admin or auth.get("open", True):
            return None
        return list((await self.client.keys()).get("keys") or [])

    def _take_nodes(self, result: object) -> None:
        if isinstance(result, dict):
            self._doc = result
            self.problem = None
            self.fleet = build_fleet(result)
            return
        if isinstance(result, APIConnectionError):
            self.problem = "router unreachable"
        elif isinstance(result, MvllmError):
            self.problem = f"router: {result.message}"
        else:
            self.problem = f"error: {result}"
        if self._doc is not None:
            # Keep the last numbers on screen, every one of them marked stale.
            self.fleet = build_fleet(self._doc)
            for n in self.fleet.nodes:
                n.stale, n.stale_reason = True, self.problem
            self.fleet.totals.stale = len(self.fleet.nodes)

    def _take_events(self, doc: dict[str, Any]) -> None:
        events = doc.get("events") or []
        first, last = doc.get("first"), doc.get("last")
        if isinstance(last, int) and last < self._last_event:
            # The router restarted (its numbering began again): read its events from the start.
            self._log_line(Text("the router restarted", style="yellow"))
            self._last_event = 0
            return
        if self._last_event and isinstance(first, int) and first > self._last_event + 1:
            self._log_line(Text(f"… {first - self._last_event - 1} older event(s) not shown", style="dim"))
        errors = self.query_one("#errors", RichLog)
        for e in events:
            line = event_text(e)
            self._log_line(line)
            if e.get("level") in _WARNING_LEVELS:
                errors.write(line)
        if isinstance(last, int):
            self._last_event = last

    def _log_line(self, line: Text) -> None:
        self.query_one("#log", RichLog).write(line)

    # -- drawing -----------------------------------------------------------------------------------

    def _render_all(self) -> None:
        self.query_one("#totals", Static).update(totals_text(self.router_url, self.fleet, self.window, self.problem))
        fleet = self.fleet
        if fleet is not None:
            self.query_one("#nodes", SyncedTable).sync((n.name, node_cells(n)) for n in fleet.nodes)
            self.query_one("#models", SyncedTable).sync((m.name, model_cells(m)) for m in fleet.models)
            gpus = fleet.gpus
            if gpus:
                rows = [(f"{g.node}/{g.index}", gpu_cells(g)) for g in gpus]
            else:
                none = Text("no agent GPUs", style="dim")
                rows = [("-", (none, *(Text("") for _ in GPU_COLUMNS[1:])))]
            gpus_table = self.query_one("#gpus", SyncedTable)
            gpus_table.sync(rows)
            # Side by side, the two tables get one height (the taller one's), so the boxes line up.
            models_table = self.query_one("#models", SyncedTable)
            height = max(models_table.row_count, gpus_table.row_count) + 1
            for table in (models_table, gpus_table):
                if table.styles.height is None or table.styles.height.value != height:
                    table.styles.height = height
        keys_pane = self.query_one("#keys-pane")
        keys_pane.display = bool(self._keys)
        if self._keys:
            self.query_one("#keys", SyncedTable).sync((str(e.get("name")), key_cells(e)) for e in self._keys)
        rps = list(self.rates.rps_points)
        lat = list(self.rates.p50_points)
        now_rps = f"{self.window.rps:.1f}" if self.window else "–"
        self.query_one("#rps-label", Static).update(
            f"now {now_rps} req/s   peak {max(rps, default=0):.1f}   ({len(rps)}s)"
        )
        p50 = fmt_ms(self.window.p50) if self.window else "–"
        p99 = fmt_ms(self.window.p99) if self.window else "–"
        self.query_one("#lat-label", Static).update(f"p50 {p50}   p99 {p99}   peak p50 {max(lat, default=0):.0f} ms")
        self.query_one("#rps-spark", Sparkline).data = rps or [0.0]
        self.query_one("#lat-spark", Sparkline).data = lat or [0.0]

    def screen_text(self) -> str:
        """The screen as plain text, as the SVG screenshot shows it (tests and bug reports)."""
        width, height = self.size
        console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False)
        console.print(self.screen._compositor.render_update(full=True, screen_stack=self._background_screens))
        return console.export_text()

    # -- actions -----------------------------------------------------------------------------------

    def _selected_node(self) -> str | None:
        return self.query_one("#nodes", SyncedTable).selected_key

    def _selected_model(self) -> str | None:
        return self.query_one("#models", SyncedTable).selected_key

    def action_drain(self) -> None:
        name = self._selected_node()
        node = self.fleet.node(name) if self.fleet and name else None
        if node is None:
            self.notify("select a node first", severity="warning")
            return
        if node.draining and node.drained_by == "admin":
            self._act(f"undrain {name}", lambda: self.client.undrain(name), f"node {name} takes requests again")
        else:
            self._act(f"drain {name}", lambda: self.client.drain(name), f"node {name} drained: no new requests go there")

    def action_model(self, action: str, level: int | None = None) -> None:
        model = self._selected_model()
        if not model:
            self.notify("select a model first (tab to the models table)", severity="warning")
            return
        name = self._selected_node()
        node = self.fleet.node(name) if self.fleet and name else None
        target = node.name if node is not None and node.is_agent else None
        where = f" on {target}" if target else " (the router picks the agent)"
        level = level if action == "sleep" else None
        label = f"{action} {model}{where}" + (f" level {level}" if level else "")
        self.notify(f"{label}…")
        self._act(
            label,
            lambda: self.client.model_action(action, model, node=target, level=level, timeout=MODEL_ACTION_TIMEOUT_S),
            f"{label}: done",
        )

    def action_reload(self) -> None:
        self._act("reload", self.client.reload, "config reloaded")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_try_it(self) -> None:
        if self.notes:
            self.push_screen(TryItScreen(self.notes))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The t key (and its footer entry) exists only where there is something to try.
        return bool(self.notes) if action == "try_it" else True

    async def action_quit(self) -> None:
        in_flight = await self._in_flight_now()
        if in_flight > 0:

            def answer(ok: bool | None) -> None:
                if ok:
                    self.exit()

            self.push_screen(ConfirmQuit(in_flight, self.embedded), answer)
            return
        self.exit()

    async def _in_flight_now(self) -> int:
        """Requests in flight right now (the screen's numbers may be a second old). When the router
        does not answer in time (a busy router is when it matters most), the last poll's count
        stands in; 0 only when there has been no poll."""
        try:
            doc = await asyncio.wait_for(self._fetch_nodes(), timeout=QUIT_CHECK_S)
        except (MvllmError, asyncio.TimeoutError):
            return self.fleet.totals.in_flight if self.fleet else 0
        return build_fleet(doc).totals.in_flight

    @work(group="action", exit_on_error=False)
    async def _act(self, label: str, call: Callable[[], Awaitable[Any]], done: str) -> None:
        try:
            result = await call()
        except APIConnectionError as exc:
            self.notify(f"{label}: {exc}", severity="error", timeout=10)
            return
        except MvllmError as exc:
            self.notify(f"{label}: {exc.message}", severity="error", timeout=10)
            self._log_line(Text(f"{label} failed: {exc.message}", style="bold red"))
            return
        message = done
        said = result.get("message") if isinstance(result, dict) else getattr(result, "message", None)
        if isinstance(said, str) and said:
            message = f"{done} ({said})"
        self.notify(message)
        self._log_line(Text(message, style="green"))
        self.poll()


@contextlib.contextmanager
def console_logging_paused() -> Iterator[None]:
    """While the dashboard owns the terminal, log lines must not be written to it: the root
    logger's console handlers are set aside (the log pane shows the same events) and restored."""
    root = logging.getLogger()
    consoles = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for h in consoles:
        root.removeHandler(h)
    # Keeps Python's last-resort handler (stderr) from printing records nobody else takes.
    quiet = logging.NullHandler()
    root.addHandler(quiet)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        for h in consoles:
            root.addHandler(h)


async def run_dashboard(
    router_url: str,
    *,
    key: str | None = None,
    embedded: bool = False,
    stop: asyncio.Event | None = None,
    notes: str | None = None,
) -> None:
    """Run the dashboard in the current event loop until q (or `stop` is set)."""
    app = DashboardApp(router_url, key=key, embedded=embedded, notes=notes)
    with console_logging_paused():
        task = asyncio.ensure_future(app.run_async())
        if stop is None:
            await task
            return
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            app.exit()
            await task
