"""langchain-e5v in remote mode: ``E5VEmbeddings(base_url=...)`` against a real ``e5v serve``."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from langchain_chroma import Chroma
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from serving import KEY, start_server, stop

from e5v import E5VEmbedder, Interleaved, InvalidInputError, RemoteEmbedder
from e5v.errors import ConfigurationError
from langchain_e5v import E5VEmbeddings

TEXTS = [
    "A cat sleeps on a warm sofa.",
    "A red rocket stands on the launch pad.",
    "A cup of coffee on a wooden table.",
    "The astronaut floats above the earth.",
]
IMAGE_NAMES = ["cat", "astronaut", "coffee", "rocket", "camera", "text", "logo"]


@pytest.fixture(scope="module")
def server_url(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def remote(server_url: str) -> E5VEmbeddings:
    return E5VEmbeddings(base_url=server_url, api_key=KEY, batch_size=3)


@pytest.fixture(scope="module")
def image_paths(photo_dir: Path) -> list[str]:
    return [str(photo_dir / f"{name}.png") for name in IMAGE_NAMES]


# -- construction -----------------------------------------------------------------------


def test_remote_mode_describes_the_server(remote: E5VEmbeddings, embedder: E5VEmbedder, server_url: str) -> None:
    assert isinstance(remote.embedder, RemoteEmbedder)
    assert remote.embedder.base_url == remote.base_url == server_url
    assert remote.model_name == embedder.model_name
    assert remote.dimension == embedder.dimension == 64
    assert (remote.device, remote.dtype, remote.revision) == (None, None, None)


def test_the_key_stays_out_of_repr_and_serialisation(remote: E5VEmbeddings) -> None:
    assert remote.api_key is not None and remote.api_key.get_secret_value() == KEY
    for shown in (repr(remote), str(remote), remote.model_dump_json(), str(remote.model_dump(mode="json"))):
        assert KEY not in shown
    assert remote.model_dump(mode="json")["api_key"] == "**********"


def test_the_key_is_read_from_the_named_variable(
    server_url: str, embedder: E5VEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_E5V_KEY", KEY)
    adapter = E5VEmbeddings(base_url=server_url, api_key_env_var="MY_E5V_KEY")
    assert adapter.api_key is None
    np.testing.assert_allclose(adapter.embed_query(TEXTS[0]), embedder.embed_texts(TEXTS[:1])[0], atol=1e-5)


def test_a_wrong_or_missing_key_is_refused_clearly(server_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=f"the e5v server at {server_url}/v1/embeddings refused the API key"):
        E5VEmbeddings(base_url=server_url, api_key="wrong-key").embed_documents(TEXTS)
    monkeypatch.delenv("E5V_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="needs an API key and none was sent; set \\$E5V_API_KEY"):
        E5VEmbeddings(base_url=server_url).embed_query(TEXTS[0])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"model_name": "royokong/e5-v"}, "['model_name']"),
        ({"model": "royokong/e5-v", "device": "cuda"}, "['device', 'model']"),
        ({"dtype": "bfloat16", "revision": "main", "cache_dir": "/tmp"}, "['cache_dir', 'dtype', 'revision']"),
        ({"model_kwargs": {"attn_implementation": "sdpa"}}, "['model_kwargs']"),
    ],
)
def test_base_url_with_loading_options_is_refused(server_url: str, options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match="base_url= and loading options " + re.escape(named)):
        E5VEmbeddings(base_url=server_url, api_key=KEY, **options)


def test_other_bad_remote_options_are_refused(server_url: str, embedder: E5VEmbedder) -> None:
    with pytest.raises(ValueError, match=r"embedder_kwargs \['device_map'\] do not apply with base_url"):
        E5VEmbeddings(base_url=server_url, embedder_kwargs={"device_map": "auto"})
    with pytest.raises(ValueError, match=r"got \['api_key'\] without base_url"):
        E5VEmbeddings(model_name="royokong/e5-v", api_key=KEY)
    with pytest.raises(ValueError, match=r"embedder= and loading options \['base_url'\]"):
        E5VEmbeddings(embedder=embedder, base_url=server_url)
    with pytest.raises(ConfigurationError, match="base_url must look like http://host:port"):
        E5VEmbeddings(base_url="localhost:8000")


def test_wraps_a_remote_embedder(server_url: str, embedder: E5VEmbedder) -> None:
    client = RemoteEmbedder(server_url, api_key=KEY)
    adapter = E5VEmbeddings(embedder=client)
    assert adapter.embedder is client
    assert (adapter.base_url, adapter.model_name, adapter.device) == (server_url, embedder.model_name, None)


def test_embedder_kwargs_reach_the_remote_embedder(server_url: str, embedder: E5VEmbedder) -> None:
    adapter = E5VEmbeddings(base_url=server_url, api_key=KEY, embedder_kwargs={"prompts": "e5v-sts", "retries": 0})
    assert (adapter.embedder.prompts, adapter.embedder.retries) == ("e5v-sts", 0)
    np.testing.assert_allclose(
        adapter.embed_documents(TEXTS[:2]), embedder.embed(TEXTS[:2], prompts="e5v-sts"), atol=1e-5
    )


def test_remote_mode_loads_no_torch(server_url: str) -> None:
    script = (
        "import sys\n"
        "from langchain_e5v import E5VEmbeddings\n"
        f"vector = E5VEmbeddings(base_url={server_url!r}).embed_query('a cat')\n"
        "assert len(vector) == 64 and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    env = {**os.environ, "E5V_API_KEY": KEY}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 0, completed.stderr


# -- vectors equal the in-process ones ----------------------------------------------------


def test_vectors_equal_in_process(
    remote: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str], photos: dict
) -> None:
    texts = remote.embed_documents(TEXTS)
    assert all(type(x) is float for row in texts for x in row)
    np.testing.assert_allclose(texts, embedder.embed_texts(TEXTS), atol=1e-5)
    np.testing.assert_allclose(remote.embed_query(TEXTS[1]), embedder.embed_texts([TEXTS[1]])[0], atol=1e-5)

    images = remote.embed_image(image_paths)  # 7 images in requests of 3
    np.testing.assert_allclose(images, embedder.embed_images(image_paths), atol=1e-5)
    np.testing.assert_allclose(remote.embed_image([photos["cat"]]), embedder.embed_images([photos["cat"]]), atol=1e-5)

    items = [[image_paths[0], "a cat on a sofa"], Interleaved(["two photos", image_paths[1], image_paths[2]])]
    np.testing.assert_allclose(remote.embed_interleaved(items), embedder.embed_interleaved(items), atol=1e-5)

    edits = ["make it red", "at night"]
    np.testing.assert_allclose(
        remote.embed_composed(image_paths[:2], edits), embedder.embed_composed(image_paths[:2], edits), atol=1e-5
    )
    assert remote.embed_documents([]) == []


def test_async_methods_equal_in_process(remote: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str]) -> None:
    async def gather() -> tuple[Any, ...]:
        return await asyncio.gather(
            remote.aembed_documents(TEXTS),
            remote.aembed_query(TEXTS[2]),
            remote.aembed_image(image_paths[:4]),
            remote.aembed_interleaved([[image_paths[3], "a launch"]]),
            remote.aembed_composed([image_paths[0]], ["as a drawing"]),
        )

    documents, query, images, interleaved, composed = asyncio.run(gather())
    np.testing.assert_allclose(documents, embedder.embed_texts(TEXTS), atol=1e-5)
    np.testing.assert_allclose(query, embedder.embed_texts([TEXTS[2]])[0], atol=1e-5)
    np.testing.assert_allclose(images, embedder.embed_images(image_paths[:4]), atol=1e-5)
    np.testing.assert_allclose(interleaved, embedder.embed_interleaved([[image_paths[3], "a launch"]]), atol=1e-5)
    np.testing.assert_allclose(composed, embedder.embed_composed([image_paths[0]], ["as a drawing"]), atol=1e-5)


class NoThreads(ThreadPoolExecutor):
    """An event loop's default executor that fails any work handed to a thread."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async method ran the call on an executor thread")


