"""The query path: embed the question, search the active generation, filter, shape hits."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from repd.adapters.store import Store
from repd.core.globs import literal_prefix, match_path

# Over-fetch when a glob filters in Python, so k hits still come back.
_GLOB_OVERFETCH = 8


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One result as the CLI, the API and the dashboard show it."""

    rank: int
    score: float
    root: str
    path: str
    start_line: int
    end_line: int
    text: str

    @property
    def snippet(self) -> str:
        """The chunk on one line (a Markdown breadcrumb reads as its context), shortened."""
        flat = " ".join(self.text.split())
        return flat if len(flat) <= 160 else flat[:157] + "..."

    def as_dict(self) -> dict[str, Any]:
        """Wire form."""
        return {"rank": self.rank, "score": round(self.score, 6), "root": self.root,
                "path": self.path, "start_line": self.start_line, "end_line": self.end_line,
                "snippet": self.snippet}


def search(store: Store, embed_query: Callable[[str], Sequence[float]], text: str, k: int,
           path_glob: str | None = None, root: str | None = None,
           per_file: bool = False) -> tuple[list[SearchHit], float]:
    """Top ``k`` chunks for ``text`` (or, with ``per_file``, the best chunk of each of the
    top ``k`` files); returns hits and the time taken in milliseconds."""
    t0 = time.perf_counter()
    vector = embed_query(text)
    prefix = literal_prefix(path_glob) if path_glob else None
    limit = k * _GLOB_OVERFETCH if path_glob or per_file else k
    raw = store.search(vector, limit, root=root, path_prefix=prefix or None)
    hits: list[SearchHit] = []
    seen: set[tuple[str, str]] = set()
    for h in raw:
        p = h.payload
        if path_glob and not match_path(path_glob, str(p.get("path", ""))):
            continue
        if per_file:
            key = (str(p.get("root", "")), str(p.get("path", "")))
            if key in seen:
                continue
            seen.add(key)
        hits.append(SearchHit(len(hits) + 1, h.score, str(p.get("root", "")),
                              str(p.get("path", "")), int(p.get("start_line", 0)),
                              int(p.get("end_line", 0)), str(p.get("text", ""))))
        if len(hits) == k:
            break
    return hits, (time.perf_counter() - t0) * 1000
