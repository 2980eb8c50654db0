"""Chunking: cut a Document into embeddable chunks under a token cap, with edit locality.

Sections and blocks come from ``repd.core.structure``; blocks over the cap are split
finer (code groups, lines, sentences, words, characters); ``repd.core.packing`` groups
the pieces into chunks with content-defined boundaries. Each chunk body is an exact
slice of ``Document.text``; Markdown and reST chunks get a heading breadcrumb first.
Last, a chunk whose body is tiny (a lone reST label, a one-line section) joins a
neighbour, across a section boundary too, when the two fit the cap together.
"""

from __future__ import annotations

import hashlib
import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from repd.core.packing import MIN_FILL, Range, cdc_ranges, fewest, merge_small
from repd.core.structure import (
    Section,
    Span,
    sections_for,
    split_chars,
    split_code_block,
    split_lines,
    split_sentences,
    split_words,
)
from repd.core.types import Chunk, Document

CountTokens = Callable[[list[str]], list[int]]

#: What the chunker does to a text; bumped whenever the same document (and token
#: counter) can give other chunks, so that an index knows its chunks are stale.
#: 1: structure-aware packing with heading breadcrumbs. 2: tiny chunks join a neighbour.
CHUNKER_VERSION = 2
#: A chunk whose body (breadcrumb not counted) is under this share of the token limit is
#: merged into a neighbour when the two fit together: a lone label, a heading with one
#: short line, a stray import. Below ``packing.MIN_FILL``, under which chunks already
#: merge within a section; this merge also crosses sections.
TINY_FILL = 0.1

_CRUMB_SEP = "\n\n"
_NEWLINE = re.compile(r"\n")
_PROSE_LEVELS = ("lines", "sentences", "words", "chars")
_CODE_LEVELS = ("code", "lines", "words", "chars")
# A block at most _TIGHT times the budget is cut into the fewest chunks that fit rather
# than by hash; to make a cut near the middle possible, it is first split down to
# structural parts (code groups, lines, sentences) of at most a quarter of the budget.
_TIGHT = 2
_STRUCTURAL = frozenset({"code", "lines", "sentences"})


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int
    end: int
    tokens: int
    level: int  # index of the next split level to try
    block: int  # which block of its section it came from
    rank: int  # how coarse the gap before it is: -1 block edge, else its split level
    exact: bool = True  # False when tokens is a sum over glued blocks, not a count