def test_async_texts_use_the_remote_embedders_async_calls(remote: E5VEmbeddings, embedder: E5VEmbedder) -> None:
    async def embed() -> tuple[Any, ...]:
        asyncio.get_running_loop().set_default_executor(NoThreads(max_workers=1))
        return await remote.aembed_documents(TEXTS), await remote.aembed_query(TEXTS[3])

    documents, query = asyncio.run(embed())
    np.testing.assert_allclose(documents, embedder.embed_texts(TEXTS), atol=1e-5)
    np.testing.assert_allclose(query, embedder.embed_texts([TEXTS[3]])[0], atol=1e-5)
    assert all(type(x) is float for x in query)


def test_async_errors_name_the_bad_item(remote: E5VEmbeddings, image_paths: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match=r"^item 4:"):
        asyncio.run(remote.aembed_image([*image_paths[:4], str(bad)]))  # in the second request of 3
    with pytest.raises(InvalidInputError, match=r"^item 3: .*reserved"):
        asyncio.run(remote.aembed_documents([*TEXTS[:3], "an <image> here"]))


def test_errors_name_the_bad_item(remote: E5VEmbeddings, image_paths: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidInputError, match=r"^item 4:"):
        remote.embed_image([*image_paths[:4], str(bad)])  # in the second request of 3
    with pytest.raises(InvalidInputError, match=r"^item 1: image file .*missing\.png.* cannot be read"):
        remote.embed_image([image_paths[0], str(tmp_path / "missing.png")])


