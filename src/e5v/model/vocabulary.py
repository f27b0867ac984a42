"""The special tokens of E5-V's checkpoint (LLaVA-NeXT on Llama-3) that prompts, the runner
and the tiny test checkpoints all rely on."""

from __future__ import annotations

__all__ = ["IMAGE_TOKEN", "LLAMA3_SPECIAL_TOKENS"]

#: The slot an image's features fill, once per image, in a prompt.
IMAGE_TOKEN = "<image>"
#: Llama-3's chat-template tokens, which the published checkpoint's tokenizer must know.
LLAMA3_SPECIAL_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
