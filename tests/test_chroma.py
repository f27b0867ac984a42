"""chromadb_e5v against a real embedded Chroma: documents and images, persistence, queries."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

chromadb = pytest.importorskip("chromadb")

from chromadb.utils.data_loaders import ImageLoader  # noqa: E402
from chromadb.utils.embedding_functions import config_to_embedding_function, known_embedding_functions  # noqa: E402

from chromadb_e5v import E5VEmbeddingFunction, E5VImageLoader  # noqa: E402
from e5v import Composed, E5VEmbedder, Interleaved, InvalidInputError  # noqa: E402
from e5v.model.identity import model_identity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ef(tiny_path: Path) -> E5VEmbeddingFunction:
    return E5VEmbeddingFunction(str(tiny_path), batch_size=4)


@pytest.fixture()
def client(tmp_path: Path):
    return chromadb.PersistentClient(path=str(tmp_path / "db"))


def assert_vectors_equal(actual: object, expected: np.ndarray, *, stored: bool = False) -> None:
    """Equal to the core's vectors. The function returns Chroma's ``Embeddings`` (a list of
    float32 arrays); vectors read back from Chroma (``stored``) come as float64."""
    if not stored:
        assert isinstance(actual, list) and all(v.dtype == np.float32 and v.ndim == 1 for v in actual)
    stacked = np.stack([np.asarray(vector) for vector in actual])  # type: ignore[union-attr]
    assert stacked.shape == expected.shape
    np.testing.assert_allclose(stacked, expected, atol=TOLERANCE, rtol=0)


def brute_force_ids(query: np.ndarray, ids: list[str], vectors: np.ndarray) -> list[str]:
    return [ids[i] for i in np.argsort(-(vectors @ query), kind="stable")]


# -- the function itself ---------------------------------------------------------------


def test_registered_under_its_name_with_cosine() -> None:
    assert known_embedding_functions["e5v"] is E5VEmbeddingFunction
    assert E5VEmbeddingFunction.name() == "e5v"


def test_space_and_protocol(ef: E5VEmbeddingFunction) -> None:
    assert ef.default_space() == "cosine"
    assert set(ef.supported_spaces()) == {"cosine", "ip", "l2"}
    assert not ef.is_legacy()


def test_functions_by_name_share_one_model(ef: E5VEmbeddingFunction, tiny_path: Path, embedder: E5VEmbedder) -> None:
    again = E5VEmbeddingFunction(str(tiny_path), batch_size=2)
    assert again.embedder is ef.embedder
    assert ef.embedder._loaded is embedder._loaded  # the core's model cache


def test_given_embedder_is_used_and_options_clash(embedder: E5VEmbedder) -> None:
    function = E5VEmbeddingFunction(embedder=embedder)
    assert function.embedder is embedder
    assert function.get_config()["dtype"] == "float32"
    with pytest.raises(ValueError, match="dtype"):
        E5VEmbeddingFunction(embedder=embedder, dtype="bfloat16")
    with pytest.raises(ValueError, match="model_name"):
        E5VEmbeddingFunction("someone/else", embedder=embedder)


def test_bad_batch_size_is_refused(tiny_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        E5VEmbeddingFunction(str(tiny_path), batch_size=0)


def test_documents_and_images_of_every_mode_equal_the_core(
    ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photos: dict[str, Image.Image]
) -> None:
    images = [photos["cat"], photos["camera"], photos["logo"], photos["cat"].convert("P")]
    arrays = [np.asarray(image.convert("RGB") if image.mode == "P" else image) for image in images]
    assert [a.ndim for a in arrays] == [3, 2, 3, 3] and arrays[2].shape[2] == 4  # RGB, L, RGBA, palette->RGB
    texts = ["A cat sleeps on a warm sofa.", "A red rocket."]
    mixed = [texts[0], arrays[0], arrays[1], texts[1], arrays[2], arrays[3]]
    expected = embedder.embed([texts[0], images[0], images[1], texts[1], images[2], images[3].convert("RGB")])
    assert_vectors_equal(ef(mixed), expected)
    assert_vectors_equal(ef.embed_query(input=texts), embedder.embed_texts(texts))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (None, "NoneType"),
        (3.5, "float"),
        (np.zeros(8, dtype=np.uint8), "shape \\(8,\\)"),
        (["nested"], "list"),
    ],
)
def test_unsupported_item_raises_naming_it(ef: E5VEmbeddingFunction, item: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=f"item 1: .*{message}"):
        ef(["a text", item])  # type: ignore[list-item]


def test_image_arrays_the_core_cannot_read_raise(ef: E5VEmbeddingFunction) -> None:
    with pytest.raises(InvalidInputError, match=r"item 0: .*HxWx4"):
        ef([np.zeros((8, 8, 2), dtype=np.uint8)])


def test_composed_and_interleaved_equal_the_core(
    ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photos: dict[str, Image.Image]
) -> None:
    cat = np.asarray(photos["cat"])
    assert_vectors_equal(
        ef.embed_composed([cat], ["make it a rocket"]), embedder.embed_composed([cat], ["make it a rocket"])
    )
    items = [Interleaved(["A photo:", cat, "of a cat"]), ["two images", cat, np.asarray(photos["rocket"])]]
    assert_vectors_equal(ef.embed_interleaved(items), embedder.embed_interleaved(items))


# -- config persistence ---------------------------------------------------------------


def test_config_is_json_without_device(ef: E5VEmbeddingFunction, tiny_path: Path) -> None:
    config = ef.get_config()
    assert json.loads(json.dumps(config)) == config
    assert config == {
        "model_name": str(tiny_path.resolve()),
        "revision": None,
        "dtype": None,
        "batch_size": 4,
        "prompts": "e5v",
        "model_id": model_identity(tiny_path),
    }
    E5VEmbeddingFunction.validate_config(config)


def test_build_from_config_reuses_the_embedder(ef: E5VEmbeddingFunction) -> None:
    rebuilt = E5VEmbeddingFunction.build_from_config(ef.get_config())
    assert rebuilt.embedder is ef.embedder
    assert rebuilt.get_config() == ef.get_config()
    via_chroma = config_to_embedding_function({"name": "e5v", "config": ef.get_config()})
    assert isinstance(via_chroma, E5VEmbeddingFunction) and via_chroma.embedder is ef.embedder


def test_dtype_is_stored_by_its_canonical_name(tiny_path: Path, ef: E5VEmbeddingFunction) -> None:
    function = E5VEmbeddingFunction(str(tiny_path), dtype="fp32")
    assert function.get_config()["dtype"] == "float32"
    assert function.embedder is ef.embedder  # float32 is what None means on a CPU
    with pytest.raises(ValueError, match="unknown dtype"):
        E5VEmbeddingFunction(str(tiny_path), dtype="int3")


def test_custom_prompts_round_trip(tiny_path: Path, embedder: E5VEmbedder) -> None:
    from e5v.core.prompts import PRESETS

    custom = PRESETS["e5v"].with_overrides(name="mine", text="<sent>\nIn one word: ")
    function = E5VEmbeddingFunction(str(tiny_path), prompts=custom)
    config = function.get_config()
    assert config["prompts"]["text"] == "<sent>\nIn one word: "
    rebuilt = E5VEmbeddingFunction.build_from_config(json.loads(json.dumps(config)))
    assert rebuilt.embedder is function.embedder
    expected = embedder.embed_texts(["a cat"], prompt="<sent>\nIn one word: ")
    assert_vectors_equal(rebuilt(["a cat"]), expected)
    assert E5VEmbeddingFunction(str(tiny_path), prompts="cirr").get_config()["prompts"] == "cirr"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"model_name": ""}, "model_name"),
        ({"dtype": 16}, "dtype"),
        ({"prompts": "nope"}, "unknown prompt preset"),
        ({"prompts": {"text": "no placeholder"}}, "prompt"),
        ({"device": "cuda"}, "unknown e5v config keys"),
    ],
)
def test_validate_config_refuses(ef: E5VEmbeddingFunction, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        E5VEmbeddingFunction.validate_config({**ef.get_config(), **change})


def test_batch_size_auto_is_the_embedders_and_persists(tiny_path: Path, embedder: E5VEmbedder, monkeypatch) -> None:
    function = E5VEmbeddingFunction(embedder=embedder)
    assert function.get_config()["batch_size"] == "auto"
    assert E5VEmbeddingFunction.build_from_config(function.get_config()).batch_size == "auto"
    sizes: list[int | None] = []
    embed = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda items, **options: sizes.append(options["batch_size"]) or embed(items))
    function(["a cat"])
    assert sizes == [None]  # the embedder's own: 16 on this CPU


def test_config_update_refuses_a_new_model(ef: E5VEmbeddingFunction) -> None:
    old = ef.get_config()
    ef.validate_config_update(old, {**old, "dtype": "bfloat16", "batch_size": 32})
    ef.validate_config_update(old, {**old, "model_name": "/the/same/checkpoint/moved"})  # its model_id stays
    for key, value in [("model_id", "sha256:0123"), ("revision", "abc"), ("prompts", "cirr")]:
        with pytest.raises(ValueError, match=f"cannot change the e5v {key}"):
            ef.validate_config_update(old, {**old, key: value})
    legacy = {key: value for key, value in old.items() if key != "model_id"}  # a config from before identities
    with pytest.raises(ValueError, match="cannot change the e5v model_name"):
        ef.validate_config_update(legacy, {**legacy, "model_name": "other/model"})


# -- collections ----------------------------------------------------------------------


@pytest.mark.parametrize("loader", [E5VImageLoader, ImageLoader], ids=["e5v-loader", "chroma-loader"])
def test_mixed_collection_text_image_and_image_image(
    client, ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photo_dir: Path, loader: type
) -> None:
    collection = client.create_collection("media", embedding_function=ef, data_loader=loader())
    assert collection.configuration_json["hnsw"]["space"] == "cosine"
    names = ["cat", "astronaut", "camera", "logo"]  # RGB, RGB, L, RGBA files
    uris = [str(photo_dir / f"{name}.png") for name in names]
    texts = ["A cat sleeps on a warm sofa.", "A red rocket stands on the launch pad."]
    collection.add(ids=names, uris=uris)
    collection.add(ids=["doc-cat", "doc-rocket"], documents=texts)
    assert collection.count() == 6

    stored = collection.get(ids=[*names, "doc-cat", "doc-rocket"], include=["embeddings"])
    expected = np.concatenate([embedder.embed_images(uris), embedder.embed_texts(texts)])
    assert_vectors_equal(stored["embeddings"], expected, stored=True)
    all_ids = stored["ids"]

    by_text = collection.query(query_texts=["a sleeping cat"], n_results=6)
    query = embedder.embed_texts(["a sleeping cat"])[0]
    assert by_text["ids"][0] == brute_force_ids(query, all_ids, expected)

    by_uri = collection.query(query_uris=uris, n_results=1)
    assert by_uri["ids"] == [[name] for name in names]  # each image finds itself first
    assert max(d[0] for d in by_uri["distances"]) < 1e-5

    by_image = collection.query(query_images=[np.asarray(Image.open(uris[0]))], n_results=2)
    assert by_image["ids"][0][0] == "cat"


def test_palette_files_get_their_colours_with_the_e5v_loader(
    client, ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photos: dict[str, Image.Image], tmp_path: Path
) -> None:
    path = tmp_path / "cat-palette.png"
    photos["cat"].convert("P").save(path)
    loaded = E5VImageLoader()([str(path), None])
    assert loaded[1] is None
    np.testing.assert_array_equal(loaded[0], np.asarray(Image.open(path).convert("RGB")))
    collection = client.create_collection("palette", embedding_function=ef, data_loader=E5VImageLoader())
    collection.add(ids=["cat"], uris=[str(path)])
    stored = collection.get(ids=["cat"], include=["embeddings"])["embeddings"]
    assert_vectors_equal(stored, embedder.embed_images([str(path)]), stored=True)


def test_missing_file_is_named_by_the_e5v_loader(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"item 1: image file .*missing\.png"):
        E5VImageLoader()([None, str(tmp_path / "missing.png")])


def test_composed_and_interleaved_queries(
    client, ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photos: dict[str, Image.Image]
) -> None:
    collection = client.create_collection("gallery", embedding_function=ef)
    names = ["cat", "astronaut", "coffee", "rocket"]
    arrays = [np.asarray(photos[name]) for name in names]
    collection.add(ids=names, images=arrays)
    gallery = embedder.embed_images(arrays)

    composed = ef.embed_composed([arrays[0]], ["make it a red rocket"])
    assert_vectors_equal(composed, embedder.embed([Composed(arrays[0], "make it a red rocket")]))
    result = collection.query(query_embeddings=composed, n_results=4)
    assert result["ids"][0] == brute_force_ids(np.asarray(composed[0]), names, gallery)

    interleaved = ef.embed_interleaved([["A cup of", arrays[2], "on a table"]])
    result = collection.query(query_embeddings=interleaved, n_results=4)
    assert result["ids"][0] == brute_force_ids(np.asarray(interleaved[0]), names, gallery)


@pytest.mark.parametrize(
    "bad",
    [
        {"images": "mixed"},
        {"documents": ["fine", "a text with the reserved <image> slot"]},
    ],
    ids=["two-channel-image", "reserved-placeholder"],
)
def test_a_batch_with_a_bad_item_raises_and_adds_nothing(
    client, ef: E5VEmbeddingFunction, photos: dict[str, Image.Image], bad: dict
) -> None:
    collection = client.create_collection("guarded", embedding_function=ef)
    collection.add(ids=["first"], documents=["already here"])
    if bad.get("images") == "mixed":
        bad = {"images": [np.asarray(photos["cat"]), np.zeros((8, 8, 2), dtype=np.uint8)]}
    with pytest.raises(InvalidInputError, match="item 1:"):
        collection.add(ids=["a", "b"], **bad)
    assert collection.count() == 1


def test_reopened_in_a_new_process_embeds_with_e5v_again(
    tmp_path: Path, ef: E5VEmbeddingFunction, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    db = tmp_path / "db"
    collection = chromadb.PersistentClient(path=str(db)).create_collection(
        "persisted", embedding_function=ef, data_loader=E5VImageLoader()
    )
    collection.add(ids=["cat"], uris=[str(photo_dir / "cat.png")])

    script = textwrap.dedent(
        """
        import json, logging, sys
        import chromadb
        import chromadb_e5v
        import e5v.model.loading

        loads = []
        handler = logging.Handler()
        handler.emit = lambda record: loads.append(record.getMessage())
        logging.getLogger("e5v.model.loading").addHandler(handler)
        logging.getLogger("e5v.model.loading").setLevel(logging.INFO)

        db, photo = sys.argv[1], sys.argv[2]
        collection = chromadb.PersistentClient(path=db).get_collection(
            "persisted", data_loader=chromadb_e5v.E5VImageLoader()
        )
        collection.add(ids=["doc"], documents=["A cat sleeps on a warm sofa."])
        collection.add(ids=["rocket"], uris=[photo])
        ranked = [collection.query(query_texts=["a sleeping cat"], n_results=3)["ids"][0] for _ in range(3)]
        embedders = {id(collection.configuration["embedding_function"].embedder) for _ in range(3)}
        stored = collection.get(ids=["cat", "doc", "rocket"], include=["embeddings"])["embeddings"]
        print(json.dumps({
            "ranked": ranked,
            "embedders": len(embedders),
            "models": len(e5v.model.loading._CACHE),
            "loads": [m for m in loads if m.startswith("loading ")],
            "stored": [list(map(float, v)) for v in stored],
        }))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(db), str(photo_dir / "rocket.png")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = embedder.embed([photo_dir / "cat.png", "A cat sleeps on a warm sofa.", photo_dir / "rocket.png"])
    np.testing.assert_allclose(np.array(report["stored"], dtype=np.float32), expected, atol=TOLERANCE, rtol=0)
    query = embedder.embed_texts(["a sleeping cat"])[0]
    assert report["ranked"] == [brute_force_ids(query, ["cat", "doc", "rocket"], expected)] * 3
    assert report["embedders"] == 1
    assert report["models"] == 1
    assert len(report["loads"]) == 1, report["loads"]


def test_example_runs_on_a_tiny_checkpoint(tiny_path: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "chroma_collection.py"),
            "--model",
            str(tiny_path),
            "--db",
            str(tmp_path / "db"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "query text: 'a cat sleeping'" in out
    assert "query image: chelsea.png" in out
    lines = out.splitlines()
    first_after_image = lines[lines.index("query image: chelsea.png") + 1]
    assert "image chelsea.png" in first_after_image  # an image finds itself first
    assert out.count("  1. ") >= 3


def test_model_loads_only_when_the_function_embeds(tiny_path: Path) -> None:
    # Chroma rebuilds the function from its config on every add, also when embeddings= are given:
    # building it, reading its config and comparing it must not load a model.
    from e5v.model import loading

    before = dict(loading._CACHE)
    function = E5VEmbeddingFunction(tiny_path, dtype="bfloat16", batch_size=3)
    rebuilt = E5VEmbeddingFunction.build_from_config(function.get_config())
    assert rebuilt.get_config() == function.get_config()
    assert function._embedder is None and rebuilt._embedder is None
    assert before == loading._CACHE
    assert rebuilt(["a cat"])[0].shape == (rebuilt.embedder.dimension,)
    assert rebuilt.embedder.dtype == torch.bfloat16
