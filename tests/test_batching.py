"""Token-budget batch planning: examples and the properties every plan must have."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from repd.core.batching import halve, padded_cost, plan_batches


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


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=300),
    budget=st.integers(min_value=1, max_value=5000),
    max_batch=st.integers(min_value=1, max_value=64),
)
def test_plan_properties(lengths: list[int], budget: int, max_batch: int) -> None:
    plan = plan_batches(lengths, budget, max_batch)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(batch for batch in plan)
    for batch in plan:
        assert len(batch) <= max_batch
        assert len(batch) == 1 or padded_cost(lengths, batch) <= budget
    # Longest first across the whole plan, so padding inside a batch is minimal.
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    # Greedy: a batch closed only because the next item would not fit.
    for batch, following in itertools.pairwise(plan):
        grown = [*batch, following[0]]
        assert len(grown) > max_batch or padded_cost(lengths, grown) > budget


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
