"""chromadb_e5v in remote mode: a real ``e5v serve`` subprocess embeds for a real persistent Chroma."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

chromadb = pytest.importorskip("chromadb")

from serving import KEY, free_port, start_server, stop  # noqa: E402

from chromadb_e5v import E5VEmbeddingFunction  # noqa: E402
from e5v import Composed, E5VEmbedder, Embedder, InvalidInputError, RemoteEmbedder  # noqa: E402
from e5v.errors import ConfigurationError  # noqa: E402
from e5v.model.identity import model_identity  # noqa: E402

TOLERANCE = 1e-5  # the server's vectors against the in-process ones
TEXTS = ["A cat sleeps on a warm sofa.", "A red rocket stands on the launch pad."]
IMAGES = ["cat", "astronaut", "camera", "logo"]  # RGB, RGB, grey, RGBA
QUERY = "a sleeping cat"


@pytest.fixture(scope="module")
def model(tiny_path: Path) -> str:
    """The model's name as the server reports it (and as an in-process config holds it)."""
    return str(tiny_path.resolve())


@pytest.fixture(scope="module")
def server(model: str) -> Iterator[str]:
    process, url = start_server(Path(model))
    yield url
    stop(process)


@pytest.fixture()
def no_key_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key must come from ``api_key=``, not from this process's environment."""
    monkeypatch.delenv("E5V_API_KEY", raising=False)


@pytest.fixture()
def remote(server: str, no_key_variable: None) -> E5VEmbeddingFunction:
    return E5VEmbeddingFunction(base_url=server, api_key=KEY)


def close(actual: object, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np.stack([np.asarray(v) for v in actual]), expected, atol=TOLERANCE, rtol=0)  # type: ignore[union-attr]


def ranked(query: np.ndarray, ids: list[str], vectors: np.ndarray) -> list[str]:
    return [ids[i] for i in np.argsort(-(vectors @ query), kind="stable")]


# -- the function ---------------------------------------------------------------------


def test_remote_function_wraps_the_server_and_takes_its_model_name(
    remote: E5VEmbeddingFunction, model: str, server: str
) -> None:
    assert isinstance(remote.embedder, RemoteEmbedder) and isinstance(remote.embedder, Embedder)
    assert remote.embedder.api_key == KEY
    assert remote.get_config() == {
        "model_name": model,
        "batch_size": "auto",
        "prompts": "e5v",
        "base_url": server,
        "api_key_env_var": "E5V_API_KEY",
    }
    E5VEmbeddingFunction.validate_config(remote.get_config())
    assert KEY not in repr(remote)


def test_vectors_of_every_kind_equal_the_in_process_ones(
    remote: E5VEmbeddingFunction, embedder: E5VEmbedder, photos: dict[str, Image.Image]
) -> None:
    arrays = [np.asarray(photos[name]) for name in IMAGES]
    mixed = [TEXTS[0], *arrays, TEXTS[1]]
    close(remote(mixed), embedder.embed(mixed))
    close(remote.embed_query(input=[QUERY]), embedder.embed_texts([QUERY]))
    close(
        remote.embed_composed([arrays[0]], ["make it a rocket"]),
        embedder.embed([Composed(arrays[0], "make it a rocket")]),
    )
    items = [["A photo:", arrays[0], "of a cat"]]
    close(remote.embed_interleaved(items), embedder.embed_interleaved(items))


def test_a_prompt_preset_is_applied_by_the_server(
    server: str, no_key_variable: None, embedder: E5VEmbedder, photos: dict[str, Image.Image]
) -> None:
    function = E5VEmbeddingFunction(base_url=server, api_key=KEY, prompts="cirr", batch_size=1)
    assert function.get_config()["prompts"] == "cirr"
    items = [TEXTS[0], np.asarray(photos["cat"])]
    vectors = function(items)
    close(vectors, embedder.embed(items, prompts="cirr"))
    assert not np.allclose(vectors[1], embedder.embed(items[1:])[0], atol=TOLERANCE)  # cirr's image prompt


