"""Collections as a user lives with them: bound to the model's identity (a relative or an
absolute path, a moved copy and a server under another name are one model; another
checkpoint is refused in one line), listed, inspected, deleted and rebound with
``e5v collections``, and a wrong ``--collection`` answered with the ones there are.

Runs go through ``e5v.cli.main`` in-process, except those a terminal or a server needs
(subprocesses, each on a database no in-process client has opened: an in-process Chroma
client keeps its index in memory).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from serving import KEY, start_server, stop

from e5v.cli import main
from e5v.model.identity import model_identity
from e5v.testing import build_tiny_checkpoint

pytest.importorskip("chromadb")


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def e5v(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``e5v ARGS`` in a subprocess, its stdin not a terminal (/dev/null)."""
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env=environment(), stdin=subprocess.DEVNULL, timeout=300
    )


@pytest.fixture
def files(tmp_path: Path, photos) -> Path:
    folder = tmp_path / "files"
    folder.mkdir()
    photos["cat"].save(folder / "cat.png")
    photos["rocket"].save(folder / "rocket.png")
    (folder / "notes.txt").write_text("Espresso is brewed under pressure.\n\nHorses graze in the field.\n")
    return folder


@pytest.fixture
def model(tmp_path: Path, tiny_path: Path) -> Path:
    """A copy of the tiny checkpoint of this test's own (it may be moved)."""
    return Path(shutil.copytree(tiny_path, tmp_path / "tiny-e5v"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another checkpoint of the same architecture: other weights."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("other") / "other-e5v", seed=1)


def search(capsys, db: Path, *options: str | Path, query: str = "a cat") -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["search", query, "--db", str(db), "-k", "2", "--json", *map(str, options)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def info(capsys, db: Path, name: str = "e5v") -> dict:
    capsys.readouterr()
    assert main(["collections", "info", name, "--db", str(db), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_relative_an_absolute_path_and_a_moved_copy_are_one_model(
    tmp_path: Path, files: Path, model: Path, other: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "db"
    assert main(["index", str(files), "--db", str(db), "--model", "tiny-e5v", "-q"]) == 0
    bound = info(capsys, db)
    assert bound["model"] == str(model.resolve()) and bound["model_id"] == model_identity(model)
    assert bound["model_id"].startswith("sha256:")

    status, out, _ = search(capsys, db, "--model", model.resolve())
    assert status == 0 and json.loads(out)

    moved = tmp_path / "models" / "e5v-moved"
    moved.parent.mkdir()
    shutil.move(model, moved)
    status, _, err = search(capsys, db)
    assert status == 2 and err.count("\n") == 1 and "which is gone" in err and "--model" in err
    status, out, _ = search(capsys, db, "--model", "models/e5v-moved")
    assert status == 0 and json.loads(out)
    assert info(capsys, db)["model"] == str(moved.resolve())  # the binding followed the folder
    status, out, _ = search(capsys, db)
    assert status == 0 and json.loads(out)

    copy = Path(shutil.copytree(moved, tmp_path / "copy"))
    capsys.readouterr()
    assert main(["index", str(files), "--db", str(db), "--model", str(copy), "-q"]) == 0
    assert "skipped 3 unchanged" in capsys.readouterr().out

    status, out, err = search(capsys, db, "--model", other)
    assert status == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("e5v search: error: collection 'e5v'")
    assert str(other) in line and "`e5v collections info e5v`" in line and "do not compare" in line


def test_a_server_under_another_name_serves_the_same_model(
    tmp_path: Path, files: Path, model: Path, other: Path, monkeypatch
) -> None:
    monkeypatch.setenv("E5V_API_KEY", KEY)
    db = tmp_path / "db"
    assert e5v("index", files / "cat.png", "--db", db, "--model", model, "-q").returncode == 0
    process, url = start_server(model, "--served-model-name", "house-e5v")
    try:
        assert httpx.get(f"{url}/info").json()["model_id"] == model_identity(model)
        done = e5v("index", files, "--db", db, "--server", url, "-q")
        assert done.returncode == 0, done.stderr
        found = e5v("search", "--image", files / "cat.png", "--db", db, "--server", url, "--json", "-k", "1")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)[0]["path"] == str(files / "cat.png")
        made = e5v("index", files, "--db", db, "--collection", "served", "--server", url, "-q")
        assert made.returncode == 0, made.stderr
    finally:
        stop(process)
    shown = json.loads(e5v("collections", "info", "served", "--db", db, "--json").stdout)
    assert shown["model"] == "house-e5v" and shown["model_id"] == model_identity(model)
    assert e5v("search", "a cat", "--db", db, "--collection", "served", "--model", model).returncode == 0
    refused = e5v("search", "a cat", "--db", db, "--collection", "served", "--model", other)
    assert refused.returncode == 2 and "`e5v collections info served`" in refused.stderr


def test_list_info_and_a_wrong_name(tmp_path: Path, files: Path, model: Path, capsys) -> None:
    db = tmp_path / "db"
    assert main(["index", str(files), "--db", str(db), "--model", str(model), "-q"]) == 0
    assert (
        main(["index", str(files / "notes.txt"), "--db", str(db), "--collection", "notes", "--model", str(model), "-q"])
        == 0
    )
    capsys.readouterr()
    assert main(["collections", "--db", str(db)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "records", "model", "prompts", "size", "indexed"]
    assert [row.split()[0] for row in table[1:]] == ["e5v", "notes"]
    assert "image 2, text 1" in table[1] and "KiB" in table[1] and "e5v " in table[1]

    assert main(["collections", "--db", str(db), "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert listed["e5v"]["kinds"] == {"image": 2, "text": 1} and listed["e5v"]["files"] == 3
    assert listed["notes"]["records"] == 1 and listed["notes"]["model_id"] == model_identity(model)
    assert listed["e5v"]["prompts"] == "e5v" and listed["e5v"]["size_bytes"] > 0
    assert listed["e5v"]["indexed_at"].endswith("+00:00")

    assert main(["collections", "info", "e5v", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert f"identity  {model_identity(model)}" in shown and "3 records: image 2, text 1, from 3 files" in shown

    for argv in (["search", "x", "--collection", "photos"], ["collections", "info", "photos"]):
        assert main([*argv, "--db", str(db)]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert "no collection 'photos'" in line and "it holds 'e5v', 'notes'" in line and "--collection" in line
    served = e5v("serve", "--db", db, "--collection", "photos")
    assert served.returncode == 2 and "it holds 'e5v', 'notes'" in served.stderr


def test_delete_asks_on_a_terminal_and_needs_yes_otherwise(tmp_path: Path, files: Path, model: Path) -> None:
    db = tmp_path / "db"
    assert e5v("index", files, "--db", db, "--model", model, "-q").returncode == 0

    refused = e5v("collections", "delete", "e5v", "--db", db)  # stdin: /dev/null
    assert refused.returncode == 2 and "needs --yes" in refused.stderr
    for answer, status in ((b"n\n", 1), (b"y\n", 0)):
        leader, follower = pty.openpty()
        try:
            command = [sys.executable, "-m", "e5v", "collections", "delete", "e5v", "--db", str(db)]
            process = subprocess.Popen(
                command, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment()
            )
            os.write(leader, answer)
            out, err = process.communicate(timeout=300)
        finally:
            os.close(leader)
            os.close(follower)
        assert process.returncode == status, err
        assert b"delete collection 'e5v' (3 records: image 2, text 1)" in err
        listed = json.loads(e5v("collections", "--db", db, "--json").stdout)
        assert [entry["name"] for entry in listed] == ([] if status == 0 else ["e5v"])
    assert b"deleted collection 'e5v'" in out

    assert e5v("index", files, "--db", db, "--model", model, "-q").returncode == 0
    done = e5v("collections", "delete", "e5v", "--db", db, "--yes")
    assert done.returncode == 0 and "deleted collection 'e5v' (3 records" in done.stdout
    assert e5v("collections", "--db", db).stdout == f"no collections in {db}\n"


def test_rebind_checks_the_vectors_and_says_by_how_much(
    tmp_path: Path, files: Path, model: Path, other: Path, capsys
) -> None:
    db = tmp_path / "db"
    assert main(["index", str(files), "--db", str(db), "--model", str(model), "-q"]) == 0
    resaved = Path(shutil.copytree(model, tmp_path / "resaved"))
    config = json.loads((resaved / "config.json").read_text())
    (resaved / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "note": "re-saved"}))
    assert model_identity(resaved) != model_identity(model)  # its identity cannot follow it
    status, _, err = search(capsys, db, "--model", resaved)
    assert status == 2 and "`e5v collections info e5v`" in err

    capsys.readouterr()
    assert main(["collections", "rebind", "e5v", "--db", str(db), "--model", str(resaved)]) == 0
    said = capsys.readouterr().out
    assert f"bound to {resaved} ({model_identity(resaved)}): cosine distance up to 0 over 3 records" in said
    assert info(capsys, db)["model_id"] == model_identity(resaved)
    status, out, _ = search(capsys, db, "--model", resaved)
    assert status == 0 and json.loads(out)

    assert main(["collections", "rebind", "e5v", "--db", str(db), "--model", str(other), "--sample", "2"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "differ from those stored" in line and "over 2 records (tolerance 0.01)" in line and "--force" in line
    distance = float(line.split("cosine distance up to ")[1].split()[0])
    assert distance > 0.01
    assert info(capsys, db)["model_id"] == model_identity(resaved)  # nothing changed

    assert main(["collections", "rebind", "e5v", "--db", str(db), "--model", str(other), "--force"]) == 0
    assert "bound to" in capsys.readouterr().out
    assert info(capsys, db)["model_id"] == model_identity(other)


LEGACY = """\
import sys
import chromadb
from chromadb.utils.embedding_functions import register_embedding_function
from e5v import E5VEmbedder

@register_embedding_function
class Old:
    # the binding as e5v persisted it before model identities: the folder's absolute path
    def __init__(self, config=None): self.config = config
    def __call__(self, input): raise RuntimeError("vectors are passed")
    @staticmethod
    def name(): return "e5v"
    def get_config(self): return {"model_name": sys.argv[2], "revision": None, "dtype": None,
                                  "batch_size": "auto", "prompts": "e5v"}
    @staticmethod
    def build_from_config(config): return Old(config)
    @staticmethod
    def validate_config(config): pass
    def default_space(self): return "cosine"
    def supported_spaces(self): return ["cosine"]
    def is_legacy(self): return False

collection = chromadb.PersistentClient(path=sys.argv[1]).create_collection("e5v", embedding_function=Old())
vectors = E5VEmbedder(sys.argv[2]).embed_texts(["a cat on a mat", "a rocket"])
collection.add(ids=["a", "b"], embeddings=vectors, documents=["a cat on a mat", "a rocket"],
               metadatas=[{"path": "/notes/a.txt", "kind": "text", "sha256": "0", "passage": 0, "start": 0, "end": 14},
                          {"path": "/notes/b.txt", "kind": "text", "sha256": "1", "passage": 0, "start": 0, "end": 8}])
"""


def test_a_collection_with_the_old_binding_opens_and_gets_its_identity(tmp_path: Path, model: Path, capsys) -> None:
    db = tmp_path / "db"
    made = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LEGACY), str(db), str(model.resolve())],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    import chromadb

    persisted = chromadb.PersistentClient(path=str(db)).get_collection("e5v").configuration_json
    assert "model_id" not in persisted["embedding_function"]["config"]
    shown = info(capsys, db)
    assert shown["model"] == str(model.resolve()) and shown["indexed_at"] is None
    assert shown["model_id"] == model_identity(model)  # its folder is still there: fingerprinted

    status, out, _ = search(capsys, db, query="a cat on a mat")
    assert status == 0 and json.loads(out)[0]["text"] == "a cat on a mat"
    config = chromadb.PersistentClient(path=str(db)).get_collection("e5v").configuration_json
    assert config["embedding_function"]["config"]["model_id"] == model_identity(model)  # recorded on use
    moved = Path(shutil.move(model, tmp_path / "moved"))
    status, out, _ = search(capsys, db, "--model", moved, query="a cat on a mat")
    assert status == 0 and json.loads(out)[0]["text"] == "a cat on a mat"


def test_collections_on_a_chroma_server(tmp_path: Path, files: Path, model: Path) -> None:
    """``--chroma-url``: listed (no size on disk), inspected and deleted on a real ``chroma run``."""
    from serving import free_port

    chroma = Path(sys.executable).parent / "chroma"
    port = free_port()
    log = (tmp_path / "chroma.log").open("wb")
    server = subprocess.Popen(
        [str(chroma), "run", "--path", str(tmp_path / "chroma"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**environment(), "ANONYMIZED_TELEMETRY": "False"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # 60 s
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, (tmp_path / "chroma.log").read_text()
            time.sleep(0.25)
        done = e5v("index", files, "--chroma-url", url, "--collection", "remote", "--model", model, "-q")
        assert done.returncode == 0, done.stderr
        (listed,) = json.loads(e5v("collections", "--chroma-url", url, "--json").stdout)
        assert listed["name"] == "remote" and listed["kinds"] == {"image": 2, "text": 1}
        assert listed["size_bytes"] is None and listed["model_id"] == model_identity(model)
        wrong = e5v("collections", "info", "nope", "--chroma-url", url)
        assert wrong.returncode == 2 and "it holds 'remote'" in wrong.stderr
        assert e5v("collections", "delete", "remote", "--chroma-url", url, "--yes").returncode == 0
        assert e5v("collections", "--chroma-url", url).stdout == f"no collections in {url}\n"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
