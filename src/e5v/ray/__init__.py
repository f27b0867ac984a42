"""E5-V on Ray: bulk embedding of Ray Data datasets (:mod:`e5v.ray.data`) and ``e5v serve``
as Ray Serve replicas (:mod:`e5v.ray.serve`, imported on its own: it needs Ray Serve).

Needs the ``ray`` extra (``pip install "e5v[ray]"``).
"""

from __future__ import annotations

from e5v.ray.data import AUTO_ROWS_PER_BATCH, embed_dataset

__all__ = ["AUTO_ROWS_PER_BATCH", "embed_dataset"]
