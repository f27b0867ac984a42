"""The model runner: processor, batched forward of the base model, last-token pooling.

Unlike the official recipe it never computes the LM head's logits nor keeps per-layer
hidden states: it runs the vision tower, the projector and the decoder, then reads the
final (normed) hidden state at each sequence's last real token. Sequences are padded on
the right and given their own attention mask, so a vector does not depend on what else
is in its batch, whatever padding side the tokenizer was saved with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from e5v.loading import LoadedModel

__all__ = ["Encoded", "encode", "forward"]


@dataclass
class Encoded:
    """One prompt, tokenised, with its images' anyres tiles."""

    input_ids: torch.Tensor  # (length,)
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W): every tile of every image, in order
    image_sizes: torch.Tensor | None  # (images, 2) as (height, width)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def encode(loaded: LoadedModel, prompt: str, images: Sequence[Image.Image]) -> Encoded:
    """Run the processor on one prompt and its images (one ``<image>`` slot each)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    batch = loaded.processor(text=[prompt], images=list(images) or None, return_tensors="pt")
    input_ids = batch["input_ids"][0]
    if not images:
        return Encoded(input_ids, None, None)
    config = loaded.model.config
    sizes = batch["image_sizes"]
    pixel_values = batch["pixel_values"]
    tiles = [
        pixel_values[
            i, : image_size_to_num_patches(sizes[i], config.image_grid_pinpoints, config.vision_config.image_size)
        ]
        for i in range(len(images))
    ]
    return Encoded(input_ids, torch.cat(tiles, dim=0), sizes)


def forward(loaded: LoadedModel, batch: Sequence[Encoded]) -> torch.Tensor:
    """Embed a batch of encoded prompts: L2-normalised float32 vectors, shape ``(len(batch), d)``."""
    model = loaded.model
    device = loaded.input_device
    lengths = torch.tensor([item.length for item in batch])
    width = int(lengths.max())
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, : item.length] = item.input_ids
        attention_mask[row, : item.length] = 1
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device)

    image_mask = (input_ids == loaded.image_token_id) & attention_mask.bool()
    # Look up ids with image slots masked: the published checkpoint has no row for <image>.
    embeds = model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    with_images = [item for item in batch if item.pixel_values is not None]
    if with_images:
        pixel_values = torch.cat([item.pixel_values for item in with_images]).to(device, loaded.dtype)
        image_sizes = torch.cat([item.image_sizes for item in with_images]).to(device)
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)
        if features.shape[0] != int(image_mask.sum()):
            raise RuntimeError(
                f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features: "
                "the processor and the model disagree on the anyres layout"
            )
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features)

    hidden = model.model.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, return_dict=True
    ).last_hidden_state
    last = hidden[torch.arange(len(batch), device=hidden.device), (lengths - 1).to(hidden.device)]
    return torch.nn.functional.normalize(last.float(), dim=-1)
