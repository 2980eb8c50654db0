"""The dashboard's building blocks: grids, fitted tables, the chunk view, dialogs, formatting."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath
from typing import ClassVar

from rich.cells import cell_len
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult, RenderResult
from textual.binding import Binding, BindingType
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
    """A throughput with one decimal below 100 and none above: ``7.5``, ``1,234``; ``0``."""
    if per_s <= 0:
        return "0"
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


def fit(text: str, width: int, *, keep_end: bool = False) -> str:
    """``text`` cut to ``width`` terminal cells with an ellipsis; ``keep_end`` keeps the tail
    (for paths, whose file name matters most)."""
    if width <= 0:
        return ""
    if cell_len(text) <= width:
        return text
    chars = reversed(text) if keep_end else iter(text)
    kept: list[str] = []
    used = 0
    for ch in chars:
        size = cell_len(ch)
        if used + size > width - 1:
            break
        kept.append(ch)
        used += size
    body = "".join(reversed(kept)) if keep_end else "".join(kept)
    return "…" + body if keep_end else body + "…"


# -- opening a file in an editor -----------------------------------------------------------

# Editors that take ``+LINE PATH`` (vi's convention, followed by most terminal editors).
_PLUS_LINE = frozenset(
    "vi vim nvim gvim mvim view vis nano pico emacs emacsclient micro kak hx helix joe jed "
    "mg ne ed ex elvis nvi".split()
)
# Editors that take ``-g PATH:LINE`` (VS Code and its forks).
_DASH_G = frozenset("code code-insiders codium vscodium code-oss cursor windsurf".split())
# Editors that take ``PATH:LINE``.
_COLON_LINE = frozenset("subl sublime_text zed zeditor".split())
# Editors that draw a window of their own: the dashboard need not give up the terminal.
_GRAPHICAL = _DASH_G | _COLON_LINE | frozenset({"gvim", "mvim", "xdg-open"})


@dataclass(frozen=True)
class EditorCommand:
    """How to open a file at a line: the argv, and whether it needs the terminal."""

    argv: list[str]
    terminal: bool


def editor_command(editor: str | None, path: str, line: int) -> EditorCommand:
    """The command that opens ``path`` at ``line`` with ``editor`` (``$VISUAL``/``$EDITOR``,
    which may carry arguments), or with ``xdg-open`` (no line) when there is none."""
    argv = shlex.split(editor) if editor and editor.strip() else []
    if not argv:
        return EditorCommand(["xdg-open", path], terminal=False)
    name = PurePath(argv[0]).name.lower().removesuffix(".exe")
    if name in _DASH_G:
        args = [*argv, "-g", f"{path}:{line}"]
    elif name in _COLON_LINE:
        args = [*argv, f"{path}:{line}"]
    elif name in _PLUS_LINE:
        args = [*argv, f"+{line}", path]
    else:
        args = [*argv, path]  # an editor we do not know: the file, without guessing a syntax
    return EditorCommand(args, terminal=name not in _GRAPHICAL)


# -- widgets -------------------------------------------------------------------------------


class KeyValueGrid(Widget):
    """Labels beside values, laid out as a grid by the stylesheet.

    Values are plain text (never markup: they hold paths and daemon messages). Each value
    widget gets the id ``{grid id}-{key}`` so tests and styles can address it.
    """

    def __init__(
        self,
        rows: Sequence[tuple[str, str]],
        *,
        id: str,
        classes: str | None = None,
        hidden: Sequence[str] = (),
    ) -> None:
        """``rows`` are (key, label) pairs, shown in order; ``hidden`` rows start hidden."""
        super().__init__(id=id, classes=classes)
        self._rows = list(rows)
        self._hidden = set(hidden)

    def compose(self) -> ComposeResult:
        """One label and one value widget per row."""
        for key, label in self._rows:
            shown = key not in self._hidden
            label_widget = Static(label, classes="kv-label", markup=False)
            label_widget.display = shown
            value = Static("–", id=self._value_id(key), classes="kv-value", markup=False)
            value.display = shown
            yield label_widget
            yield value

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

    def show_row(self, key: str, shown: bool) -> None:
        """Show or hide the row ``key`` (label and value)."""
        value = self.query_one(f"#{self._value_id(key)}", Static)
        if value.display == shown:
            return
        self._label_cell(key).display = shown
        value.display = shown

    def relabel(self, key: str, label: str) -> None:
        """Name the row ``key`` ``label`` from now on."""
        cell = self._label_cell(key)
        if str(cell.content) != label:
            cell.update(label)

    def label(self, key: str) -> str:
        """The label now shown for ``key``."""
        return str(self._label_cell(key).content)

    def _label_cell(self, key: str) -> Static:
        # Children alternate label, value (see compose), in the order of the rows.
        index = [k for k, _ in self._rows].index(key)
        cell = self.children[2 * index]
        assert isinstance(cell, Static)
        return cell

    def value(self, key: str) -> str:
        """The text now shown for ``key``."""
        return str(self.query_one(f"#{self._value_id(key)}", Static).content)

    def _value_id(self, key: str) -> str:
        return f"{self.id}-{key}"


class Panel(Vertical, can_focus=True):
    """A bordered group of values that Tab (and its own key) can reach: focusing it
    scrolls it into view where the dashboard is taller than the terminal."""


@dataclass(frozen=True)
class Col:
    """A column of a :class:`FitTable`.

    Its width is that of its widest cell (or label), at most ``share`` of the table's
    width; when the columns do not fit, those with ``shrink`` give way (highest first),
    down to ``min``; then the ``fill`` column gives way too, down to its ``min``.
    """

    key: str
    label: str
    min: int = 1
    share: float = 1.0
    shrink: int = 0
    fill: bool = False
    right: bool = False
    keep_end: bool = False


def fit_widths(cols: Sequence[Col], rows: Sequence[Sequence[str]], available: int) -> list[int]:
    """Width of each column so that all of them fit in ``available`` cells (without padding)
    where the columns' minimums allow it."""
    widths: list[int] = []
    for i, col in enumerate(cols):
        natural = max([cell_len(col.label), *(cell_len(r[i]) for r in rows)])
        cap = max(col.min, int(available * col.share))
        widths.append(max(min(natural, cap), min(col.min, natural)))
    over = sum(widths) - available
    for i in sorted((i for i, c in enumerate(cols) if c.shrink), key=lambda i: -cols[i].shrink):
        if over <= 0:
            break
        give = min(over, widths[i] - min(cols[i].min, widths[i]))
        widths[i] -= give
        over -= give
    for i, col in enumerate(cols):
        if col.fill and over > 0:
            widths[i] = max(min(col.min, widths[i]), widths[i] - over)
    return widths


