"""The persistent embedding cache: hits without the model, keys, corruption, processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5v import Composed, E5VEmbedder
from e5v.core.cache import EmbeddingCache, entry_key
from e5v.model import runner


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything is encoded or forwarded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran on a cache hit")

    def install():
        for step in ("process_images", "tokenize", "forward"):
            monkeypatch.setattr(runner, step, refuse)

    return install


def corpus(photo_dir: Path) -> list:
    return ["a dog in the park", photo_dir / "cat.png", Composed(photo_dir / "rocket.png", "at night"), "cat"]


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.vec"))


def test_warm_run_is_served_without_the_model(tiny_path, photo_dir, tmp_path, no_model):
    items = corpus(photo_dir)
    cold = E5VEmbedder(tiny_path, cache=tmp_path)
    first = cold.embed(items)
    assert (cold.cache.hits, cold.cache.misses) == (0, 4) and len(entries(tmp_path)) == 4
    np.testing.assert_allclose(first, E5VEmbedder(tiny_path).embed(items), atol=1e-6, rtol=0)
    no_model()
    warm = E5VEmbedder(tiny_path, cache=tmp_path)
    np.testing.assert_array_equal(warm.embed(items), first)
    assert (warm.cache.hits, warm.cache.misses) == (4, 0)


def test_files_are_keyed_by_content_not_name(tiny_path, photo_dir, tmp_path):
    emb = E5VEmbedder(tiny_path, cache=tmp_path / "cache")
    original = emb.embed_images([photo_dir / "coffee.png"])
    copy = tmp_path / "renamed.png"
    shutil.copy(photo_dir / "coffee.png", copy)
    np.testing.assert_array_equal(emb.embed_images([copy]), original)
    assert emb.cache.hits == 1
    shutil.copy(photo_dir / "camera.png", copy)  # same name, new content
    changed = emb.embed_images([copy])
    assert emb.cache.misses == 2 and not np.allclose(changed, original)


def test_key_changes_with_prompt_model_dtype_and_tiles(checkpoints, tmp_path, photos):
    items = ["a dog", photos["rocket"]]
    base = E5VEmbedder(checkpoints["tiny"], cache=tmp_path)
    base.embed(items)
    variants = [
        E5VEmbedder(checkpoints["tiny-left"], cache=tmp_path),
        E5VEmbedder(checkpoints["tiny"], cache=tmp_path, dtype="bfloat16"),
        E5VEmbedder(checkpoints["tiny"], cache=tmp_path, max_image_tiles=0),
    ]
    for variant in variants:
        variant.embed(items)
        assert variant.cache.hits == 0, variant
    overridden = E5VEmbedder(checkpoints["tiny"], cache=tmp_path)
    overridden.embed_texts(["a dog"], prompt="<sent>\nOne word: ")
    assert overridden.cache.hits == 0
    again = E5VEmbedder(checkpoints["tiny"], cache=tmp_path)
    again.embed(items)
    assert again.cache.hits == 2


def test_entry_key_separates_its_parts():
    assert entry_key("m", "ab", [b"c"]) != entry_key("m", "a", [b"bc"])
    assert entry_key("m", "p", [b"x", b"y"]) != entry_key("m", "p", [b"xy"])
    assert entry_key("m1", "p", []) != entry_key("m2", "p", [])


@pytest.mark.parametrize("damage", ["truncate", "flip", "nan", "empty", "wrong-size"])
def test_corrupt_entries_are_recomputed_and_rewritten(tiny_path, tmp_path, damage):
    emb = E5VEmbedder(tiny_path, cache=tmp_path)
    expected = emb.embed_texts(["a parked car"])
    (entry,) = entries(tmp_path)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[:-5]
    elif damage == "flip":
        data[-3] ^= 0x40
    elif damage == "nan":
        cache = EmbeddingCache(tmp_path / "other")
        cache.put("k" * 40, np.full(emb.dimension, np.nan, dtype=np.float32))
        data = bytearray(cache.path_of("k" * 40).read_bytes())
    elif damage == "empty":
        data = bytearray()
    else:
        cache = EmbeddingCache(tmp_path / "other")
        cache.put("k" * 40, np.ones(emb.dimension + 1, dtype=np.float32) / np.sqrt(emb.dimension + 1))
        data = bytearray(cache.path_of("k" * 40).read_bytes())
    entry.write_bytes(bytes(data))
    fresh = E5VEmbedder(tiny_path, cache=tmp_path)
    np.testing.assert_allclose(fresh.embed_texts(["a parked car"]), expected, atol=1e-6, rtol=0)
    assert (fresh.cache.hits, fresh.cache.misses) == (0, 1)
    healed = E5VEmbedder(tiny_path, cache=tmp_path)
    np.testing.assert_array_equal(healed.embed_texts(["a parked car"]), fresh.embed_texts(["a parked car"]))
    assert healed.cache.hits == 1


def test_remote_urls_are_never_cached(tiny_path, tmp_path):
    from e5v.core.cache import image_digest

    assert image_digest("https://example.com/a.png") is None
    assert image_digest(tmp_path / "missing.png") is None
    assert image_digest("data:image/png;base64,AAAA") is not None


_WORKER = """
import sys
import numpy as np
from e5v import E5VEmbedder
from pathlib import Path
photos = Path(sys.argv[3])
items = [f"text {i}" for i in range(12)] + [photos / name for name in ("cat.png", "rocket.png", "logo.png")]
emb = E5VEmbedder(sys.argv[1], cache=sys.argv[2], batch_size=2)
np.save(sys.argv[4], emb.embed(items))
"""


def test_two_processes_fill_the_same_cache(tiny_path, photo_dir, tmp_path, no_model):
    cache = tmp_path / "shared"
    outputs = [tmp_path / f"out{i}.npy" for i in range(2)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tiny_path), str(cache), str(photo_dir), str(out)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for out in outputs
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()[-2000:]
    first, second = (np.load(out) for out in outputs)
    np.testing.assert_allclose(first, second, atol=1e-6, rtol=0)
    assert len(entries(cache)) == 15 and not list(cache.glob("*/.tmp-*"))
    no_model()
    items = [f"text {i}" for i in range(12)] + [photo_dir / n for n in ("cat.png", "rocket.png", "logo.png")]
    warm = E5VEmbedder(tiny_path, cache=cache)
    np.testing.assert_allclose(warm.embed(items), first, atol=1e-6, rtol=0)
    assert warm.cache.hits == 15


def test_unwritable_cache_folder_is_a_clear_error(tiny_path, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="embedding cache folder"):
        E5VEmbedder(tiny_path, cache=blocker / "cache")
