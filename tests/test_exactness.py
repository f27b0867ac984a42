"""The fast path equals the official recipe, item by item, and does not depend on its batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from e5v import Composed, E5VEmbedder, Interleaved
from e5v.core.inputs import ImageLoader
from e5v.model.reference import official_embedding

TOL = 1e-5
# The paper's prompts, written out literally (shared/docs/e5v-method.md), independent of e5v.core.prompts.
HEAD = "<|start_header_id|>user<|end_header_id|>\n\n"
TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
TEXTS = [
    "A dog is running",
    "A parked car",
    "The quick brown fox jumps over the lazy dog near the river bank at dawn, while a cat sleeps on a sofa.",
    "cat",
]


def text_prompt(text: str) -> str:
    return f"{HEAD}{text}\nSummary above sentence in one word: {TAIL}"


IMAGE_PROMPT = f"{HEAD}<image>\nSummary above image in one word: {TAIL}"


def composed_prompt(text: str) -> str:
    return f'{HEAD}<image>Modify this image with "{text}", desribe modified image in one word:{TAIL}'


@pytest.fixture(scope="module", params=["tiny", "tiny-left", "tiny-published"])
def pair(request, checkpoints):
    """(e5v embedder, independent official-recipe model and processor) on the same weights."""
    path: Path = checkpoints[request.param]
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    if processor.patch_size is None:  # the published processor's trap, patched as vLLM's parity test does
        processor.patch_size = model.config.vision_config.patch_size
    return E5VEmbedder(path, device="cpu", batch_size=3), model, processor


def rgb(image: Image.Image) -> Image.Image:
    return ImageLoader().load(image, 0)


def test_texts_equal_official_recipe(pair):
    embedder, model, processor = pair
    ours = embedder.embed_texts(TEXTS)
    reference = np.stack([official_embedding(model, processor, text_prompt(t)) for t in TEXTS])
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), embedder.dimension)
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_images_of_many_sizes_equal_official_recipe(pair, photos):
    embedder, model, processor = pair
    names = ["cat", "astronaut", "coffee", "rocket", "camera", "text", "logo"]
    ours = embedder.embed_images([photos[n] for n in names])
    reference = np.stack([official_embedding(model, processor, IMAGE_PROMPT, [rgb(photos[n])]) for n in names])
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_composed_equals_official_recipe(pair, photos):
    embedder, model, processor = pair
    edits = ["make it red with long sleeves", "at night"]
    images = [photos["cat"], photos["rocket"]]
    ours = embedder.embed_composed(images, edits)
    reference = np.stack(
        [official_embedding(model, processor, composed_prompt(e), [rgb(i)]) for i, e in zip(images, edits)]
    )
    np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)


def test_interleaved_equals_recipe_on_its_prompt(pair, photos):
    embedder, model, processor = pair
    item = Interleaved(["Product photo:", photos["coffee"], "waterproof jacket", photos["camera"]])
    prompt = f"{HEAD}Product photo:\n<image>\nwaterproof jacket\n<image>\nSummary above content in one word: {TAIL}"
    reference = official_embedding(model, processor, prompt, [rgb(photos["coffee"]), rgb(photos["camera"])])
    np.testing.assert_allclose(embedder.embed([item])[0], reference, atol=TOL, rtol=0)


def test_vector_does_not_depend_on_batch(pair, photos):
    embedder, _, _ = pair
    items = [
        TEXTS[2],
        photos["rocket"],
        Composed(photos["cat"], "in the snow"),
        TEXTS[3],
        Interleaved([photos["text"], "a page of text"]),
        photos["camera"],
        TEXTS[0],
    ]
    alone = np.stack([embedder.embed([item])[0] for item in items])
    for batch_size in (2, 3, len(items)):
        together = embedder.embed(items, batch_size=batch_size)
        np.testing.assert_allclose(together, alone, atol=TOL, rtol=0)
    reordered = embedder.embed(items[::-1], batch_size=len(items))[::-1]
    np.testing.assert_allclose(reordered, alone, atol=TOL, rtol=0)


def test_bos_token_starts_every_prompt(pair):
    embedder, _, processor = pair
    from e5v.model import runner

    encoded = runner.encode(embedder._loaded, text_prompt("hello"), [])
    assert int(encoded.input_ids[0]) == processor.tokenizer.bos_token_id


def test_a_batch_is_tokenised_as_the_official_processor_tokenises_each_prompt(pair, photos):
    embedder, _, processor = pair
    from e5v.model import runner

    loaded = embedder._loaded
    cat, rocket = rgb(photos["cat"]), rgb(photos["rocket"])
    prompts = [text_prompt(TEXTS[2]), IMAGE_PROMPT, text_prompt("cat"), composed_prompt("make it red"), IMAGE_PROMPT]
    images = [[], [cat], [], [rocket], [rocket]]
    pixels = [runner.process_images(loaded, group) for group in images]
    for prompt, group, encoded in zip(prompts, images, runner.tokenize(loaded, prompts, pixels), strict=True):
        expected = processor(text=[prompt], images=group or None, return_tensors="pt")["input_ids"][0]
        assert torch.equal(encoded.input_ids, expected)


def test_tokenize_refuses_a_prompt_whose_slots_and_images_differ(pair, photos):
    embedder, _, _ = pair
    from e5v.model import runner

    loaded = embedder._loaded
    pixels = runner.process_images(loaded, [rgb(photos["cat"])])
    with pytest.raises(ValueError, match="prompt has 2 <image> slots for 1 images"):
        runner.tokenize(loaded, ["<image> and <image>"], [pixels])