def chunk_document(
    doc: Document, count_tokens: CountTokens, max_tokens: int, *, merge_tiny: bool = True
) -> list[Chunk]:
    """Cut ``doc`` into chunks of at most ``max_tokens`` tokens each (per ``count_tokens``).

    ``count_tokens`` counts many strings at once, without special tokens; it is called
    a few times per document, never per line. The same text always gives the same
    chunks. Markdown and reST chunks start with a breadcrumb of their enclosing
    headings (``Install > Linux``), counted within ``max_tokens``.

    With ``merge_tiny`` (the default; off gives CHUNKER_VERSION 1's chunks), a chunk
    whose body is under ``TINY_FILL`` of ``max_tokens`` joins the neighbour whose heading
    path it shares more of (the one before on a tie), if both fit together. The merged
    body is still one exact slice of the text, so the later section's heading line is in
    it; the breadcrumb is the path the whole chunk lies in (see ``_merge_tiny``).
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be positive")
    text = doc.text
    if not text.strip():
        return []
    sections = sections_for(doc)
    crumbs = _fit_crumbs([s.crumb for s in sections], count_tokens, max_tokens)
    budgets = [max_tokens - tokens for _, tokens in crumbs]
    levels = _CODE_LEVELS if doc.kind == "code" else _PROSE_LEVELS
    pieces = _initial_pieces(text, sections, count_tokens, budgets)
    pieces = _split_oversized(text, pieces, budgets, levels, doc.language, count_tokens)
    groups = [
        (si, group)
        for si, section_pieces in enumerate(pieces)
        for group in _pack_section(text, section_pieces, budgets[si])
    ]
    groups, counts = _enforce_cap(text, groups, [c for c, _ in crumbs], count_tokens, max_tokens)
    if merge_tiny:
        merged = _merge_tiny(text, groups, counts, crumbs, count_tokens, max_tokens)
    else:
        merged = [(crumbs[si][0], group) for si, group in groups]

    line_starts = [0, *(m.end() for m in _NEWLINE.finditer(text))]
    chunks: list[Chunk] = []
    for crumb, group in merged:
        chunk_text = _chunk_text(text, group, crumb)
        chunks.append(
            Chunk(
                ordinal=len(chunks),
                text=chunk_text,
                start_line=bisect_right(line_starts, group[0].start),
                end_line=bisect_right(line_starts, group[-1].end - 1),
                hash=hashlib.sha256(chunk_text.encode("utf-8")).hexdigest(),
            )
        )
    return chunks


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _chunk_text(text: str, group: list[_Piece], crumb: str) -> str:
    start = group[0].start
    # Take the first line's indentation too, so code keeps its shape.
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    if start > 0 and text[start - 1] != "\n":
        start = group[0].start
    body = text[start : group[-1].end]
    return f"{crumb}{_CRUMB_SEP}{body}" if crumb else body


def _fit_crumbs(
    crumbs: list[str], count_tokens: CountTokens, max_tokens: int
) -> list[tuple[str, int]]:
    """Token counts of breadcrumbs (with separator), shortened to at most half the cap."""
    cap = max_tokens // 2
    fitted = {c: c for c in dict.fromkeys(crumbs) if c}
    counts: dict[str, int] = {}
    while todo := [c for c in fitted if c not in counts]:
        for c, n in zip(todo, count_tokens([fitted[c] + _CRUMB_SEP for c in todo]), strict=True):
            if n <= cap:
                counts[c] = n
            elif " > " in fitted[c]:
                fitted[c] = fitted[c].rsplit(" > ", 1)[1]  # the innermost heading matters most
            else:
                fitted[c] = fitted[c][: max(0, len(fitted[c]) * cap // n - 1)].rstrip()
                if not fitted[c]:
                    counts[c] = 0
    return [(fitted[c], counts[c]) if c else ("", 0) for c in crumbs]


def _initial_pieces(
    text: str, sections: list[Section], count_tokens: CountTokens, budgets: list[int]
) -> list[list[_Piece]]:
    """One piece per block, with blocks under ``MIN_FILL`` of the budget (a title, an
    "Example:" line, an import) glued to the block after them, which they introduce."""
    counts = iter(count_tokens([text[a:b] for s in sections for a, b in s.blocks]))
    out: list[list[_Piece]] = []
    for si, section in enumerate(sections):
        small = budgets[si] * MIN_FILL
        glued: list[_Piece] = []
        glue = alone = False  # a block's own size decides, so gluing stays local
        for a, b in section.blocks:
            n = next(counts)
            if glue:
                glued[-1] = _join(glued[-1], b, n)
            else:
                glued.append(_Piece(a, b, n, 0, len(glued), -1))
            glue, alone = n < small, not glue
        if glue and alone and len(glued) > 1:  # a small last block joins the one before
            last = glued.pop()
            glued[-1] = _join(glued[-1], last.end, last.tokens)
        out.append(glued)
    return out


def _join(piece: _Piece, end: int, tokens: int) -> _Piece:
    """Extend a piece over the next block; its count becomes an estimate (the gap between
    blocks may hold text no block has, such as a thematic break)."""
    return _Piece(piece.start, end, piece.tokens + tokens, 0, piece.block, -1, exact=False)


def _split_once(
    text: str, piece: _Piece, budget: int, levels: tuple[str, ...], language: str | None
) -> list[_Piece]:
    """Split a piece at the first level that yields more than one part (uncounted)."""
    span = (piece.start, piece.end)
    for lvl in range(piece.level, len(levels)):
        name = levels[lvl]
        parts: list[Span]
        if name == "code":
            parts = split_code_block(text, span, language)
            nxt = lvl  # nested groups may split again at a deeper indentation
        elif name == "chars":
            size = (span[1] - span[0]) * budget * 9 // (10 * max(piece.tokens, 1))
            parts, nxt = split_chars(text, span, size), lvl
        else:
            splitter = {"lines": split_lines, "sentences": split_sentences, "words": split_words}
            parts, nxt = splitter[name](text, span), lvl + 1
        if len(parts) > 1:
            return [
                _Piece(a, b, 0, nxt, piece.block, piece.rank if i == 0 else lvl)
                for i, (a, b) in enumerate(parts)
            ]
    return [_Piece(piece.start, piece.end, piece.tokens, len(levels), piece.block, piece.rank)]


def _split_oversized(
    text: str,
    pieces: list[list[_Piece]],
    budgets: list[int],
    levels: tuple[str, ...],
    language: str | None,
    count_tokens: CountTokens,
) -> list[list[_Piece]]:
    """Split pieces until every one fits its section's budget; one count call per round.

    Blocks at most twice the budget are cut down to structural parts of a quarter of
    the budget, so that a two-way split close to the middle exists.
    """
    tight = [
        {p.block for p in ps if budgets[si] < p.tokens <= _TIGHT * budgets[si]}
        for si, ps in enumerate(pieces)
    ]
    while True:
        rows: list[list[_Piece]] = []
        fresh: list[_Piece] = []
        for si, section_pieces in enumerate(pieces):
            budget, row = budgets[si], []
            for p in section_pieces:
                over = p.tokens > budget or (
                    p.block in tight[si]
                    and p.tokens > budget // 4
                    and p.level < len(levels)
                    and levels[p.level] in _STRUCTURAL
                )
                if over and p.level < len(levels) and p.end - p.start > 1:
                    parts = _split_once(text, p, budget, levels, language)
                    fresh.extend(parts)
                    row.extend(parts)
                else:
                    row.append(p)
            rows.append(row)
        if not fresh:
            return pieces
        counted = dict(
            zip(
                map(id, fresh),
                count_tokens([text[p.start : p.end] for p in fresh]),
                strict=True,
            )
        )
        pieces = [
            [
                _Piece(p.start, p.end, counted[id(p)], p.level, p.block, p.rank)
                if id(p) in counted
                else p
                for p in row
            ]
            for row in rows
        ]


def _pack_section(text: str, pieces: list[_Piece], budget: int) -> list[list[_Piece]]:
    """Chunks of one section. A block that had to be split is packed on its own, so
    that a block growing past the budget changes its own chunks, not its neighbours'."""
    tokens = [p.tokens for p in pieces]
    hashes = [_hash(text[p.start : p.end]) for p in pieces]
    ranks = [p.rank for p in pieces]
    runs: list[tuple[int, int, bool]] = []  # (first, last, is one split block)
    i = 0
    while i < len(pieces):
        j = i
        while j + 1 < len(pieces) and pieces[j + 1].block == pieces[i].block:
            j += 1
        if j == i and runs and not runs[-1][2]:
            runs[-1] = (runs[-1][0], j, False)
        else:
            runs.append((i, j, j > i))
        i = j + 1
    ranges: list[Range] = []
    for i, j, split in runs:
        t, h, r = tokens[i : j + 1], hashes[i : j + 1], ranks[i : j + 1]
        if split and sum(t) <= _TIGHT * budget:
            local = fewest(t, h, r, budget)
        else:
            local = cdc_ranges(t, h, r, budget)
        ranges.extend((a + i, b + i) for a, b in local)
    return [pieces[a : b + 1] for a, b in merge_small(ranges, tokens, budget)]


