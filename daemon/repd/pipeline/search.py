"""The query path: resolve the filters, embed the question, search one generation's store
with the filters inside it, match the full glob, deepen until k, shape the hits.

Filters run inside the store wherever it can: the root, a plain path prefix (the glob's
literal folders, or the subfolder a ``--root`` names) and, on generations whose every
point carries its ``ext`` payload, the file extensions a glob pins (``**/*.py``). The
full glob is then matched here (``core/globs.py``, a linear-time matcher). When that, or
one hit per file, leaves fewer than ``k`` hits, the store is asked again for twice as
many candidates, until ``k`` are found or the store has no more (bounded by its size
and :data:`MAX_CANDIDATES`): the common case stays one store call.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from repd.adapters.store import Store
from repd.core.globs import (
    GlobError,
    check_glob,
    escape,
    glob_exts,
    literal_prefix,
    match_path,
    split_literal_head,
)
from repd.core.types import SearchMode, SparseVec
from repd.errors import EXIT_CONFIG, RepdError

#: Candidates asked for at first, per result wanted, when hits are filtered here (a glob)
#: or grouped by file: enough for the common case to take one store call.
OVERFETCH = 8
#: Most candidates one query reads while deepening (each carries its chunk's text).
MAX_CANDIDATES = 20_000
#: Longest snippet, in characters.
SNIPPET_CHARS = 160
#: The retrieval modes.
MODES: tuple[str, ...] = get_args(SearchMode)

NO_SPARSE_HINT = ("`repd model use <same model>` rebuilds the index with sparse vectors "
                  "while it keeps answering")


class QueryError(RepdError):
    """A query that cannot be answered as asked (an invalid glob, a path outside every
    root, a mode the generation lacks): the CLI's exit 2, the API's ``status``."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, *, status: int = 400, code: str = "bad_query") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


def check_mode(mode: str | None, hybrid: bool, default: str | None = None) -> SearchMode:
    """The mode a query runs in: ``mode``, else ``default``, else the generation's
    default (hybrid when it has sparse vectors); QueryError when the generation has no
    sparse vectors for a lexical or hybrid search."""
    chosen = mode or default or ("hybrid" if hybrid else "dense")
    if chosen not in MODES:
        raise QueryError(f"unknown mode {chosen!r} (one of {', '.join(MODES)})",
                         code="unknown_mode")
    if chosen != "dense" and not hybrid:
        raise QueryError(
            f"{chosen} search needs sparse (BM25) vectors, and this index has none (only "
            f"dense retrieval exists for it): {NO_SPARSE_HINT}", code="no_sparse_vectors")
    return chosen  # type: ignore[return-value]  # one of MODES


# -- hits ------------------------------------------------------------------------------------

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
    #: The question asked: the snippet is cut around the sentence that best matches it.
    query: str = ""

    @property
    def snippet(self) -> str:
        """One line of at most :data:`SNIPPET_CHARS` characters: the chunk from the
        sentence that shares the most words with the query (from its start when none
        does better than the first)."""
        return make_snippet(self.text, self.query)

    def as_dict(self) -> dict[str, Any]:
        """Wire form."""
        return {"rank": self.rank, "score": round(self.score, 6), "root": self.root,
                "path": self.path, "start_line": self.start_line, "end_line": self.end_line,
                "snippet": self.snippet}


_WORD_RE = re.compile(r"[^\W_]+")
# ASCII's non-word characters (those _WORD_RE splits at) as spaces: ``str.split`` then
# finds the words of ASCII text in C, ~2.5x faster than the regex. A table for bytes:
# ``bytes.translate`` runs ~3.5x faster than ``str.translate`` (~1.6 against ~5.6 us
# for a chunk of 950 characters).
_ASCII_SPACES = bytes(c if c >= 128 or chr(c).isalnum() else 32 for c in range(256))
_CAMEL_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from has have how i if in into is it its "
    "me my no not of on or our so such than that the their then there these they this to "
    "was we were what when where which who why will with you your".split())
_SUFFIXES = ("ing", "ed", "es", "s", "ly")


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)]
    return word


