"""Tiny, randomly initialised LLaVA-NeXT checkpoints for offline tests.

They have E5-V's structure (Llama-style decoder with grouped-query attention, CLIP
vision tower, anyres tiling, a Llama-3-style byte-level tokenizer carrying the chat
special tokens and ``<image>``) at a size that builds and runs in seconds on a CPU.
Load them by path through :class:`e5v.E5VEmbedder`, exactly like ``royokong/e5-v``::

    from e5v.testing import build_tiny_checkpoint
    path = build_tiny_checkpoint(tmp_path / "tiny")
    emb = E5VEmbedder(path)

Presets:

- ``"tiny"``: tokenizer saved padding on the right.
- ``"tiny-left"``: the same, padding on the left.
- ``"tiny-published"``: shaped like the published ``royokong/e5-v``, with both of its
  traps under current transformers: the ``<image>`` id equals the language model's
  ``vocab_size`` (one past the embedding table) and the saved processor has no
  ``patch_size``.
- ``"small"``: E5-V's proportions at a CPU size, for benchmarks. Decoder: 32 layers
  (as E5-V), hidden 128 (1/32), 4 query heads of 32 sharing 1 KV head (E5-V: 4 per KV
  head), MLP 448 (3.5x hidden, as E5-V), vocabulary 4008 (the BPE vocabulary padded
  with filler tokens; 31.3x hidden, as E5-V's 128256 / 4096), so the official recipe's
  per-token waste (LM-head logits and 33 kept hidden states) weighs what it does in
  E5-V. Texts of :data:`COMMON_WORDS` take about a token a word (1.2 with punctuation),
  as in E5-V's Llama-3 tokenizer, so a text is as long against the model as in E5-V.
  Vision: 24 layers (as CLIP-L/14), hidden 64, MLP 256 (4x, as CLIP-L); 112-px
  tiles of 14-px patches on E5-V's anyres grid (up to 2x2 tiles + base), so 64 image
  tokens a tile instead of 576: images weigh 9x less against text than in E5-V.
- ``"e5v-8b"``: E5-V's full size (Llama-3-8B + CLIP ViT-L/14-336, ``<image>`` at 128256
  as published), for GPU benchmarks: build it in memory on the GPU with
  :func:`build_random_model`, not on disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from e5v.model.vocabulary import IMAGE_TOKEN, LLAMA3_SPECIAL_TOKENS

__all__ = [
    "COMMON_WORDS",
    "PRESETS",
    "CheckpointSpec",
    "build_random_model",
    "build_tiny_checkpoint",
    "llava_next_config",
    "spec_with",
]

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


@dataclass(frozen=True)
class CheckpointSpec:
    """Shapes of a LLaVA-NeXT checkpoint (defaults: a tiny one)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_num_hidden_layers: int = 2
    vision_num_attention_heads: int = 2
    vision_intermediate_size: int = 64
    image_size: int = 28
    patch_size: int = 14
    tokenizer_vocab_size: int = 600
    max_position_embeddings: int = 4096
    padding_side: str = "right"
    published_traps: bool = False
    #: Pad the tokenizer with unreachable tokens so that ``<image>`` gets this id.
    image_token_id: int | None = None

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        """E5-V's anyres grid (336 base, up to 672x672), scaled to ``image_size``."""
        s = self.image_size
        return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


PRESETS: dict[str, CheckpointSpec] = {
    "tiny": CheckpointSpec(),
    "tiny-left": CheckpointSpec(padding_side="left"),
    "tiny-published": CheckpointSpec(padding_side="left", published_traps=True),
    # E5-V's proportions at 1/32 of the width (see the module docstring).
    "small": CheckpointSpec(
        hidden_size=128,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=448,
        vision_hidden_size=64,
        vision_num_hidden_layers=24,
        vision_num_attention_heads=2,
        vision_intermediate_size=256,
        image_size=112,
        image_token_id=4007,
    ),
    # E5-V itself: Llama-3-8B (4096 hidden, 32 layers, 32 heads / 8 KV heads, MLP 14336,
    # vocab 128256 with <image> at 128256, one past the table) and CLIP ViT-L/14-336
    # (1024 hidden, 24 layers, 16 heads, MLP 4096), anyres up to 672x672.
    "e5v-8b": CheckpointSpec(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vision_hidden_size=1024,
        vision_num_hidden_layers=24,
        vision_num_attention_heads=16,
        vision_intermediate_size=4096,
        image_size=336,
        tokenizer_vocab_size=4000,
        max_position_embeddings=8192,
        padding_side="left",
        published_traps=True,
        image_token_id=128256,
    ),
}

#: Common English words. Llama-3's tokenizer, like most, holds each as one token (with
#: its leading space); the toy tokenizers learn them whole too, so that a sentence of
#: them is as many tokens as in E5-V (a word a token), not 3-4 byte pieces a word.
# fmt: off
COMMON_WORDS: tuple[str, ...] = (
    "the", "a", "dog", "cat", "river", "park", "red", "blue", "green", "rocket", "coffee", "table", "house", "car",
    "tree", "sky", "city", "night", "morning", "photo", "of", "with", "on", "under", "near", "small", "large",
    "old", "new", "running", "sleeping", "flying", "bright", "dark", "wooden", "glass", "mountain", "beach",
    "street", "window", "garden", "book", "chair", "lamp", "child", "woman", "man", "bird", "flower", "road",
    "bridge", "boat", "snow", "rain", "sun", "cloud", "field", "forest", "jacket", "shirt", "shoe", "bag", "phone",
    "screen", "kitchen", "door", "wall", "light", "stone"
)
# fmt: on

