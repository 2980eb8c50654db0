"""Token-budget batch planning: examples and the properties every plan must have."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from repd.core.batching import halve, padded_cost, padding_share, plan_batches


def test_longest_first_and_within_budget() -> None:
    # 1 and 3 (50 tokens) fill a 100-token budget; 2 (30) and 0 (10) share the next.
    assert plan_batches([10, 50, 30, 50], token_budget=100) == [[1, 3], [2, 0]]


def test_over_budget_item_goes_alone() -> None:
    assert plan_batches([500, 10, 10], token_budget=100) == [[0], [1, 2]]


def test_max_batch_caps_short_texts() -> None:
    plan = plan_batches([1] * 10, token_budget=1000, max_batch=4)
    assert [len(b) for b in plan] == [4, 4, 2]


def test_empty_input_plans_nothing() -> None:
    assert plan_batches([], token_budget=10) == []


def test_ties_keep_input_order() -> None:
    assert plan_batches([5, 5, 5], token_budget=10) == [[0, 1], [2]]


@pytest.mark.parametrize(("budget", "max_batch"), [(0, 1), (10, 0)])
def test_rejects_nonsense_limits(budget: int, max_batch: int) -> None:
    with pytest.raises(ValueError):
        plan_batches([1, 2], token_budget=budget, max_batch=max_batch)


def test_padded_cost() -> None:
    assert padded_cost([3, 7, 5], [0, 2]) == 10
    assert padded_cost([3, 7, 5], []) == 0


def _total(lengths: list[int], plan: list[list[int]], overhead: int) -> int:
    return sum(padded_cost(lengths, b) for b in plan) + overhead * len(plan)


def _greedy(lengths: list[int], budget: int, max_batch: int) -> list[list[int]]:
    """The planner before batch_overhead: longest first, each batch filled to the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan: list[list[int]] = []
    for i in order:
        last = plan[-1] if plan else []
        if last and len(last) < max_batch and (len(last) + 1) * lengths[last[0]] <= budget:
            last.append(i)
        else:
            plan.append([i])
    return plan


def test_closes_a_batch_where_lengths_drop() -> None:
    # Filling to the budget would put 100, 100, 10, 10 together (360 padded tokens for
    # 220 real). Two batches pad nothing and cost 220 + 2 * 50.
    lengths = [100, 10, 100, 10]
    assert plan_batches(lengths, token_budget=400, batch_overhead=50) == [[0, 2], [1, 3]]
    # When a pass's fixed cost is worth more than the padding, one batch it is.
    assert plan_batches(lengths, token_budget=400, batch_overhead=200) == [[0, 2, 1, 3]]


def test_padding_share() -> None:
    assert padding_share([100, 10, 100, 10], [[0, 2, 1, 3]]) == (400 - 220) / 220
    assert padding_share([100, 10, 100, 10], [[0, 2], [1, 3]]) == 0.0
    assert padding_share([], []) == 0.0


def test_rejects_negative_overhead() -> None:
    with pytest.raises(ValueError):
        plan_batches([1, 2], token_budget=10, batch_overhead=-1)


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=300),
    budget=st.integers(min_value=1, max_value=5000),
    max_batch=st.integers(min_value=1, max_value=64),
    overhead=st.integers(min_value=0, max_value=2000),
)
def test_plan_properties(lengths: list[int], budget: int, max_batch: int, overhead: int) -> None:
    plan = plan_batches(lengths, budget, max_batch, overhead)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(batch for batch in plan)
    for batch in plan:
        assert len(batch) <= max_batch
        assert len(batch) == 1 or padded_cost(lengths, batch) <= budget
    # Longest first across the whole plan (ties in input order), so each batch is a run
    # of neighbouring lengths.
    assert flat == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # Never worse than filling each batch to the budget, the planner it replaced.
    assert _total(lengths, plan, overhead) <= _total(
        lengths, _greedy(lengths, budget, max_batch), overhead)
    # No two neighbouring batches would be cheaper as one.
    for batch, following in itertools.pairwise(plan):
        merged = [*batch, *following]
        if len(merged) <= max_batch and padded_cost(lengths, merged) <= budget:
            assert padded_cost(lengths, merged) + overhead >= (
                padded_cost(lengths, batch) + padded_cost(lengths, following))


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=50), max_size=9),
    budget=st.integers(min_value=1, max_value=200),
    max_batch=st.integers(min_value=1, max_value=6),
    overhead=st.integers(min_value=0, max_value=100),
)
def test_plan_is_cheapest_cut_of_the_sorted_order(
    lengths: list[int], budget: int, max_batch: int, overhead: int
) -> None:
    # Brute force: every way to cut the sorted order into runs that respect the limits.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cheapest: int | None = None
    for cuts in itertools.product([False, True], repeat=max(0, len(order) - 1)):
        plan: list[list[int]] = [[order[0]]] if order else []
        for cut, i in zip(cuts, order[1:], strict=True):
            if cut:
                plan.append([i])
            else:
                plan[-1].append(i)
        if all(len(b) <= max_batch and (len(b) == 1 or padded_cost(lengths, b) <= budget)
               for b in plan):
            cost = _total(lengths, plan, overhead)
            cheapest = cost if cheapest is None else min(cheapest, cost)
    plan = plan_batches(lengths, budget, max_batch, overhead)
    assert _total(lengths, plan, overhead) == (cheapest if cheapest is not None else 0)


def test_large_input_plans_with_little_padding() -> None:
    # 20,000 texts of every length from 2 to 256 tokens (a large group of files).
    lengths = [(i * 7919) % 255 + 2 for i in range(20_000)]
    plan = plan_batches(lengths, 16384, 256)
    assert sum(len(b) for b in plan) == 20_000
    assert padding_share(lengths, plan) < 0.05


@given(st.lists(st.integers(), min_size=2, max_size=100))
def test_halve_properties(batch: list[int]) -> None:
    first, second = halve(batch)
    assert first + second == batch
    assert first
    assert second
    assert 0 <= len(first) - len(second) <= 1


def test_halve_refuses_a_single_item() -> None:
    with pytest.raises(ValueError):
        halve([7])
