"""The tiny "published" preset has royokong/e5-v's two traps, and e5v loads and embeds it anyway."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from e5v import E5VEmbedder, ModelLoadError

PROMPT = (
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nSummary above image in one word: <|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n \n"
)


def test_preset_reproduces_both_traps(checkpoints, photos):
    path = checkpoints["tiny-published"]
    model = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    # Trap 2: no patch size in the saved processor, so processing any image fails.
    assert processor.patch_size is None
    assert "patch_size" not in json.loads((path / "processor_config.json").read_text())
    with pytest.raises(TypeError):
        processor(text=[PROMPT], images=[photos["cat"]], return_tensors="pt")
    # Trap 1: <image> id == the language model's vocab_size, one past the embedding table.
    assert model.config.image_token_id == model.config.text_config.vocab_size
    assert model.get_input_embeddings().num_embeddings == model.config.image_token_id
    processor.patch_size = model.config.vision_config.patch_size
    inputs = processor(text=[PROMPT], images=[photos["cat"]], return_tensors="pt")
    with pytest.raises(IndexError), torch.no_grad():
        model(**inputs)


def test_e5v_embeds_the_published_shape_without_resizing(checkpoints, photos):
    embedder = E5VEmbedder(checkpoints["tiny-published"], device="cpu")
    vectors = embedder.embed(["a cat", photos["cat"]])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.processor.patch_size == embedder.model.config.vision_config.patch_size
    # e5v's forward masks <image> before the lookup: the table is left as it was saved.
    assert embedder.model.get_input_embeddings().num_embeddings == embedder.model.config.image_token_id


def test_mismatched_patch_size_fails_clearly(tmp_path):
    from e5v.testing import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "bad", "tiny")
    config_file = path / "processor_config.json"
    data = json.loads(config_file.read_text())
    data["patch_size"] = 7
    config_file.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="patch_size 7"):
        E5VEmbedder(path, device="cpu")


def test_missing_checkpoint_fails_clearly(tmp_path, tiny_path):
    with pytest.raises(ModelLoadError, match=r"no checkpoint folder .*nowhere.*; check the path"):
        E5VEmbedder(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ModelLoadError, match=r"a folder without config\.json, not a checkpoint"):
        E5VEmbedder(tmp_path, device="cpu")
    (tmp_path / "config.json").write_bytes((tiny_path / "config.json").read_bytes())  # weights and processor gone
    with pytest.raises(ModelLoadError, match="cannot load the processor of"):
        E5VEmbedder(tmp_path, device="cpu")