# -- in langchain-chroma --------------------------------------------------------------------


def test_chroma_with_the_remote_adapter(
    remote: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str], photo_dir: Path, tmp_path: Path
) -> None:
    client = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=Settings(anonymized_telemetry=False))
    store = Chroma(collection_name="media", embedding_function=remote, client=client)
    text_ids = store.add_texts(TEXTS, metadatas=[{"name": f"text{i}"} for i in range(len(TEXTS))])
    image_ids = store.add_images(image_paths, metadatas=[{"name": name} for name in IMAGE_NAMES])

    stored = store.get(ids=[*text_ids, *image_ids], include=["embeddings"])
    by_id = dict(zip(stored["ids"], stored["embeddings"]))
    expected = np.vstack([embedder.embed_texts(TEXTS), embedder.embed_images(image_paths)])
    np.testing.assert_allclose([by_id[i] for i in [*text_ids, *image_ids]], expected, atol=1e-5)
    vector_of = dict(zip([f"text{i}" for i in range(len(TEXTS))] + IMAGE_NAMES, expected))

    def ranked(results: list, query: np.ndarray) -> list[str]:
        names = [doc.metadata["name"] for doc in results]
        sims = [float(vector_of[name] @ query) for name in names]
        assert np.all(np.diff(sims) <= 1e-5), sims
        return names

    query = embedder.embed_texts(["a rocket launch"])[0]
    names = ranked(store.similarity_search("a rocket launch", k=4), query)
    assert names[0] == max(vector_of, key=lambda name: float(vector_of[name] @ query))

    for name in ("cat", "coffee", "logo"):
        results = store.similarity_search_by_image(str(photo_dir / f"{name}.png"), k=3)
        assert ranked(results, vector_of[name])[0] == name


# -- LangChain's standard integration tests, in remote mode ----------------------------------


@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio'")
class TestE5VEmbeddingsRemoteIntegration(EmbeddingsIntegrationTests):
    url: str

    @pytest.fixture(autouse=True)
    def _use_the_server(self, server_url: str) -> None:
        type(self).url = server_url

    @property
    def embeddings_class(self) -> type[E5VEmbeddings]:
        return E5VEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"base_url": self.url, "api_key": KEY, "batch_size": 2}
