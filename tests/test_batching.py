"""Token-budget batching: budgets respected, long items alone, every index exactly once,
and the cheapest split of the longest-first order (padded tokens plus a cost a batch)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e5v.core.batching import chunked, plan_batches


@given(
    costs=st.lists(st.integers(1, 500), max_size=60),
    max_items=st.integers(1, 10),
    max_tokens=st.one_of(st.none(), st.integers(1, 2000)),
)
def test_budgets_coverage_and_order(costs, max_items, max_tokens):
    batches = plan_batches(costs, max_items=max_items, max_tokens=max_tokens)
    assert sorted(i for batch in batches for i in batch) == list(range(len(costs)))
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        widths = [costs[i] for i in batch]
        assert widths == sorted(widths, reverse=True)  # longest first: the first member sets the padding
        if max_tokens is not None and len(batch) > 1:
            assert max(widths) * len(batch) <= max_tokens
    flat = [costs[i] for batch in batches for i in batch]
    assert flat == sorted(flat, reverse=True)  # similar lengths batched together


def _cost(costs, batches, batch_cost):
    return sum(len(batch) * max(costs[i] for i in batch) + batch_cost for batch in batches)


@given(
    costs=st.lists(st.integers(1, 300), max_size=9),
    max_items=st.integers(1, 5),
    max_tokens=st.one_of(st.none(), st.integers(1, 900)),
    batch_cost=st.integers(0, 400),
)
def test_cheapest_split_of_the_longest_first_order(costs, max_items, max_tokens, batch_cost):
    batches = plan_batches(costs, max_items=max_items, max_tokens=max_tokens, batch_cost=batch_cost)
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    cheapest = None
    for cuts in itertools.product([False, True], repeat=max(len(order) - 1, 0)):
        split, current = [], order[:1]
        for index, cut in zip(order[1:], cuts):
            if cut:
                split.append(current)
                current = []
            current.append(index)
        split += [current] if current else []
        fits = all(
            len(batch) <= max_items
            and (len(batch) == 1 or max_tokens is None or len(batch) * costs[batch[0]] <= max_tokens)
            for batch in split
        )
        if fits and (cheapest is None or _cost(costs, split, batch_cost) < cheapest):
            cheapest = _cost(costs, split, batch_cost)
    assert _cost(costs, batches, batch_cost) == (cheapest or 0)


def _plain_plan(costs, max_items, max_tokens, batch_cost):
    """The same choice by trying every end of every batch (quadratic), fullest first on ties."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    n = len(order)
    best, end = [0] * (n + 1), [n] * (n + 1)
    for start in range(n - 1, -1, -1):
        width = costs[order[start]]
        fits = max_items if max_tokens is None or width < 1 else min(max_items, max(1, max_tokens // width))
        for stop in range(min(n, start + fits), start, -1):
            cost = (stop - start) * width + batch_cost + best[stop]
            if stop == min(n, start + fits) or cost < best[start]:
                best[start], end[start] = cost, stop
    batches, start = [], 0
    while start < n:
        batches.append(order[start : end[start]])
        start = end[start]
    return batches


@given(
    costs=st.lists(st.one_of(st.integers(0, 4), st.integers(0, 3000)), max_size=120),
    max_items=st.integers(1, 300),
    max_tokens=st.one_of(st.none(), st.integers(1, 20000)),
    batch_cost=st.integers(0, 400),
)
def test_the_sliding_window_plans_what_trying_every_cut_plans(costs, max_items, max_tokens, batch_cost):
    expected = _plain_plan(costs, max_items, max_tokens, batch_cost)
    assert plan_batches(costs, max_items=max_items, max_tokens=max_tokens, batch_cost=batch_cost) == expected


def test_a_short_item_is_not_padded_to_long_ones():
    # Greedy filling would pad the 96-token text to 266 beside two images; a batch more costs less.
    costs = [266, 266, 96, 86, 85]
    assert plan_batches(costs, max_items=16, max_tokens=1024, batch_cost=128) == [[0, 1], [2, 3, 4]]
    # With a forward's fixed cost above the padding saved, one batch is cheaper.
    assert plan_batches(costs, max_items=16, max_tokens=2048, batch_cost=600) == [[0, 1, 2, 3, 4]]


def test_item_over_the_token_budget_goes_alone():
    assert plan_batches([10, 900, 10, 10], max_items=4, max_tokens=100) == [[1], [0, 2, 3]]


def test_token_budget_splits_before_item_budget():
    assert plan_batches([50] * 5, max_items=10, max_tokens=120) == [[0, 1], [2, 3], [4]]


def test_ties_keep_input_order():
    assert plan_batches([3, 3, 3], max_items=2) == [[0, 1], [2]]


def test_empty_and_invalid_budgets():
    assert plan_batches([], max_items=3) == []
    with pytest.raises(ValueError, match="max_items"):
        plan_batches([1], max_items=0)
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches([1], max_items=1, max_tokens=0)
    with pytest.raises(ValueError, match="batch_cost"):
        plan_batches([1], max_items=1, batch_cost=-1)


def test_chunked():
    assert [list(c) for c in chunked(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
