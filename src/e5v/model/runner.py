"""The model runner: processor, batched forward of the base model, last-token pooling.

Unlike the official recipe it never computes the LM head's logits nor keeps per-layer
hidden states of the decoder: it runs the vision tower, the projector and the decoder,
then reads the final (normed) hidden state at each sequence's last real token.
Sequences are padded on the right, whatever padding side the tokenizer was saved with:
under causal attention no real token attends to a pad after it, so a vector does not
depend on what else is in its batch, and the decoder needs no padding mask (SDPA runs
its causal kernel, as for a single unpadded prompt).

Images are tiled on E5-V's anyres grid (``config.image_grid_pinpoints``) unless a tile
budget is given (:func:`image_grid`): each :class:`Encoded` carries the grid its tiles
were cut for, and the forward packs the image features for that grid, so the processor
and the model always agree without touching the shared model's config.

:func:`encode` is two steps: :func:`process_images` (the image processor: resizing,
tiling, normalising; safe to run for several prompts at once on threads) and
:func:`tokenize` (a batch's prompts in one tokenizer call, each ``<image>`` slot expanded
to its image's feature count; the tokenizer must not be called from two threads at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from e5v.errors import ConfigurationError, EmbeddingError
from e5v.model.loading import LoadedModel
from e5v.model.vocabulary import IMAGE_TOKEN

__all__ = [
    "Encoded",
    "Grid",
    "Pixels",
    "check_max_image_tiles",
    "encode",
    "forward",
    "image_grid",
    "image_token_count",
    "last_states",
    "max_image_token_count",
    "process_images",
    "tokenize",
    "vision_layers_run",
]

#: Anyres pinpoints as ``((height, width), ...)``; ``()`` means the base view only.
Grid = tuple[tuple[int, int], ...]


@dataclass
class Encoded:
    """One prompt, tokenised, with its images' tiles and the grid they were cut for."""

    input_ids: torch.Tensor  # (length,)
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W): every tile of every image, in order
    image_sizes: torch.Tensor | None  # (images, 2) as (height, width)
    tiles: tuple[int, ...] = ()  # tiles per image (the base view included)
    grid: Grid = ()

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class Pixels:
    """One prompt's images, processed for ``grid``: every tile in order, and per image its
    (height, width), its tile count and its ``<image>`` feature count."""

    pixel_values: torch.Tensor  # (tiles, 3, H, W)
    image_sizes: torch.Tensor  # (images, 2)
    tiles: tuple[int, ...]
    features: tuple[int, ...]
    grid: Grid


