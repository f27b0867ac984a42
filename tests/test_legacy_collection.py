"""A collection made by the code before the move to e5v.collection (commit 7d84234) opens,
searches and re-indexes (unchanged files skipped) with today's code.

``fixtures/legacy-collection.tar.gz`` holds what the old ``e5v index`` wrote (its Chroma
database, with ``--pdf-records image,text,interleaved``), the files it indexed and the old
``e5v search --json "a horse in a field" -k 20``. Its records name the files and the tiny
checkpoint by absolute paths under :data:`ROOT`, so the test unpacks them there, and builds
the same checkpoint (``build_tiny_checkpoint`` is deterministic for a preset and seed).
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from filelock import FileLock

from e5v.testing import build_tiny_checkpoint

pytest.importorskip("chromadb")
pytest.importorskip("pypdfium2")

ARCHIVE = Path(__file__).parent / "fixtures" / "legacy-collection.tar.gz"
ROOT = Path("/tmp/e5v-legacy-collection")
QUERY = "a horse in a field"


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """The old database, copied to ``tmp_path``; its files and checkpoint at :data:`ROOT`."""
    with FileLock(str(ROOT) + ".lock", timeout=300):
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(tmp_path / "unpacked", filter="data")
        data = ROOT / "data"
        if data.exists():
            shutil.rmtree(data)
        ROOT.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp_path / "unpacked" / "data", data)
        if not (ROOT / "tiny-e5v" / "config.json").exists():
            build_tiny_checkpoint(ROOT / "tiny-e5v")
    return tmp_path / "unpacked"


def test_a_collection_made_before_the_move_opens_searches_and_reindexes(legacy: Path) -> None:
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store

    store = Store(legacy / "db")
    assert store.binding is not None and store.binding.model == str(ROOT / "tiny-e5v")
    assert store.binding.to_config()["prompts"] == "e5v"
    embedder = store.connect()
    found = store.query(embedder.embed_texts([QUERY])[0], k=20)
    expected = json.loads((legacy / "search.json").read_text())
    got = [hit.to_dict() for hit in found]
    assert [hit.pop("score") for hit in got] == pytest.approx([hit.pop("score") for hit in expected], abs=1e-4)
    assert got == expected
    assert {hit.kind for hit in found} == {"image", "text", "interleaved"}

    count = store.count()
    summary = index_files(store, [ROOT / "data"], store.connect, progress=False, pdf_records="image,text,interleaved")
    assert (summary.indexed, summary.unchanged, summary.failed) == (0, 4, [])
    assert store.count() == count


def test_plain_chroma_reads_a_collection_the_new_store_made(tmp_path: Path, tiny_path: Path, photos) -> None:
    """The binding the store persists is what chromadb_e5v's function builds from."""
    chromadb = pytest.importorskip("chromadb")
    chromadb_e5v = pytest.importorskip("chromadb_e5v")
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store

    folder = tmp_path / "files"
    folder.mkdir()
    photos["cat"].save(folder / "cat.png")
    store = Store(tmp_path / "db", "pictures", create=True)
    index_files(store, [folder], lambda: store.connect(str(tiny_path), batch_size=4), progress=False)
    collection = chromadb.PersistentClient(path=str(tmp_path / "db")).get_collection("pictures")
    persisted = collection.configuration_json["embedding_function"]
    assert persisted["name"] == "e5v" and persisted["config"] == store.binding.to_config()
    function = chromadb_e5v.E5VEmbeddingFunction.build_from_config(persisted["config"])
    assert function.get_config() == persisted["config"]
    collection = chromadb.PersistentClient(path=str(tmp_path / "db")).get_collection(
        "pictures", embedding_function=function
    )
    assert collection.query(query_texts=["a cat"], n_results=1)["ids"][0] == [
        hit.id for hit in store.query(store.connect().embed_texts(["a cat"])[0], k=1)
    ]