@functools.lru_cache(maxsize=16384)
def _word_terms(word: str) -> frozenset[str]:
    """The stems of one word as ``_WORD_RE`` finds it: the word lower-cased and, for an
    identifier, its parts, stop words left out. Cached: a page of hits repeats its words,
    and snippets are cut on the query's path."""
    parts = _CAMEL_RE.findall(word) if word.isascii() else []
    return frozenset(_stem(w) for w in (word.lower(), *(p.lower() for p in parts))
                     if w not in _STOPWORDS)


def _spaced(text: str) -> str:
    """ASCII ``text`` with every non-word character a space (offsets unchanged)."""
    return text.encode("ascii").translate(_ASCII_SPACES).decode("ascii")


def _terms(text: str, spaced: str | None = None) -> set[str]:
    """Lower-cased word stems, identifiers also split (``rotateKeys``, ``rotate_keys``).
    ``spaced``: ``_spaced(text)``, given where the caller has it (ASCII text only)."""
    if spaced is None and text.isascii():
        spaced = _spaced(text)
    words = spaced.split() if spaced is not None else _WORD_RE.findall(text)
    # map and union run in C, not a loop in Python over the words.
    return set().union(*map(_word_terms, words))


def _unit_ends(text: str, start: int) -> list[int]:
    """Where the sentences (or lines) of ``text[start:]`` end, the text's end last. One
    ends after ".", "!" or "?" followed by white space, or after a line break."""
    ends = []
    for mark in ".!?\n":
        i = text.find(mark, start)
        while i >= 0:
            if mark == "\n" or text[i + 1:i + 2].isspace():
                ends.append(i + 1)
            i = text.find(mark, i + 1)
    ends.sort()
    if not ends or ends[-1] < len(text):
        ends.append(len(text))
    return ends


@functools.lru_cache(maxsize=256)
def _query_weights(query: str) -> dict[str, int]:
    """The query's terms, each with what it adds to a sentence's score: in tenths, as
    integers (a float sum would depend on the set's order, that is on the hash seed, and
    so would the sentence chosen between two equal scores). Cached: the ten hits of one
    query share it. Read only."""
    return {t: 10 + min(len(t), 10) for t in _terms(query)}


def _best_start(text: str, weights: dict[str, int], lowered: str | None,
                live: frozenset[str]) -> int:
    """Start of the sentence (or line) of ``text`` that scores best, the first of equals;
    0 when none scores or the best is the first one that holds a word (what comes
    before it, a heading path, is kept).

    A term is the stem (a prefix) of a lower-cased word, so it can only be found where
    the lower-cased text holds it. On ASCII text (``lowered`` given), which lower-cases
    letter for letter, only ``live`` terms (those ``lowered`` holds) can be found, and
    a sentence can score at most the weights of the live terms its lower-cased text
    holds: sentences are read best bound first, and reading stops once no bound left
    can beat (or tie earlier than) the best score read. Hits are dense in the query's
    words: on SciFact's top-ten hybrid hits (~7 sentences each) ~2.5 are read, and
    ``make_snippet`` runs 1.7x faster than when every sentence holding a live term was.
    """
    head = _WORD_RE.search(text)
    if head is None:
        return 0
    if lowered is not None:
        return _best_start_bounded(text, weights, lowered, live, head.start())
    best, best_score = 0, 0
    # From the first word on: the first unit is then the first that holds a word (its
    # leading characters, cut off, hold none), and the later ones are the same.
    a = head.start()
    for n, b in enumerate(_unit_ends(text, a)):
        terms = _terms(text[a:b])
        score = sum(map(weights.__getitem__, live.intersection(terms)))
        if score > best_score:
            best, best_score = (a if n else 0), score
        a = b
    return best


