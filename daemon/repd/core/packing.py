"""Packing: group consecutive pieces into chunks with content-defined boundaries.

Pure arithmetic on token counts and piece hashes. Boundaries depend on the content of
the pieces next to them, not on where the previous chunk happened to start, so an
edit moves at most the boundaries beside it and later chunks are left alone. Greedy
packing would shift every boundary after an edit and re-embed the rest of the file.

Ranges are inclusive index pairs ``(first, last)`` into the piece list.
"""

from __future__ import annotations

from collections.abc import Sequence

# A chunk whose content is below this share of the budget is folded into a neighbour.
MIN_FILL = 0.2
# A piece ends a chunk with probability tokens / (TARGET * budget): hash cuts then fall
# about TARGET of the budget apart whatever the piece granularity (merging small
# chunks brings the mean chunk to roughly 45% of the budget).
TARGET = 0.3
_HASH_SPACE = float(1 << 64)

Range = tuple[int, int]


def cdc_ranges(
    tokens: Sequence[int], hashes: Sequence[int], ranks: Sequence[int], budget: int
) -> list[Range]:
    """Cut after every piece whose hash passes the size-weighted test, then split runs
    still over ``budget`` at their most boundary-like gap (coarsest rank first, then
    lowest hash per token), recursively. ``ranks[i]`` ranks the gap *before* piece i.
    """
    n = len(tokens)
    scale = _HASH_SPACE / (budget * TARGET)
    prefix = [0]
    for t in tokens:
        prefix.append(prefix[-1] + t)
    runs: list[Range] = []
    start = 0
    for i in range(n):
        if i == n - 1 or hashes[i] < tokens[i] * scale:
            runs.append((start, i))
            start = i + 1
    out: list[Range] = []
    stack = runs[::-1]
    min_fill = budget * MIN_FILL
    while stack:
        a, b = stack.pop()
        if a == b or prefix[b + 1] - prefix[a] <= budget:
            out.append((a, b))
            continue
        best: tuple[bool, int, float, int] | None = None
        cut = a
        for g in range(a, b):
            # Prefer cuts that leave neither side tiny; among those the coarsest and
            # most boundary-like, so the choice depends on content, not on position.
            # Identical pieces (a CSV, a repeated line) tie: then cut nearest the
            # middle, which keeps the recursion logarithmic instead of quadratic.
            left, right = prefix[g + 1] - prefix[a], prefix[b + 1] - prefix[g + 1]
            unbalanced = left < min_fill or right < min_fill
            key = (unbalanced, ranks[g + 1], hashes[g] / max(tokens[g], 1), abs(left - right))
            if best is None or key < best:
                best, cut = key, g
        stack.append((cut + 1, b))
        stack.append((a, cut))
    return out


def fewest(
    tokens: Sequence[int], hashes: Sequence[int], ranks: Sequence[int], budget: int
) -> list[Range]:
    """Split into the fewest chunks that fit, cutting at the best gaps that allow it.

    Used for a block a little over the budget, so that it becomes two (or three) full
    chunks rather than a scatter of small ones. Each cut is the most boundary-like gap
    (balanced first, coarsest rank, lowest hash per token) that keeps the count minimal.
    """
    prefix = [0]
    for t in tokens:
        prefix.append(prefix[-1] + t)
    min_fill = budget * MIN_FILL

    def count(a: int, b: int) -> int:
        n, acc = 1, 0
        for i in range(a, b + 1):
            if acc + tokens[i] > budget and acc:
                n, acc = n + 1, 0
            acc += tokens[i]
        return n

    out: list[Range] = []
    stack = [(0, len(tokens) - 1, count(0, len(tokens) - 1))]
    while stack:
        a, b, k = stack.pop()
        if k == 1:
            out.append((a, b))
            continue
        best: tuple[bool, int, float] | None = None
        cut = (a, 1, k - 1)
        for g in range(a, b):
            left, right = count(a, g), count(g + 1, b)
            if left + right != k:
                continue
            unbalanced = min(prefix[g + 1] - prefix[a], prefix[b + 1] - prefix[g + 1]) < min_fill
            key = (unbalanced, ranks[g + 1], hashes[g] / max(tokens[g], 1))
            if best is None or key < best:
                best, cut = key, (g, left, right)
        g, left, right = cut
        stack.append((g + 1, b, right))
        stack.append((a, g, left))
    return out


def merge_small(ranges: list[Range], tokens: Sequence[int], budget: int) -> list[Range]:
    """Fold chunks under ``MIN_FILL`` of the budget into the chunk before (or after) them."""
    prefix = [0]
    for t in tokens:
        prefix.append(prefix[-1] + t)

    def size(a: int, b: int) -> int:
        return prefix[b + 1] - prefix[a]

    min_fill = budget * MIN_FILL
    out: list[Range] = []
    carry: Range | None = None  # a small first chunk waiting to join the next one
    for a, b in ranges:
        if carry is not None:
            if size(carry[0], b) <= budget:
                a = carry[0]
            else:
                out.append(carry)
            carry = None
        if size(a, b) < min_fill:
            if out and size(out[-1][0], b) <= budget:
                out[-1] = (out[-1][0], b)
                continue
            if not out:
                carry = (a, b)
                continue
        out.append((a, b))
    if carry is not None:
        out.append(carry)
    return out
