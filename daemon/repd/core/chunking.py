"""Chunking: cut a Document into embeddable chunks under a token cap, with edit locality.

Structure (sections, blocks) comes from ``repd.core.structure``. Blocks over the cap are
split finer (code groups, lines, sentences, words, characters). Pieces are then packed
into chunks with *content-defined* boundaries: a boundary falls after a piece whose
hash passes a test, so an edit moves boundaries only next to itself and the chunking
resynchronises right after it. Greedy packing would instead shift every later
boundary, re-embedding the rest of the file on each keystroke.
"""

from __future__ import annotations

import hashlib
import os
import re
from bisect import bisect_right
from collections.abc import Callable

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

# A hash boundary is honoured only once a chunk holds this share of its budget, so
# chunks are rarely tiny; the expected distance between hash boundaries is _TARGET of
# the budget. When a chunk would overflow, it is cut at the last "backup" boundary
# (a weaker hash test, as in TTTD chunking) so that even forced cuts are content-defined.
_MIN_FILL = 0.3
_TARGET = 0.45
_BACKUP = 0.12
_HASH_SPACE = 1 << 64
_CRUMB_SEP = "\n\n"
_NEWLINE = re.compile(r"\n")

_PROSE_LEVELS = ("lines", "sentences", "words", "chars")
_CODE_LEVELS = ("code", "lines", "words", "chars")

# A piece: (start, end, tokens, index of the next split level to try, block number).
_Piece = tuple[int, int, int, int, int]


def chunk_document(doc: Document, count_tokens: CountTokens, max_tokens: int) -> list[Chunk]:
    """Cut ``doc`` into chunks of at most ``max_tokens`` tokens each (per ``count_tokens``).

    ``count_tokens`` counts many strings at once, without special tokens; it is called
    a handful of times per document, never per line. Markdown and reST chunks start
    with a breadcrumb of their enclosing headings, counted within ``max_tokens``.
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
    pieces = _initial_pieces(text, sections, count_tokens)
    pieces = _split_oversized(text, pieces, budgets, levels, doc.language, count_tokens)

    groups: list[tuple[int, list[_Piece]]] = []
    for si, section_pieces in enumerate(pieces):
        if os.environ.get("ISO"):
            for run, split in _runs(section_pieces):
                if split:
                    hashes = [_hash(text[p[0] : p[1]]) for p in run]
                    tk = [p[2] for p in run]
                    if os.environ.get("TWO") and sum(tk) <= 2 * budgets[si]:
                        rng = _split_two(tk, hashes, budgets[si])
                    else:
                        rng = PACK(tk, hashes, budgets[si])
                    for a, b in rng:
                        groups.append((si, run[a : b + 1]))
                else:
                    hashes = [_hash(text[p[0] : p[1]]) for p in run]
                    for a, b in PACK([p[2] for p in run], hashes, budgets[si]):
                        groups.append((si, run[a : b + 1]))
            continue
        units = _units(text, section_pieces, budgets[si])
        hashes = [_hash(text[u[0][0] : u[-1][1]]) for u in units]
        sizes = [sum(p[2] for p in u) for u in units]
        for a, b in PACK(sizes, hashes, budgets[si]):
            groups.append((si, [p for u in units[a : b + 1] for p in u]))
    groups = _enforce_cap(text, groups, [c for c, _ in crumbs], count_tokens, max_tokens)

    line_starts = [0, *(m.end() for m in _NEWLINE.finditer(text))]
    chunks: list[Chunk] = []
    for si, group in groups:
        body_start = _line_indent_start(text, group[0][0])
        body = text[body_start : group[-1][1]]
        crumb = crumbs[si][0]
        chunk_text = f"{crumb}{_CRUMB_SEP}{body}" if crumb else body
        chunks.append(
            Chunk(
                ordinal=len(chunks),
                text=chunk_text,
                start_line=bisect_right(line_starts, group[0][0]),
                end_line=bisect_right(line_starts, group[-1][1] - 1),
                hash=hashlib.sha256(chunk_text.encode("utf-8")).hexdigest(),
            )
        )
    return chunks


def _split_two(tokens: list[int], hashes: list[int], budget: int) -> list[tuple[int, int]]:
    total = sum(tokens)
    if total <= budget:
        return [(0, len(tokens) - 1)]
    best, best_score = -1, 0.0
    acc = 0
    for g in range(len(tokens) - 1):
        acc += tokens[g]
        if acc <= budget and total - acc <= budget:
            score = hashes[g] / max(tokens[g], 1)
            if best < 0 or score < best_score:
                best, best_score = g, score
    if best < 0:
        return _pack2(tokens, hashes, budget)
    return [(0, best), (best + 1, len(tokens) - 1)]


def _runs(pieces: list[_Piece]) -> list[tuple[list[_Piece], bool]]:
    out: list[tuple[list[_Piece], bool]] = []
    i = 0
    while i < len(pieces):
        j = i
        while j + 1 < len(pieces) and pieces[j + 1][4] == pieces[i][4]:
            j += 1
        if i == j:
            if out and not out[-1][1]:
                out[-1][0].append(pieces[i])
            else:
                out.append(([pieces[i]], False))
        else:
            out.append((pieces[i : j + 1], True))
        i = j + 1
    return out


def _units(text: str, pieces: list[_Piece], budget: int) -> list[list[_Piece]]:
    """Pack the pieces of each split block among themselves, so that a block growing past
    the budget changes its own chunks, not how its neighbours are packed."""
    units: list[list[_Piece]] = []
    i = 0
    while i < len(pieces):
        j = i
        while j + 1 < len(pieces) and pieces[j + 1][4] == pieces[i][4]:
            j += 1
        if i == j:
            units.append([pieces[i]])
        else:
            run = pieces[i : j + 1]
            hashes = [_hash(text[p[0] : p[1]]) for p in run]
            for a, b in PACK([p[2] for p in run], hashes, budget):
                units.append(run[a : b + 1])
        i = j + 1
    return units


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _line_indent_start(text: str, pos: int) -> int:
    """Extend ``pos`` back over the indentation of its line, keeping code's shape."""
    start = pos
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    return start if start == 0 or text[start - 1] == "\n" else pos