_CORPUS = (
    "A dog is running in the park. A cat sleeps on a warm sofa. The astronaut floats above "
    "the earth. A red rocket stands on the launch pad. A cup of coffee on a wooden table. "
    "Summary above sentence in one word: Summary above image in one word: Describe this "
    "image in one word: Modify this image with, desribe modified image in one word: "
    "The quick brown fox jumps over the lazy dog. Product photo of a waterproof jacket. "
    "Make it red with long sleeves. A parked car near the river. 0123456789"
)


def _build_tokenizer(spec: CheckpointSpec):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = " ".join(f"{word} {word.capitalize()}" for word in COMMON_WORDS)
    tok.train_from_iterator([_CORPUS] * 4 + [words] * 4, trainer)
    specials = [BOS_TOKEN, EOS_TOKEN, *LLAMA3_SPECIAL_TOKENS]
    if spec.image_token_id is not None:
        tok = _pad_vocabulary(tok, spec.image_token_id - len(specials))
    tok.add_special_tokens(specials)
    tok.add_special_tokens([IMAGE_TOKEN])  # last, as in E5-V: id == len(tokenizer) - 1
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side=spec.padding_side,
        model_max_length=spec.max_position_embeddings,
    )
    return fast


def _pad_vocabulary(tok, size: int):  # (Tokenizer, int) -> Tokenizer
    """The BPE tokenizer with unreachable filler entries up to ``size`` ids."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > size:
        raise ValueError(f"cannot pad a vocabulary of {len(vocab)} down to {size}")
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), size)})
    return Tokenizer.from_str(json.dumps(data))


def llava_next_config(spec: CheckpointSpec, *, vocab_size: int, image_token_index: int):  # -> LlavaNextConfig
    """A ``LlavaNextConfig`` with E5-V's structure and the shapes in ``spec``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_num_hidden_layers,
        num_attention_heads=spec.vision_num_attention_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
        hidden_act="quick_gelu",
    )
    return LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_index,
        image_grid_pinpoints=spec.grid_pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        tie_word_embeddings=False,
    )


def _tokenizer_and_config(spec: CheckpointSpec):  # -> (PreTrainedTokenizerFast, LlavaNextConfig)
    """The tokenizer and the model config for ``spec``."""
    tokenizer = _build_tokenizer(spec)
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The published checkpoint's language model has no row for <image>: vocab_size == its id.
    vocab_size = image_token_index if spec.published_traps else len(tokenizer)
    return tokenizer, llava_next_config(spec, vocab_size=vocab_size, image_token_index=image_token_index)


def build_tiny_checkpoint(path: str | Path, preset: str | CheckpointSpec = "tiny", *, seed: int = 0) -> Path:
    """Build a random LLaVA-NeXT checkpoint (model + processor) at ``path`` and return it.

    Offline and deterministic for a given ``seed``; a few seconds on a CPU.
    """
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from e5v.model.loading import quiet_transformers

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tokenizer, config = _tokenizer_and_config(spec)

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with quiet_transformers():
        model.save_pretrained(path, safe_serialization=True)

    processor = _build_processor(spec, tokenizer)
    processor.save_pretrained(path)
    if spec.published_traps:
        _strip_processor_fields(path)
    logger.debug("built %s checkpoint at %s", preset, path)
    return path


def _build_processor(spec: CheckpointSpec, tokenizer):  # -> LlavaNextProcessor
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    size = spec.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=spec.grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def build_random_model(
    preset: str | CheckpointSpec, *, device: str = "cpu", dtype: str = "float32", seed: int = 0
):  # -> e5v.model.loading.LoadedModel
    """A random model built directly on ``device`` in ``dtype``, never saved, ready for
    ``E5VEmbedder(loaded)``. ``"e5v-8b"`` takes 16 GB in bfloat16 (32 GB in float32)."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    from e5v.model.loading import LoadedModel, resolve_dtype

    spec = PRESETS[preset] if isinstance(preset, str) else preset
    target_device, target_dtype = torch.device(device), resolve_dtype(dtype, torch.device(device))
    tokenizer, config = _tokenizer_and_config(spec)
    torch.manual_seed(seed)
    with target_device:
        model = LlavaNextForConditionalGeneration._from_config(
            config, dtype=target_dtype, attn_implementation="sdpa"
        ).eval()
    model.requires_grad_(False)
    name = preset if isinstance(preset, str) else "custom"
    return LoadedModel(
        model=model,
        processor=_build_processor(spec, tokenizer),
        name=f"random-init:{name}:seed={seed}",
        revision=None,
        dtype=target_dtype,
        image_token_id=config.image_token_index,
    )


def _strip_processor_fields(path: Path) -> None:
    """Save the processor as transformers 4.41 did for E5-V: no patch size, no strategy."""
    stripped = False
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = path / name
        if not file.exists():
            continue
        data = json.loads(file.read_text())
        targets = [data, data.get("processor", {})] if isinstance(data.get("processor"), dict) else [data]
        for target in targets:
            for key in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
                if key in target:
                    target.pop(key)
                    stripped = True
        file.write_text(json.dumps(data, indent=2))
    if not stripped:
        raise RuntimeError(f"no processor config with patch_size found under {path}")


def spec_with(preset: str, **changes: object) -> CheckpointSpec:
    """A preset's spec with some fields changed."""
    return replace(PRESETS[preset], **changes)  # type: ignore[arg-type]
