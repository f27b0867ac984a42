"""The fast path: equal to the recipe under any batching, dedup, look-ahead preparation,
the image tile budget, quantisation errors, and the full-size random model's code path."""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from e5v import Composed, E5VEmbedder, Interleaved
from e5v.core.inputs import IMAGE_TOKEN, ImageLoader, composed_request, image_request, text_request
from e5v.core.prompts import fill
from e5v.errors import MissingDependencyError
from e5v.model import runner
from e5v.model.reference import official_embedding

TOL = 1e-5


@pytest.fixture(scope="module")
def recipe_model(tiny_path):
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def corpus(photos):
    return [
        "A dog is running in the park",
        photos["rocket"],
        Composed(photos["cat"], "in the snow"),
        "cat",
        Interleaved(["a page:", photos["text"], "of text"]),
        photos["logo"],
        "The quick brown fox jumps over the lazy dog near the river bank at dawn, twice over.",
        photos["camera"],
        Composed(photos["coffee"], "make it tea"),
    ]


def recipe_vectors(embedder, model, processor, items):
    loader, prompts, out = ImageLoader(), embedder.prompts, []
    for index, item in enumerate(items):
        if isinstance(item, str):
            prompt, images = prompts.wrap(fill(prompts.text, item)), []
        elif isinstance(item, Composed):
            prompt, images = prompts.wrap(fill(prompts.composed, item.text)), [loader.load(item.image, index)]
        elif isinstance(item, Interleaved):
            parts = [p if isinstance(p, str) else IMAGE_TOKEN for p in item.parts]
            prompt = prompts.wrap(fill(prompts.interleaved, "\n".join(parts)))
            images = [loader.load(p, index) for p in item.parts if not isinstance(p, str)]
        else:
            prompt, images = prompts.wrap(fill(prompts.image, "")), [loader.load(item, index)]
        out.append(official_embedding(model, processor, prompt, images))
    return np.stack(out)


@pytest.mark.parametrize(("batch_size", "max_batch_tokens"), [(1, None), (4, None), (16, 16384), (8, 60), (16, 1)])
def test_mixed_corpus_equals_recipe_under_any_batching(tiny_path, recipe_model, corpus, batch_size, max_batch_tokens):
    embedder = E5VEmbedder(tiny_path, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    expected = recipe_vectors(embedder, *recipe_model, corpus)
    np.testing.assert_allclose(embedder.embed(corpus), expected, atol=TOL, rtol=0)


class Calls:
    """Counts and records the real runner's calls (the real functions still run)."""

    def __init__(self, monkeypatch):
        self.encoded: list[str] = []
        self.forwarded: list[int] = []
        self.encode_threads: set[str] = set()
        tokenize, forward = runner.tokenize, runner.forward

        def counting_tokenize(loaded, prompts, pixels):
            self.encoded.extend(prompts)
            self.encode_threads.add(threading.current_thread().name)
            return tokenize(loaded, prompts, pixels)

        def counting_forward(loaded, batch):
            self.forwarded.append(len(batch))
            return forward(loaded, batch)

        monkeypatch.setattr(runner, "tokenize", counting_tokenize)
        monkeypatch.setattr(runner, "forward", counting_forward)


def test_identical_inputs_are_computed_once(embedder, photos, monkeypatch):
    calls = Calls(monkeypatch)
    items = ["a dog", photos["cat"], "a dog", photos["cat"].copy(), Composed(photos["cat"], "a dog"), "a dog"]
    vectors = embedder.embed(items)
    assert len(calls.encoded) == 3 and sum(calls.forwarded) == 3
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[1], vectors[3])
    assert not np.allclose(vectors[0], vectors[4])