def _enforce_cap(
    text: str,
    groups: list[tuple[int, list[_Piece]]],
    crumbs: list[str],
    count_tokens: CountTokens,
    max_tokens: int,
) -> tuple[list[tuple[int, list[_Piece]]], list[int]]:
    """Recount whole chunk texts and halve any that a non-additive tokenizer pushed over.

    With a WordPiece tokenizer a chunk's count is the sum of its pieces' and nothing
    changes; tokenizers that merge across whitespace may need the halving. Returns the
    groups and each one's token count (breadcrumb included).
    """
    known = [
        len(g) == 1
        and g[0].exact
        and not crumbs[si]
        and _chunk_text(text, g, "") == text[g[0].start : g[0].end]
        for si, g in groups
    ]
    sizes = [g[0].tokens if k else 0 for k, (_, g) in zip(known, groups, strict=True)]
    while not all(known):
        todo = [i for i, k in enumerate(known) if not k]
        counts = count_tokens([_chunk_text(text, groups[i][1], crumbs[groups[i][0]]) for i in todo])
        counted = dict(zip(todo, counts, strict=True))
        new_groups: list[tuple[int, list[_Piece]]] = []
        new_known: list[bool] = []
        new_sizes: list[int] = []
        for i, (si, g) in enumerate(groups):
            n = counted.get(i, sizes[i])
            halves = _halve(text, g) if n > max_tokens else None
            if halves is None:
                new_groups.append((si, g))
                new_known.append(True)
                new_sizes.append(n)
            else:
                new_groups.extend((si, h) for h in halves)
                new_known.extend([False, False])
                new_sizes.extend([0, 0])
        groups, known, sizes = new_groups, new_known, new_sizes
    return groups, sizes


def _crumb_parts(crumb: str) -> list[str]:
    return crumb.split(" > ") if crumb else []


def _shared(a: str, b: str) -> int:
    """How many leading headings two breadcrumbs have in common."""
    n = 0
    for x, y in zip(_crumb_parts(a), _crumb_parts(b), strict=False):
        if x != y:
            break
        n += 1
    return n


