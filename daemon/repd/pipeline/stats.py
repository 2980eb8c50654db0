"""What one scan, batch or backfill step did: the figures the CLI and status report."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    """What one scan or batch did, for the CLI summary and the daemon's status."""

    seen: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    chunks_embedded: int = 0
    chunks_reused: int = 0
    points_written: int = 0
    points_deleted: int = 0
    seconds: float = 0.0

    def add(self, other: RunStats) -> None:
        """Accumulate another run's figures."""
        for name in ("seen", "indexed", "unchanged", "deleted", "failed", "chunks_embedded",
                     "chunks_reused", "points_written", "points_deleted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.update(other.skipped)
        self.seconds += other.seconds

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        d = {k: v for k, v in self.__dict__.items() if k != "skipped"}
        d["skipped"] = dict(self.skipped)
        return d