def test_preparation_runs_on_a_worker_exactly_one_batch_ahead(tiny_path, monkeypatch):
    """The first forward waits until the worker encodes the second batch: it only gets
    there if preparation runs ahead of the model; and no forward ever finds more than
    the next batch encoded, so prepared pixels are held for two batches at most."""
    embedder = E5VEmbedder(tiny_path, batch_size=1, prepare_ahead=True)
    texts = [f"text number {i}" for i in range(6)]  # equal lengths: batches in input order
    second_batch = threading.Event()
    encoded: list[str] = []
    encoded_at_forward: list[int] = []
    waited: list[bool] = []
    tokenize, forward = runner.tokenize, runner.forward

    def watching_tokenize(loaded, prompts, pixels):
        if any("text number 1" in prompt for prompt in prompts):
            second_batch.set()
        result = tokenize(loaded, prompts, pixels)
        encoded.extend(prompts)
        return result

    def waiting_forward(loaded, batch):
        if not waited:
            waited.append(second_batch.wait(timeout=30))
        encoded_at_forward.append(len(encoded))
        return forward(loaded, batch)

    monkeypatch.setattr(runner, "tokenize", watching_tokenize)
    monkeypatch.setattr(runner, "forward", waiting_forward)
    embedder.embed_texts(texts)
    assert waited == [True]
    assert len(encoded_at_forward) == 6
    assert all(n <= k + 2 for k, n in enumerate(encoded_at_forward)), encoded_at_forward


def test_batches_are_planned_over_the_whole_call_longest_first(tiny_path, monkeypatch):
    calls = Calls(monkeypatch)
    widths: list[int] = []
    forward = runner.forward

    def recording_forward(loaded, batch):
        widths.append(max(item.length for item in batch))
        return forward(loaded, batch)

    monkeypatch.setattr(runner, "forward", recording_forward)
    texts = ["word " * n for n in (3, 40, 1, 25, 7, 60, 12, 2, 33)]
    E5VEmbedder(tiny_path, batch_size=2).embed_texts(texts)
    assert len(calls.encoded) == 9 and len(widths) == 5
    assert widths == sorted(widths, reverse=True)


def test_token_bounds_are_exact_for_texts(embedder):
    prompts = embedder.prompts
    for words in ("a dog on the beach", "x", "word " * 40):
        exact = runner.encode(embedder._loaded, prompts.wrap(fill(prompts.text, words)), []).length
        assert embedder._token_bounds([text_request(words, 0)], {"text": prompts.text}) == [exact]


def _image_forms(photos, tmp_path):
    """Image-likes of many sizes and kinds, each with the RGB image the loader makes of it."""
    loader = ImageLoader()
    forms = []
    for name, photo in photos.items():
        forms.append(photo)
        forms.append(np.asarray(photo))
        path = tmp_path / f"{name}.png"
        photo.save(path)
        forms += [path, str(path), path.read_bytes()]
    for width, height in ((1, 1), (1, 300), (300, 1), (997, 13), (57, 56), (55, 113)):
        forms.append(Image.new("RGB", (width, height), (10, 200, 30)))
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 300x120, shown 120x300
    Image.new("RGB", (300, 120)).save(rotated, format="JPEG", exif=exif)
    forms.append(rotated.getvalue())
    return [(form, loader.load(form, 0)) for form in forms]


@pytest.mark.parametrize("max_image_tiles", [None, 2, 0])
def test_token_bounds_are_exact_for_images_whose_header_gives_their_size(tiny_path, photos, tmp_path, max_image_tiles):
    embedder = E5VEmbedder(tiny_path, max_image_tiles=max_image_tiles)
    prompts = embedder.prompts
    bodies = {"image": prompts.image, "composed": prompts.composed}
    forms = _image_forms(photos, tmp_path)
    bounds = embedder._token_bounds([image_request(form, 0) for form, _ in forms], bodies)
    composed = embedder._token_bounds([composed_request(form, "make it red", 0) for form, _ in forms], bodies)
    for bound, composed_bound, (_, image) in zip(bounds, composed, forms):
        prompt = prompts.wrap(fill(prompts.image, ""))
        assert bound == runner.encode(embedder._loaded, prompt, [image], max_image_tiles=max_image_tiles).length
        prompt = prompts.wrap(fill(prompts.composed, "make it red"))
        exact = runner.encode(embedder._loaded, prompt, [image], max_image_tiles=max_image_tiles).length
        assert composed_bound == exact
    # On a grid the counts follow the sizes; the base view alone is one count for all.
    assert len(set(bounds)) == 1 if max_image_tiles == 0 else len(set(bounds)) > 3