def test_bad_items_are_named_by_their_index(remote: E5VEmbeddingFunction) -> None:
    with pytest.raises(InvalidInputError, match=r"item 1: .*HxWx4"):
        remote(["a text", np.zeros((8, 8, 2), dtype=np.uint8)])
    with pytest.raises(InvalidInputError, match=r"item 1: .*float"):
        remote(["a text", 3.5])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "cpu"}, "device"),
        ({"dtype": "bfloat16"}, "dtype"),
        ({"revision": "main"}, "revision"),
    ],
)
def test_loading_options_with_base_url_are_refused(server: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"with base_url .*{message} would be ignored"):
        E5VEmbeddingFunction(base_url=server, **options)


def test_an_embedder_custom_prompts_or_a_stray_key_are_refused(
    server: str, tiny_path: Path, embedder: E5VEmbedder
) -> None:
    with pytest.raises(ValueError, match="embedder would be ignored"):
        E5VEmbeddingFunction(base_url=server, embedder=embedder)
    custom = embedder.prompts.with_overrides(name="mine", text="<sent>\nIn one word: ")
    with pytest.raises(ValueError, match="preset name"):
        E5VEmbeddingFunction(base_url=server, prompts=custom)
    with pytest.raises(ValueError, match="pass base_url too"):
        E5VEmbeddingFunction(str(tiny_path), api_key=KEY)
    with pytest.raises(ConfigurationError, match="http://host:port"):
        E5VEmbeddingFunction(base_url="localhost:8000")


def test_a_model_name_not_the_servers_is_refused_on_first_use(server: str, no_key_variable: None) -> None:
    function = E5VEmbeddingFunction("someone/other-model", base_url=server, api_key=KEY)
    assert function.get_config()["model_name"] == "someone/other-model"  # no request yet
    with pytest.raises(ConfigurationError, match=r"serves .* not 'someone/other-model'"):
        function(["a cat"])


def test_a_refused_key_names_the_variable_to_set(server: str, model: str, no_key_variable: None) -> None:
    config = E5VEmbeddingFunction(model, base_url=server, api_key_env_var="MY_E5V_KEY").get_config()
    function = E5VEmbeddingFunction.build_from_config(config)
    with pytest.raises(ConfigurationError, match=r"needs an API key and none was sent; set \$MY_E5V_KEY"):
        function(["a cat"])


