"""Cost-aware batching: group prompts of similar token counts under an item and token budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import TypeVar

from e5v.errors import ConfigurationError

__all__ = ["BATCH_COST_TOKENS", "check_batch_size", "chunked", "plan_batches"]

T = TypeVar("T")

#: A forward pass's fixed cost, in tokens' worth of compute: the per-layer launches and
#: Python overhead that a batch pays whatever its size. On the small benchmark model on a
#: 2-core CPU one forward of a short text costs about 13 ms plus 0.12 ms a token (docs/performance.md).
BATCH_COST_TOKENS = 128


def plan_batches(
    costs: Sequence[int], *, max_items: int, max_tokens: int | None = None, batch_cost: int = BATCH_COST_TOKENS
) -> list[list[int]]:
    """Split indices into batches, longest first, each padded to its longest member.

    A batch holds at most ``max_items`` items and, when ``max_tokens`` is set, at most
    ``max_tokens`` padded tokens (``len(batch) * longest``); an item longer than the
    token budget goes alone. Of the ways to cut the longest-first order into such batches,
    the one chosen computes the fewest padded tokens plus ``batch_cost`` a batch (so a short
    item is not padded to a long one's length when a batch of its own costs less); among
    equals, earlier batches are the fuller.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1 or None, got {max_tokens}")
    if batch_cost < 0:
        raise ValueError(f"batch_cost must be at least 0, got {batch_cost}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    widths = [costs[i] for i in order]
    n = len(order)
    # best[i]: the least cost of batching order[i:]; end[i]: where the first of its batches ends.
    # A batch order[i:j] costs (j - i) * widths[i] + batch_cost, so best[i] is the least
    # best[j] + j * widths[i] over the j that fit, less i * widths[i], plus batch_cost. Over a
    # run of equal widths that is a minimum over a window sliding left: a deque of candidates,
    # rebuilt when the width changes, finds each in constant time (O(n + runs * fits) in all).
    best = [0] * (n + 1)
    end = [n] * (n + 1)
    candidates: deque[int] = deque()  # j, largest first; their values non-decreasing
    for start in range(n - 1, -1, -1):
        width = widths[start]
        fits = max_items if max_tokens is None or width < 1 else min(max_items, max(1, max_tokens // width))
        last = min(n, start + fits)
        if start == n - 1 or width != widths[start + 1]:
            candidates.clear()
            for stop in range(last, start + 1, -1):
                _push(candidates, stop, best, width)
        while candidates and candidates[0] > last:
            candidates.popleft()
        _push(candidates, start + 1, best, width)
        stop = candidates[0]
        best[start], end[start] = (stop - start) * width + batch_cost + best[stop], stop
    batches: list[list[int]] = []
    start = 0
    while start < n:
        batches.append(order[start : end[start]])
        start = end[start]
    return batches


def _push(candidates: deque[int], stop: int, best: list[int], width: int) -> None:
    """Add the cut ``stop`` (smaller than every cut held) to the window's candidates,
    dropping those it beats: they end later and cost more. On equal cost the earlier
    held cut stays ahead, so that the fuller batch wins ties."""
    value = best[stop] + stop * width
    while candidates and best[candidates[-1]] + candidates[-1] * width > value:
        candidates.pop()
    candidates.append(stop)


def check_batch_size(value: object) -> None:
    """Refuse a ``batch_size`` option other than ``"auto"`` or a positive integer."""
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"batch_size must be 'auto' or a positive integer, got {value!r}")


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