def test_images_of_unknown_size_are_bounded_by_the_largest_count(embedder, photos):
    prompts, loader = embedder.prompts, ImageLoader()
    png = io.BytesIO()
    photos["coffee"].save(png, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    bodies = {"image": prompts.image}
    [bound] = embedder._token_bounds([image_request(uri, 0)], bodies)
    encoded = runner.encode(embedder._loaded, prompts.wrap(fill(prompts.image, "")), [loader.load(uri, 0)])
    assert encoded.length < bound
    widest = Image.new("RGB", (56, 56))  # shaped like the largest pinpoint: nothing lost to unpadding
    assert embedder._token_bounds([image_request(widest, 0)], bodies) == [bound]
    assert embedder._token_bounds([image_request(b"not an image", 0)], bodies) == [bound]


def test_batch_size_defaults_by_device(tiny_path):
    from e5v.core.embedder import _batch_size

    assert E5VEmbedder(tiny_path).batch_size == 16  # a CPU here
    assert E5VEmbedder(tiny_path, batch_size=3).batch_size == 3
    assert _batch_size("auto", torch.device("cuda")) == 256  # on an accelerator the token budget binds first
    assert _batch_size(3, torch.device("cuda")) == 3
    for wrong in (0, -1, True, 2.5, "16", None):
        with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer"):
            E5VEmbedder(tiny_path, batch_size=wrong)
    with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer, got 0"):
        E5VEmbedder(tiny_path).embed_texts(["a call's own batch size is checked too"], batch_size=0)


def test_token_budget_defaults_by_device(tiny_path):
    assert E5VEmbedder(tiny_path, workers=1).max_batch_tokens == 1024  # a CPU here
    assert E5VEmbedder(tiny_path, workers=2).max_batch_tokens == 512  # "auto": 1024 in flight, shared
    assert E5VEmbedder(tiny_path, workers=2, max_batch_tokens=1024).max_batch_tokens == 1024  # a number: per batch
    assert E5VEmbedder(tiny_path, max_batch_tokens=None).max_batch_tokens is None
    with pytest.raises(ValueError, match="max_batch_tokens"):
        E5VEmbedder(tiny_path, max_batch_tokens=0)


def test_encoding_happens_off_the_calling_thread_when_preparing_ahead(tiny_path, monkeypatch):
    calls = Calls(monkeypatch)
    E5VEmbedder(tiny_path, prepare_ahead=True).embed_texts(["one", "two"])
    assert calls.encode_threads and all(name.startswith("e5v-prepare") for name in calls.encode_threads)


def test_on_a_cpu_encoding_runs_in_turn_on_the_calling_thread(embedder, monkeypatch):
    calls = Calls(monkeypatch)
    assert not embedder.prepare_ahead
    embedder.embed_texts(["one", "two"])
    assert calls.encode_threads == {threading.current_thread().name}


def test_tile_budget_reduces_tokens_and_keeps_unit_vectors(tiny_path, photos):
    images = [photos["rocket"], photos["text"], photos["astronaut"]]
    full = E5VEmbedder(tiny_path)
    before = full.embed_images(images)
    lengths = {}
    for tiles in (None, 2, 0):
        emb = E5VEmbedder(tiny_path, max_image_tiles=tiles)
        encoded = [
            runner.encode(emb._loaded, "<image>", [ImageLoader().load(i, 0)], max_image_tiles=tiles) for i in images
        ]
        lengths[tiles] = sum(e.length for e in encoded)
        vectors = emb.embed_images(images)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert lengths[0] < lengths[2] <= lengths[None]
    assert all(e.tiles == (1,) for e in encoded)  # base view only
    # the shared model is untouched: the full grid still gives the same vectors
    np.testing.assert_allclose(full.embed_images(images), before, atol=TOL, rtol=0)
    assert full.model.config.image_grid_pinpoints == [list(p) for p in runner.image_grid(full._loaded)]


def test_budget_covering_the_grid_equals_the_full_path(tiny_path, photos):
    images = [photos["cat"], photos["text"], photos["camera"]]
    full = E5VEmbedder(tiny_path).embed_images(images)
    np.testing.assert_allclose(E5VEmbedder(tiny_path, max_image_tiles=4).embed_images(images), full, atol=TOL, rtol=0)


def test_base_only_uses_the_same_base_view(tiny_path, photos):
    loaded = E5VEmbedder(tiny_path)._loaded
    image = ImageLoader().load(photos["rocket"], 0)
    full = runner.encode(loaded, "<image>", [image])
    base = runner.encode(loaded, "<image>", [image], max_image_tiles=0)
    torch.testing.assert_close(base.pixel_values[0], full.pixel_values[0], rtol=0, atol=0)


def test_negative_tile_budget_is_refused(tiny_path):
    with pytest.raises(ValueError, match="max_image_tiles"):
        E5VEmbedder(tiny_path, max_image_tiles=-1)


def test_quantization_without_bitsandbytes_says_how_to_fix(tiny_path):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match=r"needs the package 'bitsandbytes'.*: pip install bitsandbytes"):
        E5VEmbedder(tiny_path, quantization="8bit")