def image_grid(loaded: LoadedModel, max_image_tiles: int | None = None) -> Grid:
    """The model's anyres pinpoints holding at most ``max_image_tiles`` tiles besides the
    base view (``None``: all of them; ``()`` when none fits: the base view only)."""
    config = loaded.model.config
    size = config.vision_config.image_size
    pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
    check_max_image_tiles(max_image_tiles)
    if max_image_tiles is None:
        return pinpoints
    return tuple((h, w) for h, w in pinpoints if (h // size) * (w // size) <= max_image_tiles)


def check_max_image_tiles(value: object) -> None:
    """Refuse a ``max_image_tiles`` option other than ``None`` or an integer at least 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"max_image_tiles must be None or an integer at least 0, got {value!r}")


def image_token_count(loaded: LoadedModel, height: int, width: int, grid: Grid) -> int:
    """``<image>`` tokens (= image features) for an image of ``height`` x ``width`` on ``grid``."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    config = loaded.model.config
    size = config.vision_config.image_size
    side = size // config.vision_config.patch_size
    per_tile = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
    if not grid:
        return per_tile + 1  # the base view and one newline
    rows, cols = get_anyres_image_grid_shape([height, width], [list(p) for p in grid], size)
    unpadded = unpad_image(torch.empty(0, rows * side, cols * side), torch.tensor([height, width]))
    return per_tile + unpadded.shape[1] * (unpadded.shape[2] + 1)


def max_image_token_count(loaded: LoadedModel, grid: Grid) -> int:
    """The most ``<image>`` tokens any image can take on ``grid`` (an image shaped like
    one of its pinpoints loses nothing to unpadding)."""
    return max([image_token_count(loaded, h, w, grid) for h, w in grid] or [image_token_count(loaded, 1, 1, grid)])


def encode(
    loaded: LoadedModel, prompt: str, images: Sequence[Image.Image], *, max_image_tiles: int | None = None
) -> Encoded:
    """Run the processor on one prompt and its images (one ``<image>`` slot each)."""
    [encoded] = tokenize(loaded, [prompt], [process_images(loaded, images, max_image_tiles=max_image_tiles)])
    return encoded


def process_images(
    loaded: LoadedModel, images: Sequence[Image.Image], *, max_image_tiles: int | None = None
) -> Pixels | None:
    """The image processor on one prompt's images, tiled on the model's anyres grid (or
    the grid ``max_image_tiles`` allows); ``None`` for no images."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    if not images:
        return None
    grid = image_grid(loaded, max_image_tiles)
    size = loaded.model.config.vision_config.image_size
    pinpoints = [list(p) for p in grid] or [[size, size]]  # base only: the cheapest grid, base tile kept
    batch = loaded.processor.image_processor(images=list(images), image_grid_pinpoints=pinpoints, return_tensors="pt")
    sizes = batch["image_sizes"]
    tiles = tuple(image_size_to_num_patches(s, pinpoints, size) if grid else 1 for s in sizes)
    pixel_values = torch.cat([batch["pixel_values"][i, :count] for i, count in enumerate(tiles)], dim=0)
    features = tuple(image_token_count(loaded, int(h), int(w), grid) for h, w in sizes.tolist())
    return Pixels(pixel_values, sizes, tiles, features, grid)


def tokenize(loaded: LoadedModel, prompts: Sequence[str], pixels: Sequence[Pixels | None]) -> list[Encoded]:
    """Each prompt's token ids, its ``<image>`` slots expanded to its images' features, in
    one call of the tokenizer (a fast one encodes the prompts in parallel)."""
    expanded = []
    for prompt, images in zip(prompts, pixels, strict=True):
        if images is None:
            expanded.append(prompt)
            continue
        pieces = prompt.split(IMAGE_TOKEN)
        if len(pieces) != len(images.features) + 1:
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE_TOKEN} slots for {len(images.features)} images")
        expanded.append(pieces[0] + "".join(IMAGE_TOKEN * n + piece for n, piece in zip(images.features, pieces[1:])))
    if not expanded:
        return []
    ids = loaded.processor.tokenizer(expanded)["input_ids"]
    return [
        Encoded(torch.tensor(row), None, None)
        if images is None
        else Encoded(torch.tensor(row), images.pixel_values, images.image_sizes, images.tiles, images.grid)
        for row, images in zip(ids, pixels)
    ]


def forward(loaded: LoadedModel, batch: Sequence[Encoded]) -> torch.Tensor:
    """Embed a batch of encoded prompts: L2-normalised float32 vectors, shape ``(len(batch), d)``."""
    return torch.nn.functional.normalize(last_states(loaded, batch), dim=-1)


def last_states(loaded: LoadedModel, batch: Sequence[Encoded]) -> torch.Tensor:
    """Each prompt's final hidden state at its last token, float32, not normalised (a sum of
    two prompts' states, as FashionIQ's evaluation takes, is normalised after summing)."""
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

    embeds = _input_embeds(loaded, batch, input_ids, attention_mask)
    # Right padding under causal attention: real tokens never see a pad (module docstring).
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False, return_dict=True).last_hidden_state
    return hidden[torch.arange(len(batch), device=hidden.device), (lengths - 1).to(hidden.device)].float()


def _input_embeds(
    loaded: LoadedModel, batch: Sequence[Encoded], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Token embeddings with the image features scattered into the ``<image>`` slots
    (a function of its own so that the features are freed before the decoder runs)."""
    image_mask = (input_ids == loaded.image_token_id) & attention_mask.bool()
    # Look up ids with image slots masked: the published checkpoint has no row for <image>.
    embeds = loaded.model.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
    with_images = [item for item in batch if item.pixel_values is not None]
    if not with_images:
        return embeds
    features = _image_features(loaded, with_images).to(embeds.dtype)
    if features.shape[0] != int(image_mask.sum()):
        raise EmbeddingError(
            f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features: "
            "the processor and the model disagree on the anyres layout"
        )
    return embeds.masked_scatter(image_mask.unsqueeze(-1), features)


def _image_features(loaded: LoadedModel, items: Sequence[Encoded]) -> torch.Tensor:
    """Vision tower and projector over every tile of the batch in one pass, then each
    image's features packed for its own grid (as LLaVA-NeXT's ``pack_image_features``)."""
    base = loaded.model.model
    config = loaded.model.config
    pixel_values = torch.cat([item.pixel_values for item in items]).to(loaded.input_device, loaded.dtype)
    selected = _vision_states(base.vision_tower, pixel_values, config.vision_feature_layer)
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    projected = base.multi_modal_projector(selected)
    per_image = [(count, size, item.grid) for item in items for count, size in zip(item.tiles, item.image_sizes)]
    chunks = torch.split(projected, [count for count, _, _ in per_image], dim=0)
    return torch.cat([_pack(loaded, chunk, size, grid) for chunk, (_, size, grid) in zip(chunks, per_image)])


def vision_layers_run(layers: int, feature_layer: int | list[int]) -> int:
    """Vision layers run for features read at ``feature_layer`` of a ``layers``-layer tower:
    those up to it for one layer (E5-V's -2: all but the last), the whole tower for several."""
    return feature_layer % (layers + 1) if isinstance(feature_layer, int) else layers


def _vision_states(tower: torch.nn.Module, pixel_values: torch.Tensor, layer: int | list[int]) -> torch.Tensor:
    """The vision tower's hidden states at ``layer``. A CLIP tower runs only the layers
    below it (E5-V reads the second to last: one layer less) and keeps no other layer's
    states; other towers run whole with ``output_hidden_states``."""
    blocks = getattr(getattr(tower, "encoder", None), "layers", None)
    clip_like = blocks is not None and hasattr(tower, "embeddings") and hasattr(tower, "pre_layrnorm")
    if isinstance(layer, int) and clip_like:
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for block in blocks[: vision_layers_run(len(blocks), layer)]:
            hidden = block(hidden, None)
        return hidden
    states = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    return states[layer] if isinstance(layer, int) else torch.cat([states[i] for i in layer], dim=-1)


def _pack(loaded: LoadedModel, tiles: torch.Tensor, image_size: torch.Tensor, grid: Grid) -> torch.Tensor:
    """One image's features: the base view, then the unpadded grid with a newline per row."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    newline = loaded.model.model.image_newline
    if tiles.shape[0] == 1:
        return torch.cat((tiles[0], newline[None].to(tiles)), dim=0)
    vision = loaded.model.config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = get_anyres_image_grid_shape(image_size.tolist(), [list(p) for p in grid], vision.image_size)
    grid_features = tiles[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    grid_features = unpad_image(grid_features.flatten(1, 2).flatten(2, 3), image_size)
    row_ends = newline[:, None, None].expand(*grid_features.shape[:-1], 1).to(grid_features)
    grid_features = torch.cat((grid_features, row_ends), dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat((tiles[0], grid_features), dim=0)
