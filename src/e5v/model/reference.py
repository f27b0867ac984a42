"""The official E5-V recipe, one item at a time: the reference e5v's fast path must equal.

``processor(text=[prompt], images=...)`` then the full causal-LM forward with
``output_hidden_states=True``, ``hidden_states[-1][:, -1, :]``, L2-normalised (model
card of ``royokong/e5-v``). It computes the LM head's logits and keeps every layer's
states to read one vector; use it to check results, not to embed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from e5v.model.loading import add_image_token_row

__all__ = ["official_embedding"]


def official_embedding(model: Any, processor: Any, prompt: str, images: Sequence[Image.Image] = ()) -> np.ndarray:
    """One item's embedding by the official recipe (float32, unit norm, shape ``(d,)``).

    Gives the published checkpoint's embedding table a row for ``<image>`` first (see
    :func:`e5v.model.loading.add_image_token_row`), as vLLM's parity test does.
    """
    add_image_token_row(model)
    device = model.get_input_embeddings().weight.device
    inputs = processor(text=[prompt], images=list(images) or None, return_tensors="pt").to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True, return_dict=True)
    vector = torch.nn.functional.normalize(outputs.hidden_states[-1][:, -1, :], dim=-1)
    return vector[0].float().cpu().numpy()