def test_unknown_quantization_is_refused(tiny_path):
    with pytest.raises(ValueError, match="'8bit' or '4bit'"):
        E5VEmbedder(tiny_path, quantization="3bit")


def test_full_size_spec_code_path_on_a_reduced_model(photos):
    """e5v-8b's structure (vocab padded so <image> is 128256, one past the table) at tiny widths."""
    from e5v.testing import build_random_model, spec_with

    spec = spec_with(
        "e5v-8b",
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        vision_hidden_size=32,
        vision_num_hidden_layers=2,
        vision_num_attention_heads=2,
        vision_intermediate_size=64,
        image_size=28,
    )
    loaded = build_random_model(spec, device="cpu", dtype="bfloat16")
    assert loaded.image_token_id == 128256 == loaded.model.get_input_embeddings().num_embeddings
    assert loaded.model.dtype == torch.bfloat16
    vectors = E5VEmbedder(loaded, batch_size=2).embed(["a dog", photos["cat"], Composed(photos["rocket"], "red")])
    assert vectors.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)


@pytest.mark.full_widths
def test_fast_path_equals_the_recipe_at_e5v_full_widths(photos):
    """E5-V's real shapes but for depth: Llama-3-8B's layers (4096 wide, 32 heads of 128 over 8
    KV heads, MLP 14336) 2 deep instead of 32, its 128256-token vocabulary with <image> one
    past the table, CLIP ViT-L/14-336 whole, anyres at 336 px (a photo is ~1500 tokens).
    About 10 GB of RAM in float32 and 3 minutes on 2 cores, so deselected by default (run it
    with ``-m full_widths``; ``.ci/device-bench`` runs it on the GPU machine's CPU)."""
    from e5v.model.loading import add_image_token_row
    from e5v.testing import build_random_model, spec_with

    loaded = build_random_model(spec_with("e5v-8b", num_hidden_layers=2), device="cpu", dtype="float32")
    items = ["A cat sleeps on a warm windowsill.", photos["cat"], Composed(photos["rocket"], "at night")]
    embedder = E5VEmbedder(loaded)
    fast = embedder.embed(items)
    add_image_token_row(loaded.model)  # the recipe's own fix for the published checkpoint
    expected = recipe_vectors(embedder, loaded.model, loaded.processor, items)
    np.testing.assert_allclose(fast, expected, atol=TOL, rtol=0)
    assert fast.shape == (3, 4096)
    assert abs(float(fast[1] @ fast[2])) < 0.99  # distinct inputs, distinct vectors


