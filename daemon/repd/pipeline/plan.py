"""Turns one changed file into a plan: read, hash, extract, chunk, and the points it wants."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from repd.adapters.extract import extract_bytes, read_file
from repd.core.chunking import chunk_document
from repd.core.identity import StatSig, content_hash, point_id
from repd.core.types import Chunk, SkipFile


@dataclass
class FilePlan:
    """What should become of one file: new chunks, a skip with a reason, or removal."""

    root: str
    relpath: str
    sig: StatSig
    started_ns: int
    action: str  # "index" | "skip" | "fail" | "delete" | "touch"
    content_hash: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    point_ids: list[str] = field(default_factory=list)
    reason: str | None = None
    detail: str | None = None


ZERO_SIG = StatSig(0, 0, 0, 0)


class Planner:
    """Reads and chunks files; needs a token counter only when a file really changed."""

    def __init__(self, max_file_bytes: int,
                 tokenizer: Callable[[], tuple[Callable[[list[str]], list[int]], int]]) -> None:
        self._max_bytes = max_file_bytes
        self._tokenizer = tokenizer

    def plan(self, root: Path, relpath: str, known_hash: str | None,
             known_state: str | None) -> FilePlan:
        """Plan one file that exists (or existed a moment ago) at ``root/relpath``."""
        root_s = str(root)
        started = time.time_ns()
        path = root / relpath
        try:
            st = path.stat()
        except FileNotFoundError:
            return FilePlan(root_s, relpath, ZERO_SIG, started, "delete")
        except OSError as exc:
            return FilePlan(root_s, relpath, ZERO_SIG, started, "skip", reason="unreadable",
                            detail=exc.strerror or str(exc))
        sig = StatSig.of(st)
        try:
            data = read_file(path, self._max_bytes)
        except SkipFile as skip:
            if skip.reason == "vanished":
                return FilePlan(root_s, relpath, ZERO_SIG, started, "delete")
            return FilePlan(root_s, relpath, sig, started, "skip", reason=skip.reason,
                            detail=skip.detail)
        digest = content_hash(data)
        if digest == known_hash and known_state in ("indexed", "skipped"):
            return FilePlan(root_s, relpath, sig, started, "touch", content_hash=digest)
        try:
            doc = extract_bytes(data, os.path.basename(relpath))
            count, max_tokens = self._tokenizer()
            chunks = chunk_document(doc, count, max_tokens)
        except SkipFile as skip:
            return FilePlan(root_s, relpath, sig, started, "skip", content_hash=digest,
                            reason=skip.reason, detail=skip.detail)
        except Exception as exc:  # one bad file must never stop the run
            return FilePlan(root_s, relpath, sig, started, "fail", content_hash=digest,
                            reason="extract_error", detail=f"{type(exc).__name__}: {exc}")
        if not chunks:
            return FilePlan(root_s, relpath, sig, started, "skip", content_hash=digest,
                            reason="empty", detail="no text to index")
        ids = [point_id(root_s, relpath, c.ordinal, c.hash) for c in chunks]
        return FilePlan(root_s, relpath, sig, started, "index", content_hash=digest,
                        chunks=chunks, point_ids=ids)
