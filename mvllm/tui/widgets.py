"""Dashboard widgets: a table updated row by row in place (no flicker, cursor kept), the help
screen and the quit confirmation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Static


class SyncedTable(DataTable):
    """A DataTable whose rows follow a list of (key, cells): changed cells are updated in place,
    new rows appended, vanished rows removed; the cursor stays on its row."""

    def __init__(self, columns: Sequence[str], **kw: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)  # type: ignore[arg-type]
        self._column_names = tuple(columns)
        self._cells: dict[str, tuple[Text, ...]] = {}

    def on_mount(self) -> None:
        for name in self._column_names:
            self.add_column(name.upper(), key=name)

    def sync(self, rows: Iterable[tuple[str, tuple[Text, ...]]]) -> None:
        wanted = dict(rows)
        for key in [k for k in self._cells if k not in wanted]:
            self.remove_row(key)
            del self._cells[key]
        for key, cells in wanted.items():
            old = self._cells.get(key)
            if old is None:
                self.add_row(*cells, key=key)
            else:
                for name, new, was in zip(self._column_names, cells, old, strict=True):
                    if not _same(new, was):
                        self.update_cell(key, name, new, update_width=True)
            self._cells[key] = cells

    @property
    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0))
        except Exception:  # the cursor is beyond the rows while they change
            return None
        return row_key.value

    def select_key(self, key: str) -> bool:
        if key not in self._cells:
            return False
        self.move_cursor(row=self.get_row_index(key))
        return True

    def cell_text(self, key: str, column: str) -> str:
        """The plain text shown in one cell (for tests and the status line)."""
        cells = self._cells.get(key)
        if cells is None:
            raise KeyError(key)
        return cells[self._column_names.index(column)].plain


def _same(a: Text, b: Text) -> bool:
    # Text's own == ignores the base style (a stale cell may differ from a fresh one only by it).
    return a.plain == b.plain and a.style == b.style and a.spans == b.spans


HELP = """\
[b]mvllm dashboard[/b] — keys

  [b]d[/b]        drain / undrain the selected node
  [b]l[/b]        load the selected model (on the selected agent)
  [b]u[/b]        unload the selected model (on the selected agent)
  [b]s[/b]        sleep the selected model (its own level; [b]S[/b]: level 2)
  [b]w[/b]        wake the selected model
  [b]r[/b]        reload servers.toml now
  [b]tab[/b]      next pane (nodes, models, GPUs, logs)
  [b]↑ ↓[/b]      select a row
  [b]t[/b]        the demo's commands to try (in the demo only)
  [b]?[/b]        this help
  [b]q[/b]        quit (asks when requests are in flight)

Numbers marked [yellow]?[/yellow] are stale: the router has not read
that node's load recently (down, or not answering /metrics).
Without a selected agent node, the router picks the agent.

[dim]escape or ? to close[/dim]"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [  # noqa: RUF012 - Textual's declaration style
        Binding("escape", "dismiss", "close"),
        Binding("question_mark", "dismiss", "close"),
        Binding("q", "dismiss", "close"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help-box")


class TryItScreen(ModalScreen[None]):
    """The demo's "try it" lines (the banner printed before the dashboard took the screen)."""

    BINDINGS = [  # noqa: RUF012 - Textual's declaration style
        Binding("escape", "dismiss", "close"),
        Binding("t", "dismiss", "close"),
        Binding("q", "dismiss", "close"),
    ]

    def __init__(self, notes: str) -> None:
        super().__init__()
        self.notes = notes

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="try-box"):
            yield Static(Text(self.notes.strip("\n") + "\n"))
            yield Static(Text("escape or t to close", style="dim"))


class ConfirmQuit(ModalScreen[bool]):
    """Asked when requests are in flight: quitting stops the router under them."""

    BINDINGS = [  # noqa: RUF012
        Binding("y", "answer(True)", "quit"),
        Binding("n", "answer(False)", "stay"),
        Binding("escape", "answer(False)", "stay"),
    ]

    def __init__(self, in_flight: int, embedded: bool) -> None:
        super().__init__()
        self.in_flight = in_flight
        self.embedded = embedded

    def compose(self) -> ComposeResult:
        what = (
            "Quitting stops the router: they get a few seconds to finish."
            if self.embedded
            else "This only closes the dashboard; the router keeps serving."
        )
        with Vertical(id="confirm-box"):
            yield Static(f"[b]{self.in_flight} request(s) in flight.[/b]\n{what}\n\nQuit? [b]y[/b] / [b]n[/b]")
            with Horizontal(id="confirm-buttons"):
                yield Button("Quit", variant="error", id="yes")
                yield Button("Stay", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)
