"""The paper's benchmarks: their names, and the published numbers e5v's stand beside.

Light on purpose (no torch, no datasets): the command line reads it to check its targets.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MTEB_PUBLISHED", "PAPER", "PAPER_TASKS", "TASKS", "tasks_of"]

#: Every benchmark, in the paper's order; ``i2i-flickr30k`` is optional.
TASKS = ("flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "sts", "i2i-flickr30k")
#: What ``e5v eval paper`` runs.
PAPER_TASKS = ("flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "sts")

#: The paper's zero-shot figures (CIRR: test, from the evaluation server; I2I: the drawn
#: captions as queries, ``t2i`` as for Flickr30K).
PAPER: dict[str, dict[str, float]] = {
    "flickr30k": {
        "t2i R@1": 79.5, "t2i R@5": 95.0, "t2i R@10": 97.6,
        "i2t R@1": 88.2, "i2t R@5": 98.7, "i2t R@10": 99.4,
    },
    "coco": {
        "t2i R@1": 52.0, "t2i R@5": 76.5, "t2i R@10": 84.7,
        "i2t R@1": 62.0, "i2t R@5": 83.6, "i2t R@10": 89.7,
    },
    "cirr-test": {"R@1": 33.90, "R@5": 64.12, "R@10": 75.88, "R@50": 93.54},
    "fashioniq": {"avg R@10": 31.80, "avg R@50": 53.78},
    "sts": {"avg": 86.00},
    "i2i-flickr30k": {"t2i R@1": 79.5},
}  # fmt: skip

#: MTEB's published run of the released weights, where it has the same task (its CIRR
#: uses another composed prompt and M-BEIR's split, hence the gap).
MTEB_PUBLISHED: dict[str, dict[str, float]] = {
    "flickr30k": {"t2i R@1": 80.6, "i2t R@1": 88.3},
    "coco": {"t2i R@1": 52.4, "i2t R@1": 61.2},
    "cirr-test": {"R@1": 13.1},
}


def tasks_of(names: Sequence[str]) -> list[str]:
    """Task names with ``paper`` expanded, in :data:`TASKS` order, each once."""
    wanted = {task for name in names for task in (PAPER_TASKS if name == "paper" else (name,))}
    return [task for task in TASKS if task in wanted]
