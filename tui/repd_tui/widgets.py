"""The dashboard's building blocks: a label/value grid, a confirm dialog, table sync, formatting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, DataTable, Static

from repd.textsafe import printable

# -- formatting ----------------------------------------------------------------------------


def fmt_count(n: int) -> str:
    """An integer with thousands separators: ``12,345``."""
    return f"{n:,}"


def fmt_rate(per_s: float) -> str:
    """A throughput with one decimal below 100 and none above: ``7.5``, ``1,234``."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.1f}"


def fmt_duration(seconds: float) -> str:
    """A duration as its two largest units: ``45s``, ``3m 07s``, ``2h 05m``, ``4d 01h``."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def fmt_when(iso: str) -> str:
    """An API timestamp as local ``YYYY-MM-DD HH:MM``; unparsable text is shown as is."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(iso)


def one_line(text: str, width: int) -> str:
    """The first non-blank line of ``text`` with whitespace collapsed, cut to ``width``."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    flat = " ".join(first.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# -- widgets -------------------------------------------------------------------------------


class KeyValueGrid(Widget):
    """Labels beside values, laid out as a grid by the stylesheet.

    Values are plain text (never markup: they hold paths and daemon messages). Each value
    widget gets the id ``{grid id}-{key}`` so tests and styles can address it.
    """

    def __init__(
        self, rows: Sequence[tuple[str, str]], *, id: str, classes: str | None = None
    ) -> None:
        """``rows`` are (key, label) pairs, shown in order."""
        super().__init__(id=id, classes=classes)
        self._rows = list(rows)

    def compose(self) -> ComposeResult:
        """One label and one value widget per row."""
        for key, label in self._rows:
            yield Static(label, classes="kv-label", markup=False)
            yield Static("–", id=self._value_id(key), classes="kv-value", markup=False)

    def set(self, key: str, value: str, *, flag: str | None = None) -> None:
        """Show ``value`` for ``key``; ``flag`` names a CSS class (a colour), replacing the last."""
        cell = self.query_one(f"#{self._value_id(key)}", Static)
        value = printable(value)  # paths and daemon messages: no raw control characters
        # Status arrives every second, mostly unchanged; an update would re-layout anyway.
        if cell.content != value:
            cell.update(value)
        for old in [c for c in cell.classes if c.startswith("-flag-")]:
            cell.remove_class(old)
        if flag:
            cell.add_class(f"-flag-{flag}")

    def value(self, key: str) -> str:
        """The text now shown for ``key``."""
        return str(self.query_one(f"#{self._value_id(key)}", Static).content)

    def _value_id(self, key: str) -> str:
        return f"{self.id}-{key}"


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only on an explicit yes."""

    BINDINGS = [  # noqa: RUF012 - Textual's own declaration style
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, yes_label: str = "Yes") -> None:
        """``question`` is plain text; ``yes_label`` names what yes does."""
        super().__init__()
        self._question = question
        self._yes_label = yes_label

    def compose(self) -> ComposeResult:
        """The question above two buttons."""
        with Vertical(id="confirm-dialog"):
            yield Static(self._question, id="confirm-question", markup=False)
            with Horizontal(id="confirm-buttons"):
                yield Button(f"{self._yes_label} (y)", variant="warning", id="confirm-yes")
                yield Button("Cancel (n)", id="confirm-no")

    def on_mount(self) -> None:
        """Focus Cancel, so a stray Enter does not confirm."""
        self.query_one("#confirm-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        """A button answers the question."""
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        """Key y or n answers the question."""
        self.dismiss(yes)


# -- tables --------------------------------------------------------------------------------

Cells = Sequence[str | Text]


def sync_rows(table: DataTable[str | Text], rows: Mapping[str, Cells]) -> None:
    """Make ``table`` show ``rows`` (row key -> cells, in order), touching only what changed.

    Updating cells in place, rather than clearing, keeps the cursor and scroll position
    steady while the daemon's counters tick every second.
    """
    keys = list(rows)
    current = [str(key.value) for key in table.rows]
    if keys != current:
        table.clear()
        for key, cells in rows.items():
            table.add_row(*cells, key=key)
        return
    columns = list(table.columns)
    for key, cells in rows.items():
        old = table.get_row(key)
        for column, old_cell, new_cell in zip(columns, old, cells, strict=True):
            if old_cell != new_cell:
                table.update_cell(key, column, new_cell)


def cell(value: object, *, right: bool = False) -> Text:
    """A table cell as literal text (DataTable would read a str as markup), with control
    characters made visible: paths and snippets are anyone's data."""
    return Text(printable(value), justify="right" if right else "left")
