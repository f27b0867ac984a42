"""InfoNCE over cosine similarities, with in-batch and hard negatives, across processes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["Gather", "gather_with_grad", "info_nce_loss"]

#: Concatenates a tensor's rows from every process, in rank order, keeping gradients.
Gather = Callable[[torch.Tensor], torch.Tensor]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather along the first dimension with a backward pass (``torch.distributed``)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def info_nce_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.05,
    symmetric: bool = False,
    gather: Gather | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Cross-entropy of each anchor against every positive and negative, scaled by ``1/temperature``.

    Inputs are unit rows, ``(batch, dim)``, row ``i`` of each belonging together.
    With ``gather`` (several processes, each with ``batch`` rows and its ``rank``), the
    candidates are every process's positives and negatives. ``symmetric`` adds the
    reverse direction, each positive against every anchor, and averages the two
    (the CLIP loss; hard negatives are candidates of the anchor direction only).
    """
    batch = anchors.shape[0]
    everyone = gather or (lambda tensor: tensor)
    labels = torch.arange(batch, device=anchors.device) + rank * batch
    candidates = everyone(positives)
    if negatives is not None:
        candidates = torch.cat([candidates, everyone(negatives)])
    loss = F.cross_entropy(anchors @ candidates.T / temperature, labels)
    if symmetric:
        reverse = F.cross_entropy(positives @ everyone(anchors).T / temperature, labels)
        loss = (loss + reverse) / 2
    return loss
