"""The model under training: LoRA on the language model of a LLaVA-NeXT checkpoint.

Text-only training never runs the vision tower, the projector or the LM head: they are
replaced by placeholders once loaded, so they take no memory. LoRA targets the language
model's linear layers by their full names, so the saved adapter applies to the whole
LLaVA-NeXT model at inference and leaves the vision tower untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from e5v.core.prompts import PromptSet, fill
from e5v.errors import ModelLoadError, TrainingError
from e5v.model import runner
from e5v.model.loading import (
    LoadedModel,
    bitsandbytes_config,
    merge_adapter,
    quiet_peft,
    quiet_transformers,
    resolve_source,
)
from e5v.optional import require
from e5v.training.config import TrainingConfig

__all__ = ["LORA_TARGET_MODULES", "PromptEncoder", "TextEncoder", "build_model", "loaded_for_training", "save_merged"]

logger = logging.getLogger(__name__)

#: q/k/v/o and gate/up/down projections of the language model only (a full-match regex).
LORA_TARGET_MODULES = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


class _Dropped(torch.nn.Module):
    """Stands in for a part of the model that text-only training does not load."""

    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TrainingError(f"the {self.part} is not loaded for text-only training")


def build_model(config: TrainingConfig, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load the checkpoint on ``device``, drop the unused parts, add LoRA: ``(peft_model, processor)``."""
    peft = require("peft", "train")
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    name = str(config.model)
    source = resolve_source(name, revision=config.revision)
    options: dict[str, Any] = {}
    if config.load_in_4bit:
        options["quantization_config"] = _four_bit_config(device, dtype)
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(name, revision=config.revision, **source)
            model = LlavaNextForConditionalGeneration.from_pretrained(
                name,
                revision=config.revision,
                dtype=dtype,
                device_map={"": _indexed(device)},
                use_safetensors=True,
                attn_implementation="sdpa",
                **source,
                **options,
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {name!r} for training (safetensors weights only): {exc}") from exc
    model.model.vision_tower = _Dropped("vision tower")
    model.model.multi_modal_projector = _Dropped("multi-modal projector")
    model.lm_head = _Dropped("LM head")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    non_reentrant = {"use_reentrant": False}
    if config.load_in_4bit:
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=non_reentrant,
        )
    elif config.gradient_checkpointing:
        # The new name (the old one warns); older 5.x releases have only the old one.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        bias="none",
        revision=config.revision,
    )
    with quiet_peft():
        peft_model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on the language model: %d trainable parameters", config.lora_r, trainable)
    return peft_model, processor


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current GPU), for a one-device ``device_map``."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _four_bit_config(device: torch.device, dtype: torch.dtype) -> Any:
    """NF4 with double quantisation (QLoRA); the unused parts stay unquantised."""
    require("bitsandbytes", "quantization")
    if device.type != "cuda":
        raise TrainingError(f"load_in_4bit (QLoRA) needs a CUDA GPU, not {device}")
    return bitsandbytes_config(4, dtype, double_quant=True)


class PromptEncoder:
    """Sentences to encoded prompts, as at inference: cut to ``max_length`` tokens, then prompted."""

    def __init__(self, loaded: LoadedModel, prompts: PromptSet, max_length: int) -> None:
        self.loaded = loaded
        self.prompts = prompts
        self.max_length = max_length

    def __call__(self, sentences: list[str]) -> list[runner.Encoded]:
        return [
            runner.encode(self.loaded, self.prompts.wrap(fill(self.prompts.text, self.cut(sentence))), [])
            for sentence in sentences
        ]

    def cut(self, sentence: str) -> str:
        tokenizer = self.loaded.processor.tokenizer
        ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_length:
            return sentence
        return tokenizer.decode(ids[: self.max_length], clean_up_tokenization_spaces=False)


class TextEncoder(torch.nn.Module):
    """The LoRA model as a module whose forward embeds encoded prompts (the inference forward)."""

    def __init__(self, peft_model: Any, loaded: LoadedModel) -> None:
        super().__init__()
        self.peft_model = peft_model
        self._loaded = loaded

    def forward(self, batch: list[runner.Encoded]) -> torch.Tensor:
        return runner.forward(self._loaded, batch)


def loaded_for_training(peft_model: Any, processor: Any, config: TrainingConfig, dtype: torch.dtype) -> LoadedModel:
    """The runner's view of the LoRA model (its LLaVA-NeXT model, LoRA layers in place)."""
    llava = peft_model.base_model.model
    return LoadedModel(
        model=llava,
        processor=processor,
        name=str(config.model),
        revision=config.revision,
        dtype=dtype,
        image_token_id=int(llava.config.image_token_id),
    )


def save_merged(base: str | Path, adapter: str | Path, target: str | Path, *, revision: str | None = None) -> Path:
    """Merge ``adapter`` into the full base checkpoint (in its saved dtype, on CPU) and save both
    model and processor at ``target``, loadable by ``E5VEmbedder(target)``."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    target = Path(target)
    logger.info("merging %s into %s, saving to %s", adapter, base, target)
    source = resolve_source(base, revision=revision)
    with quiet_transformers():
        model = LlavaNextForConditionalGeneration.from_pretrained(
            str(base), revision=revision, dtype="auto", use_safetensors=True, **source
        )
        merge_adapter(model, adapter).save_pretrained(target)
        AutoProcessor.from_pretrained(str(base), revision=revision, **source).save_pretrained(target)
    return target