class FitTable(DataTable[Text]):
    """A table whose columns fit its content and its width, re-fitted when either changes.

    Cells are plain text (sanitised, never markup), cut with an ellipsis to their
    column's width; rows are keyed, and the cursor stays on its row across updates.
    """

    def __init__(self, columns: Sequence[Col], **kwargs: object) -> None:
        """``columns`` in order; other arguments go to DataTable."""
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.specs = list(columns)
        self._rows: dict[str, list[str]] = {}
        self._shown: tuple[list[int], list[str]] | None = None

    def set_rows(self, rows: Mapping[str, Sequence[object]]) -> None:
        """Show ``rows`` (row key -> cell values, in column order), touching only what changed."""
        self._rows = {key: [printable(v) for v in values] for key, values in rows.items()}
        self._refit()

    def row_values(self, key: str) -> list[str]:
        """The full (uncut) cell texts of row ``key``."""
        return list(self._rows[key])

    @property
    def highlighted_key(self) -> str | None:
        """The key of the row under the cursor, if any."""
        if not self.row_count or not 0 <= self.cursor_row < self.row_count:
            return None
        key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value
        return None if key is None else str(key)

    def on_resize(self, _: events.Resize) -> None:
        """Fit the columns to the new width."""
        self._refit()

    def _available(self) -> int:
        # size: inside the border and padding, scrollbars included.
        width = self.size.width
        if len(self._rows) + (1 if self.show_header else 0) > self.size.height:
            width -= self.styles.scrollbar_size_vertical
        return width - 2 * self.cell_padding * len(self.specs)

    def _refit(self) -> None:
        if not self.size.width:
            return  # not laid out yet: the first resize fits it
        values = list(self._rows.values())
        widths = fit_widths(self.specs, values, self._available())
        keys = list(self._rows)
        cells = {
            key: [
                Text(
                    fit(v, w, keep_end=c.keep_end),
                    justify="right" if c.right else "left",
                    no_wrap=True,
                    overflow="ellipsis",
                )
                for v, w, c in zip(row, widths, self.specs, strict=True)
            ]
            for key, row in self._rows.items()
        }
        if self._shown is not None and self._shown == (widths, keys):
            columns = list(self.columns)
            for key, row_cells in cells.items():
                for column, old, new in zip(columns, self.get_row(key), row_cells, strict=True):
                    if old != new:
                        self.update_cell(key, column, new)
            return
        current = self.highlighted_key
        scroll_y = self.scroll_y
        self.clear(columns=True)
        for col, width in zip(self.specs, widths, strict=True):
            self.add_column(Text(col.label, justify="right" if col.right else "left"),
                            width=width, key=col.key)
        for key, row_cells in cells.items():
            self.add_row(*row_cells, key=key)
        self._shown = (widths, keys)
        if current in self._rows:
            self.move_cursor(row=keys.index(current), animate=False, scroll=False)
            self.scroll_to(y=scroll_y, animate=False)


