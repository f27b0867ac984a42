"""Cost-aware batching: group prompts of similar token counts under an item and token budget."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

__all__ = ["chunked", "plan_batches"]

T = TypeVar("T")


def plan_batches(costs: Sequence[int], *, max_items: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split indices into batches, longest first, each padded to its longest member.

    A batch holds at most ``max_items`` items and, when ``max_tokens`` is set, at most
    ``max_tokens`` padded tokens (``len(batch) * longest``); an item longer than the
    token budget goes alone.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1 or None, got {max_tokens}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = costs[current[0]] if current else costs[index]
        full = len(current) >= max_items or (max_tokens is not None and width * (len(current) + 1) > max_tokens)
        if current and full:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
