"""Terminal output of one-shot commands: the progress line and the closing summary."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """A single self-rewriting progress line on stderr (only on a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._label = ""

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
        sys.stderr.write(
            f"\r[{bar}] {int(done)}/{total} files  {stats.chunks_embedded} embedded  "
            f"{stats.chunks_reused} reused  {rate:.1f} files/s  eta {eta:.0f}s ")
        sys.stderr.flush()

    def finish(self) -> None:
        """End the line."""
        if self.enabled:
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