def _fit_crumbs(
    crumbs: list[str], count_tokens: CountTokens, max_tokens: int
) -> list[tuple[str, int]]:
    """Token counts of breadcrumbs (with separator), shortened to at most half the cap."""
    cap = max_tokens // 2
    fitted = {c: c for c in set(crumbs) if c}
    counts: dict[str, int] = {}
    while True:
        todo = [c for c in fitted if c not in counts]
        if not todo:
            break
        for c, n in zip(todo, count_tokens([fitted[c] + _CRUMB_SEP for c in todo]), strict=True):
            if n <= cap:
                counts[c] = n
            elif " > " in fitted[c]:
                fitted[c] = fitted[c].rsplit(" > ", 1)[1]  # the innermost heading matters most
            else:
                fitted[c] = fitted[c][: max(0, len(fitted[c]) * cap // n - 1)]
                if not fitted[c]:
                    counts[c] = 0
    return [(fitted[c], counts[c]) if c else ("", 0) for c in crumbs]


def _initial_pieces(
    text: str, sections: list[Section], count_tokens: CountTokens
) -> list[list[_Piece]]:
    spans = [b for s in sections for b in s.blocks]
    counts = iter(count_tokens([text[a:b] for a, b in spans]))
    return [[(a, b, next(counts), 0, k) for k, (a, b) in enumerate(s.blocks)] for s in sections]


def _split_once(
    text: str, piece: _Piece, budget: int, levels: tuple[str, ...], language: str | None
) -> list[tuple[Span, int]]:
    """Split a piece at the first level that yields more than one part."""
    start, end, tokens, level, _ = piece
    for lvl in range(level, len(levels)):
        name = levels[lvl]
        span = (start, end)
        if name == "code":
            parts = split_code_block(text, span, language)
            if len(parts) > 1:
                return [(p, lvl) for p in parts]  # nested groups may split again
            continue
        if name == "chars":
            size = (end - start) * budget * 9 // (10 * max(tokens, 1))
            return [(p, lvl) for p in split_chars(text, span, size)]
        splitter = {"lines": split_lines, "sentences": split_sentences, "words": split_words}
        parts = splitter[name](text, span)
        if len(parts) > 1:
            return [(p, lvl + 1) for p in parts]
    return [((start, end), len(levels))]


def _split_oversized(
    text: str,
    pieces: list[list[_Piece]],
    budgets: list[int],
    levels: tuple[str, ...],
    language: str | None,
    count_tokens: CountTokens,
) -> list[list[_Piece]]:
    """Split pieces over their section's budget until all fit; one count call per round."""
    while True:
        plan: list[list[_Piece | list[tuple[Span, int]]]] = []
        new: list[Span] = []
        blocks_of: dict[int, int] = {}
        for si, section_pieces in enumerate(pieces):
            row: list[_Piece | list[tuple[Span, int]]] = []
            for p in section_pieces:
                if p[2] > budgets[si] and p[3] < len(levels) and p[1] - p[0] > 1:
                    parts = _split_once(text, p, budgets[si], levels, language)
                    blocks_of[id(parts)] = p[4]
                    new.extend(s for s, _ in parts)
                    row.append(parts)
                else:
                    row.append(p)
            plan.append(row)
        if not new:
            return pieces
        counts = iter(count_tokens([text[a:b] for a, b in new]))
        pieces = []
        for row in plan:
            out: list[_Piece] = []
            for item in row:
                if isinstance(item, list):
                    item_block = blocks_of[id(item)]
                    out.extend((a, b, next(counts), lvl, item_block) for (a, b), lvl in item)
                else:
                    out.append(item)
            pieces.append(out)


def _pack(tokens: list[int], hashes: list[int], budget: int) -> list[tuple[int, int]]:
    """Group consecutive pieces into chunks (inclusive index ranges) by content."""
    n = len(tokens)
    min_fill = budget * _MIN_FILL
    main_k = _HASH_SPACE / (budget * _TARGET)
    backup_k = _HASH_SPACE / (budget * _BACKUP)
    out: list[tuple[int, int]] = []
    sizes: list[int] = []
    i = 0
    while i < n:
        start, total, backup, backup_total = i, 0, -1, 0
        while True:
            total += tokens[i]
            if i == n - 1:
                end = i
                break
            if total >= min_fill:
                if hashes[i] < tokens[i] * main_k:
                    end = i
                    break
                if hashes[i] < tokens[i] * backup_k:
                    backup, backup_total = i, total
            if total + tokens[i + 1] > budget:
                end = backup if backup >= 0 else i
                total = backup_total if backup >= 0 else total
                break
            i += 1
        out.append((start, end))
        sizes.append(total)
        i = end + 1
    # A small tail would be a weak chunk on its own; fold it into the one before.
    if len(out) > 1 and sizes[-1] < min_fill and sizes[-1] + sizes[-2] <= budget:
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out


def _enforce_cap(
    text: str,
    groups: list[tuple[int, list[_Piece]]],
    crumbs: list[str],
    count_tokens: CountTokens,
    max_tokens: int,
) -> list[tuple[int, list[_Piece]]]:
    """Recount whole chunk texts; halve any that a non-additive tokenizer pushed over."""
    known = [
        len(g) == 1 and not crumbs[si] and _line_indent_start(text, g[0][0]) == g[0][0]
        for si, g in groups
    ]
    while not all(known):
        todo = [i for i, k in enumerate(known) if not k]
        texts = []
        for i in todo:
            si, g = groups[i]
            body = text[_line_indent_start(text, g[0][0]) : g[-1][1]]
            texts.append(f"{crumbs[si]}{_CRUMB_SEP}{body}" if crumbs[si] else body)
        over = {i for i, n in zip(todo, count_tokens(texts), strict=True) if n > max_tokens}
        new_groups: list[tuple[int, list[_Piece]]] = []
        new_known: list[bool] = []
        for i, (si, g) in enumerate(groups):
            if i not in over:
                new_groups.append((si, g))
                new_known.append(True)
                continue
            if len(g) == 1:
                a, b, tokens, level, block = g[0]
                words = split_words(text, (a, b))
                if len(words) > 1:
                    left, right = words[len(words) // 2 - 1][1], words[len(words) // 2][0]
                else:
                    left = right = (a + b) // 2
                if left <= a:  # one character over the cap: nothing left to split
                    new_groups.append((si, g))
                    new_known.append(True)
                    continue
                half_tokens = tokens // 2
                g = [(a, left, half_tokens, level, block), (right, b, tokens - half_tokens, level, block)]
            half, acc, cut = sum(p[2] for p in g) / 2, 0, 1
            for cut in range(1, len(g)):
                acc += g[cut - 1][2]
                if acc >= half:
                    break
            new_groups.extend([(si, g[:cut]), (si, g[cut:])])
            new_known.extend([False, False])
        groups, known = new_groups, new_known
    return groups


def _pack2(tokens: list[int], hashes: list[int], budget: int) -> list[tuple[int, int]]:
    n = len(tokens)
    min_fill = budget * _MIN_FILL
    main_k = _HASH_SPACE / (budget * _TARGET)
    raw: list[tuple[int, int]] = []
    start = 0
    for i in range(n):
        if i == n - 1 or hashes[i] < tokens[i] * main_k:
            raw.append((start, i))
            start = i + 1
    prefix = [0]
    for t in tokens:
        prefix.append(prefix[-1] + t)

    def size(a: int, b: int) -> int:
        return prefix[b + 1] - prefix[a]

    out: list[tuple[int, int]] = []
    stack = list(reversed(raw))
    while stack:
        a, b = stack.pop()
        if a == b or size(a, b) <= budget:
            small = (size(*out[-1]) < min_fill or size(a, b) < min_fill) if (out and not os.environ.get("M2")) else (out and size(a, b) < min_fill)
            if out and small and size(out[-1][0], b) <= budget:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
            continue
        best, best_score, best_ok = a, 0.0, False
        for g in range(a, b):
            ok = (size(a, g) >= min_fill and size(g + 1, b) >= min_fill) if not os.environ.get("NOOK") else True
            score = hashes[g] / max(tokens[g], 1)
            if (ok and not best_ok) or (ok == best_ok and (g == a or score < best_score)):
                best, best_score, best_ok = g, score, ok
        stack.append((best + 1, b))
        stack.append((a, best))
    return out
import os

PACK = _pack2 if os.environ.get("PACK2") else _pack
