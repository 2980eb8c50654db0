"""Terminal output of one-shot commands: the progress line, result lines, the summary."""

from __future__ import annotations

import os
import sys
import time
import unicodedata

#: typing.TYPE_CHECKING without importing typing (2 ms of every `repd query`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ELLIPSIS = "…"
#: A snippet shorter than this is left out rather than shown as a stub.
MIN_SNIPPET_COLS = 8


def char_width(ch: str) -> int:
    """Columns a character takes on a terminal: 2 for wide (CJK), 0 for combining marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    """Columns ``text`` takes on a terminal."""
    return sum(char_width(ch) for ch in text)


def fit(text: str, cols: int) -> str:
    """``text`` cut to at most ``cols`` columns, ending in "…" when it was cut."""
    if text_width(text) <= cols:
        return text
    if cols <= 0:
        return ""
    out: list[str] = []
    used = 0
    budget = cols - 1  # the ellipsis takes one column
    for ch in text:
        w = char_width(ch)
        if used + w > budget:
            break
        out.append(ch)
        used += w
    return "".join(out).rstrip() + ELLIPSIS


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing shutil (which brings the
    compression modules along: 2 ms of every command): ``COLUMNS`` when it is a positive
    number, else the width of the terminal on stdout, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


def output_width(requested: int | None, stream: Any = None) -> int | None:
    """Columns to fit result lines to: ``--width N``, else the terminal's (``COLUMNS``
    counts, as shutil reads it), else None (a pipe or a file gets whole lines)."""
    if requested is not None:
        return max(requested, 1)
    out = stream if stream is not None else sys.stdout
    try:
        tty = out.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        return None
    return terminal_columns()


def hit_line(rank: int, score: float, where: str, snippet: str, width: int | None) -> str:
    """One ``repd query`` result: rank, score, ``path:line`` and as much snippet as fits.

    The location is never cut (it is what a person copies); the snippet is shortened
    with "…", and left out when too little room is left for it to say anything.
    """
    head = f"{rank:>3}  {score:.3f}  {where}"
    if width is None:
        return f"{head}  {snippet}" if snippet else head
    room = width - text_width(head) - 2
    if room < min(MIN_SNIPPET_COLS, text_width(snippet)) or not snippet:
        return head
    return f"{head}  {fit(snippet, room)}"


class Progress:
    """A single self-rewriting progress line on stderr (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._label = ""
        self._drawn = 0

    def start(self, label: str) -> None:
        """Begin a new root."""
        self._label = label
        self._t0 = time.perf_counter()

    def update(self, done: float, total: int, stats: Any) -> None:
        """Redraw the line; ``done`` may be fractional while a long group embeds."""
        if not self.enabled or total == 0:
            return
        width = 24
        filled = int(width * done / total)
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] {int(done)}/{total} files  {stats.chunks_embedded} embedded  "
                f"{stats.chunks_reused} reused  {rate:.1f} files/s"
                + (f"  eta {eta:.0f}s" if eta >= 1 else ""))
        # A line longer than the terminal wraps, and "\r" then redraws only its last row.
        cols = terminal_columns()
        sys.stderr.write("\r" + fit(line, cols - 1).ljust(min(self._drawn, cols - 1)))
        self._drawn = text_width(line)
        sys.stderr.flush()

    def finish(self) -> None:
        """End the line."""
        if self.enabled:
            self._drawn = 0
            sys.stderr.write("\n")
            sys.stderr.flush()


def print_summary(stats: Any, device: str | None) -> None:
    """The closing summary of ``repd index``."""
    skipped = sum(stats.skipped.values())
    print(f"repd: {stats.seen} files seen in {stats.seconds:.1f} s"
          + (f" on {device}" if device else ""))
    print(f"  indexed    {stats.indexed}")
    print(f"  unchanged  {stats.unchanged}")
    print(f"  deleted    {stats.deleted}")
    print(f"  failed     {stats.failed}")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items()))
    print(f"  skipped    {skipped}" + (f" ({reasons})" if reasons else ""))
    print(f"  chunks     {stats.chunks_embedded} embedded, {stats.chunks_reused} reused")
    print(f"  points     {stats.points_written} written, {stats.points_deleted} deleted")
    if skipped or stats.failed:
        print("  see `repd files` for each skipped or failed file and its reason")
