"""The public API: shapes, order, kinds, overrides, sharing, the demos."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from e5v import Composed, E5VEmbedder, Interleaved, InvalidInputError, contrastive_rank, cosine_similarity


def test_shapes_dtype_and_empty_lists(embedder, photos):
    d = embedder.dimension
    assert d == embedder.model.config.text_config.hidden_size
    for method, args in [
        (embedder.embed_texts, ([],)),
        (embedder.embed_images, ([],)),
        (embedder.embed_composed, ([], [])),
        (embedder.embed_interleaved, ([],)),
        (embedder.embed, ([],)),
    ]:
        empty = method(*args)
        assert empty.shape == (0, d) and empty.dtype == np.float32
    vectors = embedder.embed_texts(["A dog is running", "A parked car"])
    assert vectors.shape == (2, d) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_mixed_embed_keeps_order_and_matches_the_typed_methods(embedder, photos, photo_dir):
    cat_path = photo_dir / "cat.png"
    mixed = embedder.embed(
        [
            "a caption",
            cat_path,
            Interleaved(["Product photo:", photos["coffee"], "waterproof jacket"]),
            Composed(photos["rocket"], "at night"),
        ]
    )
    np.testing.assert_allclose(mixed[0], embedder.embed_texts(["a caption"])[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], embedder.embed_images([str(cat_path)])[0], atol=1e-6)
    np.testing.assert_allclose(
        mixed[2], embedder.embed_interleaved([["Product photo:", photos["coffee"], "waterproof jacket"]])[0], atol=1e-6
    )
    np.testing.assert_allclose(mixed[3], embedder.embed_composed([photos["rocket"]], ["at night"])[0], atol=1e-6)


def test_in_embed_a_str_is_always_text(embedder, photo_dir):
    path = str(photo_dir / "cat.png")
    np.testing.assert_allclose(embedder.embed([path]), embedder.embed_texts([path]), atol=1e-6)
    assert not np.allclose(embedder.embed([path]), embedder.embed_images([path]), atol=1e-3)


def test_duplicates_are_computed_once_and_returned_everywhere(embedder, photos):
    vectors = embedder.embed(["same", photos["cat"], "same", photos["cat"].copy(), "other"])
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[1], vectors[3])


def test_prompt_overrides(embedder, photos):
    plain = embedder.embed_texts(["a cat"])
    custom = embedder.embed_texts(["a cat"], prompt="<sent>\nDescribe the above in one word: ")
    assert not np.allclose(plain, custom)
    sts = E5VEmbedder(embedder.model_name, device="cpu", prompts="e5v-sts").embed_texts(["a cat"])
    assert not np.allclose(plain, sts)
    cirr = E5VEmbedder(embedder.model_name, device="cpu", prompts="cirr")
    np.testing.assert_allclose(
        cirr.embed_images([photos["cat"]]),
        embedder.embed_images([photos["cat"]], prompt="<image>\n Describe this image in one word:"),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="needs 1 '<sent>'"):
        embedder.embed_texts(["x"], prompt="missing placeholder")


def test_caller_mistakes_are_clear(embedder, photos):
    with pytest.raises(InvalidInputError, match="one text per image: got 2 images and 1 texts"):
        embedder.embed_composed([photos["cat"], photos["cat"]], ["red"])
    with pytest.raises(InvalidInputError, match="must be a list of items, got a single str"):
        embedder.embed_texts("not a list")
    with pytest.raises(InvalidInputError, match=r"^item 1: expected text \(str\)"):
        embedder.embed_texts(["ok", 5])


def test_same_checkpoint_is_loaded_once(embedder, tiny_path):
    again = E5VEmbedder(tiny_path, device="cpu", dtype="float32", batch_size=2)
    assert again.model is embedder.model
    assert again.dimension == embedder.dimension


def test_similarity_and_contrastive_ranking(embedder, photos):
    a, b = embedder.embed(["a cat", photos["cat"]])
    assert embedder.similarity("a cat", photos["cat"]) == pytest.approx(float(a @ b), abs=1e-6)
    candidates = [photos["cat"], photos["rocket"], photos["coffee"]]
    ranking = contrastive_rank(embedder, "a pet", "an object", candidates)
    vectors = embedder.embed(["a pet", "an object", *candidates])
    expected = vectors[2:] @ vectors[0] - vectors[2:] @ vectors[1]
    np.testing.assert_allclose(ranking.scores, expected, atol=1e-6)
    assert ranking.best == int(np.argmax(expected))
    assert ranking.best_score == pytest.approx(float(expected.max()))
    assert list(ranking.order()) == list(np.argsort(-expected))
    sims = cosine_similarity(vectors[:2] * 3.0, vectors[2:])
    np.testing.assert_allclose(sims, vectors[:2] @ vectors[2:].T, atol=1e-6)


def test_the_command_line_parser_loads_no_model_code():
    code = "import sys\nfrom e5v.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_importing_e5v_imports_no_ecosystem():
    code = (
        "import sys, e5v, e5v.cli\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'langchain', 'llama_index', "
        "'chromadb', 'ray', 'peft')]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