def _best_start_bounded(text: str, weights: dict[str, int], lowered: str, live: frozenset[str],
                        a: int) -> int:
    """``_best_start`` on ASCII text, from its first word at ``a``: the same sentence,
    scored exactly only where its bound (the weights of the live terms its lower-cased
    text holds) could still win. Ties go to the first sentence, as in order."""
    bounded: list[tuple[int, int, int, int]] = []  # (-bound, n, start, end)
    live_weights = [(t, weights[t]) for t in live]
    for n, b in enumerate(_unit_ends(text, a)):
        seg = lowered[a:b]
        bound = sum(w for t, w in live_weights if t in seg)
        if bound:
            bounded.append((-bound, n, a, b))
        a = b
    bounded.sort()
    spaced = _spaced(text) if bounded else ""
    best, best_n, best_score = 0, -1, 0
    for neg, n, a, b in bounded:
        if -neg < best_score:
            break  # sorted by bound: none left can reach the best score
        if -neg == best_score and n > best_n:
            continue  # at best a tie, after the best: the first of equals stays
        score = sum(map(weights.__getitem__, live.intersection(_terms(text[a:b],
                                                                     spaced[a:b]))))
        if score > best_score or (score == best_score and score and n < best_n):
            best, best_n, best_score = (a if n else 0), n, score
    return best


def _first_match(text: str, live: frozenset[str]) -> int:
    """Offset of the first word of ``text`` that yields one of ``live``, else 0."""
    if not text.isascii():
        return next((m.start() for m in _WORD_RE.finditer(text)
                     if _word_terms(m.group()) & live), 0)
    # A word yields a term only where its lower-cased letters hold it: the words that
    # end before the first place any live term is found cannot match, and are not read.
    lowered = text.lower()
    found = [i for i in map(lowered.find, live) if i >= 0]
    if not found:
        return 0
    spaced = _spaced(text)  # same offsets: one character for one
    at = spaced.rfind(" ", 0, min(found)) + 1  # the word that holds the first one
    for word in spaced[at:].split():
        at = spaced.find(word, at)  # only spaces lie between ``at`` and this word
        if _word_terms(word) & live:
            return at
        at += len(word)
    return 0


