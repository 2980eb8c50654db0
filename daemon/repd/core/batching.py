"""Token-budget batch planning for the embed batcher: which texts go through the model together."""

from __future__ import annotations

from collections.abc import Sequence


def padded_cost(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens a batch costs once padded to its longest member: ``len(batch) * max length``."""
    if not batch:
        return 0
    return len(batch) * max(lengths[i] for i in batch)


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch: int = 256
) -> list[list[int]]:
    """Split item indices into batches whose padded cost stays within ``token_budget``.

    Items are taken longest first (ties in input order), so each batch holds texts of
    similar length and little compute goes to padding. A batch's padded cost,
    ``len(batch) * max(lengths in batch)``, is at most ``token_budget``, except that an
    item longer than the budget on its own forms a batch of one. No batch holds more
    than ``max_batch`` items. Every index appears in exactly one batch.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        # Sorted descending, so the first item of a batch is its longest: adding one more
        # costs (len + 1) * longest, no need to rescan the batch.
        if current and (len(current) >= max_batch or (len(current) + 1) * longest > token_budget):
            batches.append(current)
            current = []
        if not current:
            longest = lengths[index]
        current.append(index)
    if current:
        batches.append(current)
    return batches


def halve(batch: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split a batch of two or more items into two non-empty halves, order kept.

    Used after an out-of-memory error; the first half keeps the longer items when the
    batch is sorted longest first, so its retry is the one most likely to fail again.
    """
    if len(batch) < 2:
        raise ValueError("cannot halve a batch of fewer than two items")
    middle = (len(batch) + 1) // 2
    return list(batch[:middle]), list(batch[middle:])
