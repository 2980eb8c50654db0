"""Token-budget batch planning for the embed batcher: which texts go through the model together.

A forward pass costs its padded tokens (rows times the longest row) plus a fixed part
(the Python and kernel-launch work of one call). Filling every batch to the budget
minimises the fixed part but pads a batch that spans a wide range of lengths; a batch
per distinct length pads nothing but pays the fixed part hundreds of times. The planner
takes the texts longest first and cuts that order where the sum of both is least.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The fixed cost of one forward pass, in padded tokens. Measured with MiniLM on the
# 2-core CPU (96 SciFact chunks of 170 tokens in passes of 4 to 96 rows, CPU time fitted
# as a + b * passes): a pass costs about 1,200 tokens' worth beyond its padded tokens,
# small passes being the least efficient. Larger makes batches fuller (fewer passes,
# more padding), smaller makes them tighter. A GPU's fixed cost per pass is larger.
BATCH_OVERHEAD_TOKENS = 1024


def padded_cost(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens a batch costs once padded to its longest member: ``len(batch) * max length``."""
    if not batch:
        return 0
    return len(batch) * max(lengths[i] for i in batch)


def padding_share(lengths: Sequence[int], plan: Sequence[Sequence[int]]) -> float:
    """Padded tokens beyond the real ones, over the real ones (0.05 means 5 % waste)."""
    real = sum(lengths[i] for batch in plan for i in batch)
    padded = sum(padded_cost(lengths, batch) for batch in plan)
    return (padded - real) / real if real else 0.0


def plan_batches(
    lengths: Sequence[int], token_budget: int, max_batch: int = 256,
    batch_overhead: int = BATCH_OVERHEAD_TOKENS,
) -> list[list[int]]:
    """Split item indices into batches whose padded cost stays within ``token_budget``.

    Items are ordered longest first (ties in input order) and the order is cut into
    batches so that the padded tokens of all batches plus ``batch_overhead`` per batch
    is least: a batch closes early where the lengths drop, instead of padding the
    shorter texts after it. A batch's padded cost, ``len(batch) * max(lengths in
    batch)``, is at most ``token_budget``, except that an item longer than the budget on
    its own forms a batch of one. No batch holds more than ``max_batch`` items. Every
    index appears in exactly one batch. Among plans of equal cost the one with the
    fuller early batches is chosen, so ``batch_overhead`` 0 on equal lengths still fills.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if batch_overhead < 0:
        raise ValueError(f"batch_overhead must be >= 0, got {batch_overhead}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # Sorted descending, so a batch starting at position i is as wide as item i, and
    # best[i], the least cost of items i.. to the end, only needs the batches that
    # start at i: best[i] = overhead + min over k of (k * width_i + best[i + k]).
    best = np.zeros(n + 1, dtype=np.int64)
    take = [0] * n
    for i in range(n - 1, -1, -1):
        width = lengths[order[i]]
        fits = token_budget // width if width > 0 else max_batch
        most = max(1, min(max_batch, n - i, fits))
        costs = np.arange(1, most + 1, dtype=np.int64) * width + best[i + 1:i + most + 1]
        # argmin returns the first minimum: searched from the largest k, ties go to the
        # fuller batch.
        k = most - int(np.argmin(costs[::-1]))
        take[i] = k
        best[i] = batch_overhead + int(costs[k - 1])
    batches: list[list[int]] = []
    i = 0
    while i < n:
        batches.append(order[i:i + take[i]])
        i += take[i]
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