def make_snippet(text: str, query: str = "", width: int = SNIPPET_CHARS) -> str:
    """``text`` on one line, at most ``width`` characters, from the sentence (or line)
    that best matches ``query`` by shared words, longer words weighing more; from the
    start when none matches better than the first. A sentence too long to show whole
    begins a little before its first matching word. "... " marks a cut start, "..." a
    cut end. A query shows ten: ~43 us each on SciFact's hybrid hits (800 characters)."""
    weights = _query_weights(query) if query else {}
    lowered = text.lower() if weights and text.isascii() else None
    live = frozenset(weights if lowered is None else (t for t in weights if t in lowered))
    start = _best_start(text, weights, lowered, live) if live else 0
    rest = " ".join(text[start:].split())
    lead = "... " if start else ""
    if len(lead) + len(rest) > width and weights:
        room = width - 4
        first = _first_match(rest, live) if live else 0
        if first > room // 2:
            cut = rest.rfind(" ", 0, max(0, first - room // 4))
            rest, lead = rest[cut + 1:], "... "
    if len(lead) + len(rest) > width:
        rest = rest[: width - len(lead) - 3].rstrip() + "..."
    return lead + rest


# -- filters ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Scope:
    """What a query keeps: one root (or every root), a root-relative glob, and a plain
    root-relative path prefix (from a subfolder given as the root)."""

    root: str | None = None
    glob: str | None = None
    prefix: str | None = None


def _known_roots(roots: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Indexed roots as the payload spells them, deepest first."""
    out = {str(Path(os.path.abspath(r))) for r in roots}
    return sorted(out, key=len, reverse=True)


def _within(path: str, base: str) -> str | None:
    """``path`` relative to ``base`` (POSIX, "" for itself), or None outside it."""
    if path == base:
        return ""
    lead = base.rstrip("/") + "/"
    return path[len(lead):] if path.startswith(lead) else None


def locate(path: str, roots: Sequence[str]) -> tuple[str, str] | None:
    """(root, path relative to it) for an absolute ``path`` inside one of ``roots`` (the
    deepest), looking through symlinks when the path as written lies in none."""
    norm = os.path.normpath(path)
    for r in roots:
        rel = _within(norm, r)
        if rel is not None:
            return r, rel
    real = os.path.realpath(norm)
    for r in roots:
        rel = _within(real, os.path.realpath(r))
        if rel is not None:
            return r, rel
    return None


def _anchored(rel: str, rest: str = "") -> str | None:
    """A glob anchored at the root: ``rel`` (literal) followed by ``rest`` (a glob)."""
    parts = [p for p in (escape(rel) if rel else "", rest) if p]
    return "/" + "/".join(parts) if parts else None


def _path_scope(path: str, roots: Sequence[str], cwd: str | None) -> tuple[str | None, str | None]:
    """(root or None, root-relative glob or None) for ``--path``.

    An absolute path (a glob allowed past its literal folders) names its root; so does a
    relative one written as a path (``.``, ``..``, or with a ``/``) whose folder part
    exists relative to ``cwd`` inside a root. Anything else is a glob relative to each
    root, as before. A path that exists exactly as written is taken literally, even
    with ``[`` or ``*`` in its name.
    """
    absolute = Path(path).is_absolute()
    dotted = path in (".", "..") or path.startswith(("../", "./"))
    if not absolute and (cwd is None or not (dotted or "/" in path.strip("/"))):
        return None, path
    full = os.path.normpath(path if absolute else Path(cwd or "/") / path)
    found = locate(full, roots)
    if found is not None and os.path.lexists(full):
        return found[0], _anchored(found[1])
    head, rest = split_literal_head(path)
    if not (absolute or dotted or head):
        return None, path  # "**/*.py": no folder to be relative to
    base = os.path.normpath(head or "/" if absolute else Path(cwd or "/") / head)
    found = locate(base, roots)
    if found is not None and (absolute or Path(base).is_dir()):
        return found[0], _anchored(found[1], rest)
    if absolute or path in (".", "..") or path.startswith("../"):
        raise QueryError(f"{path} is not inside any indexed root", status=404,
                         code="not_in_root")
    return None, path  # "./docs/*.md" from outside every root: relative to each root


def resolve_scope(path: str | None, root: str | None,
                  roots: Iterable[str | os.PathLike[str]], *, cwd: str | None = None) -> Scope:
    """The filters of ``--path`` and ``--root`` against the indexed ``roots``.

    ``root``: a root, or a folder inside one (then the containing root plus a path
    prefix); relative to ``cwd`` when not absolute. ``path``: a glob relative to each
    root, or a path as the CLI prints it: absolute, or relative to ``cwd`` (the
    client's folder), which turns into the root it lies in and a glob anchored there.
    Raises :class:`QueryError`: 404 ``unknown_root`` / ``not_in_root`` for a folder
    outside every root, 400 ``invalid_glob`` with the reason, 400 ``path_outside_root``
    when ``path`` lies in another root than ``root``.
    """
    known = _known_roots(roots)
    scope_root: str | None = None
    prefix: str | None = None
    if root is not None:
        full = root if Path(root).is_absolute() else str(Path(cwd or Path.cwd()) / root)
        found = locate(full, known)
        if found is None:
            raise QueryError(f"{root} is not an indexed root (nor a folder inside one)",
                             status=404, code="unknown_root")
        scope_root, rel = found
        prefix = rel.rstrip("/") + "/" if rel else None
    glob: str | None = None
    if path is not None:
        path_root, glob = _path_scope(path, known, cwd)
        if path_root is not None:
            if scope_root is not None and path_root != scope_root:
                raise QueryError(f"--path {path} is not inside --root {root}",
                                 code="path_outside_root")
            scope_root = path_root
        if glob is not None:
            try:
                check_glob(glob)
            except GlobError as exc:
                raise QueryError(f"invalid --path glob {path!r}: {exc}",
                                 code="invalid_glob") from None
    return Scope(scope_root, glob, prefix)


# -- the search ------------------------------------------------------------------------------

def _store_prefix(glob: str | None, prefix: str | None) -> tuple[str | None, bool]:
    """The path prefix to push into the store, and False when the glob and the prefix
    cannot both hold (nothing can match)."""
    pushed = [p for p in (prefix, literal_prefix(glob) if glob else None) if p]
    if len(pushed) < 2:
        return (pushed[0] if pushed else None), True
    a, b = pushed
    if a.startswith(b):
        return a, True
    if b.startswith(a):
        return b, True
    return None, False


def search(store: Store, embed_query: Callable[[str], Sequence[float]], text: str, k: int,
           path_glob: str | None = None, root: str | None = None, per_file: bool = False,
           *, mode: SearchMode = "dense",
           embed_sparse: Callable[[str], SparseVec] | None = None,
           path_prefix: str | None = None, push_exts: bool | None = None,
           rrf_k: int | None = None, weights: tuple[float, float] | None = None,
           prefetch: int | None = None) -> tuple[list[SearchHit], float]:
    """Top ``k`` chunks for ``text`` (or, with ``per_file``, the best chunk of each of the
    top ``k`` files); returns hits and the time taken in milliseconds.

    ``path_glob``: root-relative (``core/globs.py``; QueryError when invalid); ``root``:
    one root; ``path_prefix``: a plain root-relative prefix. ``mode``: dense, lexical
    (``embed_sparse`` embeds the query's BM25 vector) or hybrid (both, fused in the
    store; ``rrf_k``, ``weights`` and ``prefetch`` tune it). ``push_exts``: filter on
    the payload's ``ext`` in the store (default: on hybrid stores, whose points all
    carry it; older dense generations may hold points without it).
    """
    t0 = time.perf_counter()
    if path_glob is not None:
        try:
            check_glob(path_glob)
        except GlobError as exc:
            raise QueryError(f"invalid --path glob {path_glob!r}: {exc}",
                             code="invalid_glob") from None
    if mode not in MODES:
        raise QueryError(f"unknown mode {mode!r} (one of {', '.join(MODES)})",
                         code="unknown_mode")
    store_prefix, possible = _store_prefix(path_glob, path_prefix)
    if not possible:
        return [], (time.perf_counter() - t0) * 1000
    opts: dict[str, Any] = {"root": root, "path_prefix": store_prefix}
    # Only what differs from the defaults is passed: any Store accepts the call.
    if push_exts is None:
        push_exts = bool(getattr(store, "hybrid", False))
    exts = glob_exts(path_glob) if path_glob and push_exts else None
    if exts:
        opts["exts"] = exts
    if mode != "dense":
        if embed_sparse is None:
            raise ValueError(f"{mode} search needs embed_sparse")
        opts["mode"] = mode
        opts["sparse"] = embed_sparse(text)
    for name, value in (("rrf_k", rrf_k), ("weights", weights), ("prefetch", prefetch)):
        if value is not None:
            opts[name] = value
    vector: Sequence[float] = embed_query(text) if mode != "lexical" else []

    verdicts: dict[str, bool] = {}  # a file's chunks share its path: match it once

    def keep(path: str) -> bool:
        verdict = verdicts.get(path)
        if verdict is None:
            verdict = verdicts[path] = (
                (not path_prefix or path.startswith(path_prefix))
                and (path_glob is None or match_path(path_glob, path)))
        return verdict

    filtered = path_glob is not None or per_file
    limit = k * OVERFETCH if filtered else k
    cap: int | None = None
    while True:
        raw = store.search(vector, limit, **opts)
        hits = _shape(raw, k, keep, per_file, text)
        if len(hits) >= k or len(raw) < limit:
            break  # enough, or the store has no more
        if cap is None:
            cap = min(_count(store), MAX_CANDIDATES)
        if limit >= cap:
            break
        limit = min(limit * 2, cap)
    return hits, (time.perf_counter() - t0) * 1000


def _count(store: Store) -> int:
    try:
        return int(store.count())
    except Exception:  # a store that cannot count: deepen up to the bound
        return MAX_CANDIDATES


def _shape(raw: Sequence[Any], k: int, keep: Callable[[str], bool], per_file: bool,
           query: str) -> list[SearchHit]:
    hits: list[SearchHit] = []
    seen: set[tuple[str, str]] = set()
    for h in raw:
        p = h.payload
        path = str(p.get("path", ""))
        if not keep(path):
            continue
        root = str(p.get("root", ""))
        if per_file:
            if (root, path) in seen:
                continue
            seen.add((root, path))
        hits.append(SearchHit(len(hits) + 1, float(h.score), root, path,
                              int(p.get("start_line", 0)), int(p.get("end_line", 0)),
                              str(p.get("text", "")), query))
        if len(hits) == k:
            break
    return hits
