"""A benchmark's outcome: its metrics (percentages) and what it wrote."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TaskResult"]


@dataclass
class TaskResult:
    """``metrics``: name -> value in percent (Recall@k, nDCG, Spearman x 100); ``counts``:
    queries, gallery items or pairs evaluated; ``files``: what the task wrote (name -> path)."""

    task: str
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"metrics": self.metrics, "counts": self.counts, "files": self.files}
