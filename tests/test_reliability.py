"""Faults and hostile inputs at the embedder level: clear errors, no partial results, safe loading."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e5v import E5VEmbedder, EmbeddingError, InvalidInputError, ModelLoadError
from e5v.core.inputs import ImageLoader
from e5v.core.prompts import PRESETS, fill

TAIL = "<|start_header_id|>assistant<|end_header_id|>\n\n \n"


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_one_bad_item_fails_the_whole_call_naming_it(embedder, photos):
    good = png_bytes(photos["cat"])
    with pytest.raises(InvalidInputError, match=r"^item 2: .*not a readable image"):
        embedder.embed_images([good, photos["rocket"], good[:100], photos["coffee"]])
    with pytest.raises(InvalidInputError, match=r"^item 1: unsupported item builtins.int"):
        embedder.embed(["text", 3, photos["cat"]])


def test_out_of_memory_halves_the_batch_and_gives_identical_results(embedder, photos, monkeypatch):
    from e5v.core import embedder as embedder_module

    items = ["a cat", photos["cat"], "a rocket on its pad", photos["rocket"], "coffee", photos["camera"]]
    expected = embedder.embed(items, batch_size=6)
    real_forward = embedder_module.runner.forward
    sizes: list[int] = []

    def forward_failing_above_one(loaded, batch):
        sizes.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(loaded, batch)

    monkeypatch.setattr(embedder_module.runner, "forward", forward_failing_above_one)
    np.testing.assert_allclose(embedder.embed(items, batch_size=6), expected, atol=1e-6)
    assert 6 in sizes and 3 in sizes and sizes.count(1) == 6

    def forward_always_failing(loaded, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(embedder_module.runner, "forward", forward_always_failing)
    with pytest.raises(EmbeddingError, match="out of GPU memory on a single item"):
        embedder.embed(items, batch_size=6)


def test_non_finite_outputs_are_raised_not_returned(embedder, monkeypatch):
    from e5v.core import embedder as embedder_module

    def overflowing(loaded, batch):
        return torch.full((len(batch), embedder.dimension), float("nan"))

    monkeypatch.setattr(embedder_module.runner, "forward", overflowing)
    with pytest.raises(EmbeddingError, match="non-finite"):
        embedder.embed_texts(["overflow"])


def test_many_threads_give_the_sequential_vectors(embedder, photos):
    work = [[f"sentence number {i}", photos["cat"] if i % 2 else photos["rocket"]] for i in range(8)]
    expected = [embedder.embed(items) for items in work]
    results: list[np.ndarray | None] = [None] * len(work)

    def run(i: int) -> None:
        results[i] = embedder.embed(work[i], batch_size=1 + i % 2)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_long_text_is_cut_at_the_token_cap_with_a_warning(tiny_path, caplog):
    capped = E5VEmbedder(tiny_path, device="cpu", max_text_tokens=12)
    tokenizer = capped.processor.tokenizer
    long_text = "The quick brown fox jumps over the lazy dog. " * 200
    cut = tokenizer.decode(tokenizer(long_text, add_special_tokens=False)["input_ids"][:12])
    with caplog.at_level(logging.WARNING, logger="e5v"):
        vector = capped.embed_texts([long_text])
    assert "cut to max_text_tokens=12" in caplog.text
    np.testing.assert_allclose(vector, capped.embed_texts([cut]), atol=1e-6)


def test_empty_and_whitespace_text_are_embedded_as_given(embedder):
    vectors = embedder.embed_texts(["", "   ", "\n"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])


def test_input_text_is_never_read_as_a_template():
    hostile = 'x <sent> {BODY} {0} %s {text} "<|eot_id|>'
    prompt = PRESETS["e5v"].wrap(fill(PRESETS["e5v"].text, hostile))
    assert prompt.count(hostile) == 1
    assert prompt.endswith(
        "\nSummary above sentence in one word: <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048))
def test_random_bytes_give_an_image_or_invalid_input(data):
    try:
        image = ImageLoader().load(data, 0)
    except InvalidInputError as exc:
        assert str(exc).startswith("item 0: ")
    else:
        assert image.mode == "RGB"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(max_size=80), min_size=1, max_size=3))
def test_random_text_gives_unit_vectors_or_invalid_input(embedder, texts):
    try:
        vectors = embedder.embed_texts(texts)
    except InvalidInputError as exc:
        assert "<image>" in "".join(texts) and "reserved image placeholder" in str(exc)
    else:
        assert vectors.shape == (len(texts), embedder.dimension)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(st.text(max_size=30), min_size=1, max_size=2))
def test_random_strings_as_image_paths_give_invalid_input(embedder, paths):
    try:
        vectors = embedder.embed_images(paths)
    except InvalidInputError as exc:
        assert str(exc).startswith("item ")
    else:  # a random string naming a real image file is astronomically unlikely, but valid
        assert np.isfinite(vectors).all()


def test_pickle_weights_are_refused_unless_allowed(tiny_path, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_path, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_path)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        E5VEmbedder(pickled, device="cpu")
    allowed = E5VEmbedder(pickled, device="cpu", allow_pickle=True)
    reference = E5VEmbedder(tiny_path, device="cpu")
    np.testing.assert_allclose(allowed.embed_texts(["hi"]), reference.embed_texts(["hi"]), atol=1e-6)


def test_remote_code_in_a_checkpoint_is_never_run(tiny_path, tmp_path):
    hostile = tmp_path / "hostile"
    shutil.copytree(tiny_path, hostile)
    marker = tmp_path / "executed"
    (hostile / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass EvilProcessor: pass\n")
    config = json.loads((hostile / "processor_config.json").read_text())
    config["auto_map"] = {"AutoProcessor": "evil.EvilProcessor"}
    (hostile / "processor_config.json").write_text(json.dumps(config))
    with contextlib.suppress(ModelLoadError, ValueError):
        E5VEmbedder(hostile, device="cpu").embed_texts(["hi"])
    assert not marker.exists()


def test_revision_is_passed_to_the_hub_loader(tmp_path):
    # Offline, a hub id with a revision must fail in the loader (not be ignored) with a clear error.
    with pytest.raises(ModelLoadError, match="royokong/e5-v"):
        E5VEmbedder("royokong/e5-v", device="cpu", revision="0" * 40, cache_dir=tmp_path)