def _expand_tabs(line: str, size: int = 4) -> str:
    """``line`` with control characters made visible and tabs as spaces to the next stop,
    counted on the line as shown (an escaped ``\\x1b`` is four columns)."""
    out = ""
    parts = line.split("\t")
    for i, part in enumerate(parts):
        out += printable(part)
        if i < len(parts) - 1:
            out += " " * (size - cell_len(out) % size)
    return out


class ChunkView(Static):
    """A chunk of a file: its lines, numbered, long ones wrapped under their number.

    ``content`` holds the same text as plain lines (``12 │ text``), for tests and copy.
    """

    COMPONENT_CLASSES: ClassVar[set[str]] = {"chunk--lineno", "chunk--note"}

    def __init__(self, text: str, **kwargs: object) -> None:
        """Start with the plain ``text`` (a hint)."""
        super().__init__(text, markup=False, **kwargs)  # type: ignore[arg-type]
        self._first: int | None = None
        self._lines: list[str] = []
        self._note: str | None = None

    @property
    def lines(self) -> list[str]:
        """The (sanitised) lines shown."""
        return list(self._lines)

    @property
    def first_line(self) -> int | None:
        """The number of the first line shown; None when the lines are not numbered."""
        return self._first

    @property
    def note(self) -> str | None:
        """The remark above the lines (why the file could not be read...), if any."""
        return self._note

    def show_lines(self, first: int | None, lines: Sequence[str], note: str | None = None) -> None:
        """Show ``lines`` numbered from ``first`` (None: not numbered), under ``note``."""
        self._first = first
        self._lines = [_expand_tabs(line) for line in lines]
        self._note = printable(note) if note else None
        plain = [self._note] if self._note else []
        if first is None:
            plain += self._lines
        else:
            plain += [f"{first + i} │ {line}" for i, line in enumerate(self._lines)]
        self.update("\n".join(plain))

    def show_text(self, text: str) -> None:
        """Show one message instead of lines."""
        self._first, self._lines, self._note = None, [], None
        self.update(printable(text))

    def render(self) -> RenderResult:
        """The numbered lines as a two-column grid, so wrapped lines keep their indent."""
        if not self._lines and not self._note:
            return super().render()
        parts: list[RenderableType] = []
        if self._note:
            parts.append(Text(self._note, style=self.get_component_rich_style("chunk--note")))
        grid = Table.grid(padding=(0, 1), expand=True)
        if self._first is None:
            grid.add_column(overflow="fold", ratio=1)
            for line in self._lines:
                grid.add_row(Text(line))
        else:
            number_style = self.get_component_rich_style("chunk--lineno")
            grid.add_column(justify="right", no_wrap=True)
            grid.add_column(overflow="fold", ratio=1)
            for i, line in enumerate(self._lines):
                grid.add_row(Text(str(self._first + i), style=number_style), Text(line))
        parts.append(grid)
        return Group(*parts)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only on an explicit yes."""

    BINDINGS: ClassVar[list[BindingType]] = [
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


class HelpScreen(ModalScreen[None]):
    """The list of keys; any of ?, escape, q or enter closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark,escape,q,enter", "close", "Close"),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"help--key"}

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        """``keys`` are (key, what it does) pairs, shown in order."""
        super().__init__()
        self._keys = list(keys)

    def compose(self) -> ComposeResult:
        """A two-column list in a box."""
        with Vertical(id="help-dialog"):
            yield Static("", id="help-keys")
            yield Static("? or Esc closes this", id="help-hint", markup=False)

    def on_mount(self) -> None:
        """Title the box and fill in the keys (styled by the stylesheet's ``help--key``)."""
        self.query_one("#help-dialog").border_title = "Keys"
        key_style = self.get_component_rich_style("help--key")
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for key, what in self._keys:
            grid.add_row(Text(key, style=key_style), Text(what))
        self.query_one("#help-keys", Static).update(grid)

    @property
    def text(self) -> str:
        """The keys as plain text, one ``key  what`` a line."""
        return "\n".join(f"{key}  {what}" for key, what in self._keys)

    def action_close(self) -> None:
        """Back to the dashboard."""
        self.dismiss(None)
