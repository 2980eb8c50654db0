"""Plain value types shared by the pure core, the adapters and the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Document:
    """Text extracted from one file, ready to be chunked.

    ``kind`` is one of ``text``, ``markdown``, ``rst``, ``code``, ``html``, ``pdf``.
    ``language`` names the programming language for ``code`` (``python``, ``rust``...).
    Line numbers of chunks refer to ``text``'s lines (for PDF and HTML, the extracted
    text's lines, since the source has none a person could jump to).
    """

    text: str
    kind: str
    language: str | None = None
    encoding: str = "utf-8"


@dataclass(frozen=True, slots=True)
class Chunk:
    """One embeddable piece of a document.

    ``text`` is exactly what gets embedded (it may carry a heading breadcrumb that
    the source lines do not); ``hash`` is the hex sha256 of ``text``, so equal texts
    share a vector under one model. Lines are 1-based and inclusive.
    """

    ordinal: int
    text: str
    start_line: int
    end_line: int
    hash: str


@dataclass(frozen=True, slots=True)
class SparseVec:
    """A sparse vector: term ids (ascending, distinct) and their weights."""

    indices: list[int]
    values: list[float]


@dataclass(frozen=True, slots=True)
class PointRecord:
    """A point as the store holds it: id, dense vector, optional BM25 sparse vector
    (stores of a ``hybrid`` generation only), and payload."""

    id: str
    vector: list[float]
    payload: dict[str, Any] = field(default_factory=dict)
    sparse: SparseVec | None = None


#: Retrieval modes: the dense vector only, the BM25 sparse vector only, or both fused.
SearchMode = Literal["dense", "lexical", "hybrid"]


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """What a store search keeps, applied inside the store (payload indexes).

    ``root``: only points of this root. ``path_prefix``: only paths (relative to their
    root, POSIX) starting with it, a plain string prefix. ``exts``: only paths whose
    lower-cased extension (with its dot, ``".py"``; ``""`` for none) is one of these;
    empty means any.
    """

    root: str | None = None
    path_prefix: str | None = None
    exts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result."""

    id: str
    score: float
    payload: dict[str, Any]


class SkipFile(Exception):  # noqa: N818 - it is a signal, not an error of repd's
    """Raised by extraction when a file is not indexed; ``reason`` is a short code.

    Reason codes: ``binary``, ``too_large``, ``empty``, ``unreadable``, ``vanished``,
    ``not_a_file``, ``unsupported``, ``decode_error``, ``extract_error``.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