def _merge_tiny(
    text: str,
    groups: list[tuple[int, list[_Piece]]],
    sizes: list[int],
    crumbs: list[tuple[str, int]],
    count_tokens: CountTokens,
    max_tokens: int,
) -> list[tuple[str, list[_Piece]]]:
    """Join each tiny chunk to a neighbour, across sections too; ``(crumb, pieces)`` out.

    A chunk is tiny when its body (its count less its breadcrumb's) is under
    ``TINY_FILL`` of the cap. It joins the neighbour whose breadcrumb shares more
    leading headings with its own (so a label or a one-line intro goes with the section
    it introduces, a one-line subsection with its parent), the chunk before it on a tie
    or when only that one fits. Sizes are planned from the counts in hand plus the text
    between the two (a heading line, say), then every merged text is counted once more
    and a merge that a non-additive tokenizer pushed over the cap is undone.

    A merged chunk's breadcrumb is the one of its first chunk that is not tiny, cut to
    the headings the tiny chunks before it share with it: the path the whole chunk lies
    in. Headings opened inside the chunk are in its body, as the source has them.
    """
    n = len(groups)
    limit = max_tokens * TINY_FILL
    crumb = [crumbs[si][0] for si, _ in groups]
    crumb_tokens = [crumbs[si][1] for si, _ in groups]
    body = [max(0, sizes[i] - crumb_tokens[i]) for i in range(n)]
    tiny = [b < limit for b in body]
    if n < 2 or not any(tiny):
        return [(crumb[i], g) for i, (_, g) in enumerate(groups)]
    gap_at = [i for i in range(n - 1) if tiny[i] or tiny[i + 1]]
    gap_counts = count_tokens(
        [text[groups[i][1][-1].end : groups[i + 1][1][0].start] for i in gap_at]
    )
    gap = dict(zip(gap_at, gap_counts, strict=True))

    runs: list[list[int]] = []  # indices of the groups each chunk is made of
    size: list[int] = []  # planned tokens of each run
    waits = False  # the last run is tiny and waits for the next chunk to join it
    for i in range(n):
        if runs and waits:
            if size[-1] + gap[i - 1] + body[i] <= max_tokens:
                runs[-1].append(i)
                # the breadcrumb becomes the non-tiny one's (cut), never longer
                size[-1] += gap[i - 1] + body[i]
                waits = tiny[i] and sum(body[j] for j in runs[-1]) < limit
                continue
            waits = False
        if tiny[i]:
            back = bool(runs) and size[-1] + gap[i - 1] + body[i] <= max_tokens
            ahead = i + 1 < n and sizes[i] + gap[i] + body[i + 1] <= max_tokens
            if ahead and back:
                ahead = _shared(crumb[i], crumb[i + 1]) > _shared(crumb[i], crumb[i - 1])
            if back and not ahead:
                runs[-1].append(i)
                size[-1] += gap[i - 1] + body[i]
                continue
            waits = ahead
        runs.append([i])
        size.append(sizes[i])

    merged = [(_run_crumb(run, crumb, tiny), run) for run in runs]
    multi = [k for k, (_, run) in enumerate(merged) if len(run) > 1]
    recount = count_tokens(
        [_chunk_text(text, _pieces(groups, merged[k][1]), merged[k][0]) for k in multi]
    )
    over = {k for k, m in zip(multi, recount, strict=True) if m > max_tokens}
    out: list[tuple[str, list[_Piece]]] = []
    for k, (c, run) in enumerate(merged):
        if k in over:  # a tokenizer that is not additive: keep the chunks apart
            out.extend((crumb[i], groups[i][1]) for i in run)
        else:
            out.append((c, _pieces(groups, run)))
    return out


def _run_crumb(run: list[int], crumb: list[str], tiny: list[bool]) -> str:
    anchor = next((i for i in run if not tiny[i]), run[0])
    keep = min((_shared(crumb[i], crumb[anchor]) for i in run if i < anchor), default=None)
    if keep is None:
        return crumb[anchor]
    return " > ".join(_crumb_parts(crumb[anchor])[:keep])


def _pieces(groups: list[tuple[int, list[_Piece]]], run: list[int]) -> list[_Piece]:
    return [p for i in run for p in groups[i][1]]


def _halve(text: str, group: list[_Piece]) -> list[list[_Piece]] | None:
    """Two halves of a chunk's pieces by tokens, or of its one piece by words or chars."""
    if len(group) == 1:
        p = group[0]
        words = split_words(text, (p.start, p.end))
        k = len(words) // 2
        left, right = (words[k - 1][1], words[k][0]) if k else ((p.start + p.end) // 2,) * 2
        if left <= p.start:
            return None  # a single character over the cap: nothing left to split
        half = p.tokens // 2
        return [
            [_Piece(p.start, left, half, p.level, p.block, p.rank)],
            [_Piece(right, p.end, p.tokens - half, p.level, p.block, p.level)],
        ]
    total, acc = sum(p.tokens for p in group), 0
    for cut in range(1, len(group)):
        acc += group[cut - 1].tokens
        if 2 * acc >= total:
            return [group[:cut], group[cut:]]
    return [group[:-1], group[-1:]]