def test_workers_run_batches_side_by_side_with_a_share_of_torch_threads(tiny_path, monkeypatch):
    """The first forward waits until a second one has started: it only gets there if two
    batches run at once. Each worker runs with half the caller's torch threads, and the
    caller's setting is what it was after the call, for new threads too."""
    embedder = E5VEmbedder(tiny_path, batch_size=1, workers=2)
    caller_threads = torch.get_num_threads()
    second_started = threading.Event()
    seen: list[tuple[str, int]] = []
    waited: list[bool] = []
    forward = runner.forward

    def overlapping_forward(loaded, batch):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if len(seen) == 1:
            waited.append(second_started.wait(timeout=30))
        else:
            second_started.set()
        return forward(loaded, batch)

    monkeypatch.setattr(runner, "forward", overlapping_forward)
    embedder.embed_texts([f"text number {i}" for i in range(5)])
    assert waited == [True] and len(seen) == 5
    assert {name.split("_")[0] for name, _ in seen} == {"e5v-worker"} and len({name for name, _ in seen}) == 2
    assert {threads for _, threads in seen} == {max(1, caller_threads // 2)}
    fresh: list[int] = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == caller_threads and fresh == [caller_threads]


def test_a_call_of_one_batch_runs_on_the_calling_thread_with_all_threads(tiny_path, monkeypatch):
    """A query (one batch) gets all of torch's threads, whatever the workers."""
    embedder = E5VEmbedder(tiny_path, workers=2)
    seen: list[tuple[str, int]] = []
    forward = runner.forward

    def recording_forward(loaded, batch):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(loaded, batch)

    monkeypatch.setattr(runner, "forward", recording_forward)
    embedder.embed_texts(["a query"])
    assert seen == [(threading.current_thread().name, torch.get_num_threads())]


def test_workers_give_the_single_batch_vectors_in_input_order(tiny_path, photos):
    items = ["a dog", photos["cat"], "a rocket", Composed(photos["rocket"], "at night"), "a dog", photos["text"]]
    one = E5VEmbedder(tiny_path, batch_size=2, workers=1).embed(items)
    two = E5VEmbedder(tiny_path, batch_size=2, workers=2).embed(items)
    three = E5VEmbedder(tiny_path, batch_size=1, workers=3).embed(items)
    np.testing.assert_allclose(two, one, atol=1e-6)
    np.testing.assert_allclose(three, one, atol=1e-6)
    np.testing.assert_array_equal(two[0], two[4])


def test_a_failing_batch_among_workers_raises_and_leaves_the_embedder_usable(tiny_path, photos):
    from e5v.errors import InvalidInputError

    buffer = io.BytesIO()
    photos["cat"].save(buffer, format="PNG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    embedder = E5VEmbedder(tiny_path, batch_size=1, workers=2)
    threads = torch.get_num_threads()
    with pytest.raises(InvalidInputError, match="item 3"):
        embedder.embed(["one", "two", "three", truncated, "five", "six"])
    assert torch.get_num_threads() == threads
    assert embedder.embed(["one", "two"]).shape == (2, embedder.dimension)


def test_workers_are_checked_and_off_by_default(tiny_path):
    assert E5VEmbedder(tiny_path).workers == 1
    for bad in (0, -1, "two"):
        with pytest.raises(ValueError, match="workers"):
            E5VEmbedder(tiny_path, workers=bad)


def test_prepared_ahead_a_batch_of_images_is_processed_on_threads_with_the_same_vectors(tiny_path, photos, monkeypatch):
    """Preparing ahead (as on a GPU), prompts' images go through the image processor side
    by side; the vectors do not change. Preparing in turn (a CPU), on the calling thread."""
    from e5v.core import embedder as embedder_module

    items = [photos["cat"], Composed(photos["cat"], "at night"), photos["rocket"], photos["text"], "a dog"]
    monkeypatch.setattr(embedder_module, "_image_threads", lambda: 1)
    serial = E5VEmbedder(tiny_path, batch_size=5, max_batch_tokens=None, prepare_ahead=True).embed(items)
    threads: list[str] = []
    two_at_once = threading.Barrier(2, timeout=30)  # broken (the test fails) if run one at a time
    process_images = runner.process_images

    def recording(loaded, images, **options):
        threads.append(threading.current_thread().name)
        if len(threads) <= 2:
            two_at_once.wait()
        return process_images(loaded, images, **options)

    monkeypatch.setattr(embedder_module, "_image_threads", lambda: 3)
    monkeypatch.setattr(runner, "process_images", recording)
    threaded = E5VEmbedder(tiny_path, batch_size=5, max_batch_tokens=None, prepare_ahead=True).embed(items)
    assert len(threads) == 5 and all(name.startswith("e5v-images") for name in threads)
    np.testing.assert_array_equal(threaded, serial)
    calling: set[str] = set()

    def in_turn(loaded, images, **options):
        calling.add(threading.current_thread().name)
        return process_images(loaded, images, **options)

    monkeypatch.setattr(runner, "process_images", in_turn)
    E5VEmbedder(tiny_path, batch_size=5, max_batch_tokens=None).embed(items)
    assert calling == {threading.current_thread().name}
