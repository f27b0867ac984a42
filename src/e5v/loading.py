"""Loading E5-V checkpoints through transformers, with the published checkpoint's traps fixed.

``royokong/e5-v`` was saved with transformers 4.41. Under current transformers:

1. its ``<image>`` id (128256) equals the language model's ``vocab_size``, one past the
   embedding table. e5v's forward never looks that id up (image positions are masked
   before the lookup and overwritten by image features), so nothing is resized;
   :func:`add_image_token_row` makes the plain transformers forward work too.
2. its processor has no ``patch_size``: it is taken from ``vision_config.patch_size``.

Neither fix changes an output value. Loaded models are shared for the life of the
process: loading the same checkpoint with the same options again returns the object
already in memory (:func:`clear_cache` forgets them).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from e5v.errors import ModelLoadError

__all__ = [
    "LoadedModel",
    "add_image_token_row",
    "clear_cache",
    "load",
    "merge_adapter",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 (float16 where unsupported) on GPU and float32 elsewhere."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(eq=False)
class LoadedModel:
    """A LLaVA-NeXT model and its processor, ready for E5-V embedding."""

    model: Any  # LlavaNextForConditionalGeneration
    processor: Any  # LlavaNextProcessor
    name: str
    revision: str | None
    dtype: torch.dtype
    image_token_id: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dimension(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


_CACHE: dict[tuple[Any, ...], LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every loaded model (they are freed once no embedder holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def load(
    model_name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    device_map: str | dict[str, Any] | None = None,
    allow_pickle: bool = False,
    attn_implementation: str | None = "sdpa",
    model_kwargs: dict[str, Any] | None = None,
    adapter: str | Path | None = None,
) -> LoadedModel:
    """Load (or reuse) a LLaVA-NeXT checkpoint from a hub id or a local directory.

    Weights load from safetensors only unless ``allow_pickle=True``;
    ``trust_remote_code`` is never enabled. ``adapter`` is a peft (LoRA) adapter, a
    directory or hub id, merged into the weights (see :func:`merge_adapter`).
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    name = str(model_name_or_path)
    key = (
        name,
        revision,
        str(cache_dir),
        str(resolved_device) if device_map is None else repr(device_map),
        resolved_dtype,
        allow_pickle,
        attn_implementation,
        repr(sorted((model_kwargs or {}).items())),
        _adapter_key(adapter),
    )
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            logger.debug("reusing loaded model %s", name)
            return cached
        loaded = _load_uncached(
            name,
            device=resolved_device,
            dtype=resolved_dtype,
            revision=revision,
            cache_dir=cache_dir,
            device_map=device_map,
            allow_pickle=allow_pickle,
            attn_implementation=attn_implementation,
            model_kwargs=model_kwargs or {},
            adapter=adapter,
        )
        _CACHE[key] = loaded
        return loaded


def _load_uncached(
    name: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None,
    cache_dir: str | Path | None,
    device_map: str | dict[str, Any] | None,
    allow_pickle: bool,
    attn_implementation: str | None,
    model_kwargs: dict[str, Any],
    adapter: str | Path | None = None,
) -> LoadedModel:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    common: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": False}
    logger.info("loading %s (%s, %s)", name, device if device_map is None else f"device_map={device_map}", dtype)
    try:
        processor = AutoProcessor.from_pretrained(name, **common)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the processor of {name!r}: {exc}. Pass a hub id (e.g. 'royokong/e5-v') or a local "
            "directory saved with save_pretrained; offline (HF_HUB_OFFLINE=1), the files must be in the cache"
        ) from exc
    try:
        model = LlavaNextForConditionalGeneration.from_pretrained(
            name,
            dtype=dtype,
            device_map=device_map,
            use_safetensors=None if allow_pickle else True,
            attn_implementation=attn_implementation,
            **common,
            **model_kwargs,
        )
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle else " (only safetensors weights are loaded unless allow_pickle=True)"
        raise ModelLoadError(f"cannot load the model weights of {name!r}{hint}: {exc}") from exc
    if device_map is None:
        model.to(device)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    model.eval()
    model.requires_grad_(False)
    image_token_id = _fix_processor(processor, model, name)
    return LoadedModel(
        model=model, processor=processor, name=name, revision=revision, dtype=dtype, image_token_id=image_token_id
    )


def _adapter_key(adapter: str | Path | None) -> str | None:
    """A local adapter by its absolute path (so relative spellings share a cache entry)."""
    if adapter is None:
        return None
    path = Path(adapter)
    return str(path.resolve()) if path.exists() else str(adapter)


def merge_adapter(model: Any, adapter: str | Path) -> Any:
    """Load a peft adapter onto ``model`` and merge it into the weights (no inference overhead)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError("loading an adapter needs peft: pip install 'e5v[train]'") from exc
    logger.info("merging adapter %s", adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load the adapter {str(adapter)!r}: {exc}. Pass the output directory of 'e5v train' "
            "(it holds adapter_config.json and adapter_model.safetensors)"
        ) from exc
    return peft_model.merge_and_unload()


def _fix_processor(processor: Any, model: Any, name: str) -> int:
    """Fill in what the published processor lacks; fail clearly on what cannot be fixed."""
    config = model.config
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(f"{name!r} has no image processor and tokenizer; it is not a LLaVA-NeXT checkpoint")
    patch_size = config.vision_config.patch_size
    if getattr(processor, "patch_size", None) is None:
        logger.info("processor of %s has no patch_size; using vision_config.patch_size=%d", name, patch_size)
        processor.patch_size = patch_size
    elif processor.patch_size != patch_size:
        raise ModelLoadError(
            f"processor patch_size {processor.patch_size} differs from the vision tower's {patch_size} in {name!r}"
        )
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_token_id != config.image_token_id:
        raise ModelLoadError(
            f"the tokenizer's {processor.image_token!r} id {image_token_id} differs from the model's "
            f"image_token_id {config.image_token_id} in {name!r}"
        )
    return int(image_token_id)


def add_image_token_row(model: Any) -> None:
    """Give the embedding table a row for ``<image>`` if it has none (the published trap).

    Only needed by the plain transformers forward (the official recipe); the new rows
    are never read for hidden states, since image positions are overwritten.
    """
    needed = int(model.config.image_token_id) + 1
    if model.get_input_embeddings().num_embeddings < needed:
        logger.info("resizing token embeddings to %d for the <image> token", needed)
        model.resize_token_embeddings(needed, mean_resizing=False)