def test_building_from_a_config_makes_no_request() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    config = {"model_name": "m", "batch_size": 8, "prompts": "e5v", "base_url": dead, "api_key_env_var": "K"}
    rebuilt = E5VEmbeddingFunction.build_from_config(config)
    assert rebuilt.get_config() == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"revision": "main"}, "cannot hold revision"),
        ({"dtype": "float32"}, "cannot hold dtype"),
        ({"prompts": {"text": "<sent>"}}, "custom prompts"),
        ({"base_url": 8000}, "base_url must be a string"),
        ({"api_key": KEY}, "unknown e5v config keys"),
    ],
)
def test_validate_config_refuses(remote: E5VEmbeddingFunction, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        E5VEmbeddingFunction.validate_config({**remote.get_config(), **change})


def test_a_variable_without_a_server_is_refused(tiny_path: Path) -> None:
    config = {**E5VEmbeddingFunction(str(tiny_path)).get_config(), "api_key_env_var": "E5V_API_KEY"}
    with pytest.raises(ValueError, match="needs base_url"):
        E5VEmbeddingFunction.validate_config(config)


def test_config_update_keeps_the_model_and_prompts(remote: E5VEmbeddingFunction, model: str) -> None:
    old = remote.get_config()
    remote.validate_config_update(old, {**old, "base_url": "http://elsewhere:8000", "api_key_env_var": "OTHER"})
    remote.validate_config_update(old, E5VEmbeddingFunction(model).get_config())  # the same model, in-process
    moved = {**old, "model_name": "/elsewhere/tiny", "model_id": model_identity(model)}
    remote.validate_config_update({**old, "model_id": model_identity(model)}, moved)  # the same model, moved
    bare = {key: value for key, value in old.items() if key != "model_id"}  # a binding from before identities
    for key, value in [("model_name", "other/model"), ("prompts", "cirr")]:
        with pytest.raises(ValueError, match=f"cannot change the e5v {key}"):
            remote.validate_config_update(bare, {**bare, key: value})
    with pytest.raises(ValueError, match="cannot change the e5v model_id"):
        remote.validate_config_update(moved, {**moved, "model_id": "other/model"})
    with pytest.raises(ValueError, match="cannot change the e5v revision"):
        remote.validate_config_update(E5VEmbeddingFunction(model, revision="abc").get_config(), old)


# -- a persistent collection ----------------------------------------------------------


def test_a_collection_embeds_through_the_server_and_reopens_in_a_new_process(
    remote: E5VEmbeddingFunction,
    server: str,
    model: str,
    embedder: E5VEmbedder,
    photos: dict[str, Image.Image],
    tmp_path: Path,
) -> None:
    db = tmp_path / "db"
    collection = chromadb.PersistentClient(path=str(db)).create_collection("remote", embedding_function=remote)
    arrays = [np.asarray(photos[name]) for name in IMAGES]
    collection.add(ids=IMAGES, images=arrays)  # Chroma passes images as numpy arrays
    collection.add(ids=["doc-cat", "doc-rocket"], documents=TEXTS)

    ids = [*IMAGES, "doc-cat", "doc-rocket"]
    stored = collection.get(ids=ids, include=["embeddings"])["embeddings"]
    expected = np.concatenate([embedder.embed_images(arrays), embedder.embed_texts(TEXTS)])
    close(stored, expected)

    by_text = collection.query(query_texts=[QUERY], n_results=len(ids))
    assert by_text["ids"][0] == ranked(embedder.embed_texts([QUERY])[0], ids, expected)
    by_image = collection.query(query_images=arrays[:2], n_results=1)
    assert by_image["ids"] == [["cat"], ["astronaut"]]  # each image finds itself first

    persisted = collection.configuration_json["embedding_function"]
    assert persisted["name"] == "e5v"
    assert persisted["config"] == {
        "model_name": model,
        "model_id": model_identity(model),  # the server's model, as its /info says
        "batch_size": "auto",
        "prompts": "e5v",
        "base_url": server,
        "api_key_env_var": "E5V_API_KEY",
    }
    assert KEY not in json.dumps(collection.configuration_json)
    for path in db.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path

    script = textwrap.dedent(
        """
        import json, sys
        import chromadb
        import chromadb_e5v
        import e5v.model.loading

        collection = chromadb.PersistentClient(path=sys.argv[1]).get_collection("remote")
        found = collection.query(query_texts=[sys.argv[2]], n_results=int(sys.argv[3]))
        collection.add(ids=["new"], documents=[sys.argv[2]])
        print(json.dumps({
            "ids": found["ids"][0],
            "distances": found["distances"][0],
            "new": list(map(float, collection.get(ids=["new"], include=["embeddings"])["embeddings"][0])),
            "function": repr(collection.configuration["embedding_function"]),
            "models": len(e5v.model.loading._CACHE),
        }))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(db), QUERY, str(len(ids))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "E5V_API_KEY": KEY, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["ids"] == by_text["ids"][0]
    np.testing.assert_allclose(report["distances"], by_text["distances"][0], atol=TOLERANCE)
    close([report["new"]], embedder.embed_texts([QUERY]))
    assert report["function"] == f"E5VEmbeddingFunction(base_url={server!r}, batch_size='auto')"
    assert report["models"] == 0  # the server embedded: no model was loaded in that process
