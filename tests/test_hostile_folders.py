"""``e5v index`` on folders built to break it: link loops, links out of the tree, names
that are not UTF-8 or hold a newline, FIFOs and devices, several runs racing on a new
database, a database that fails. Each run must finish, index every good file once,
report each bad entry by its own path, and exit 1 (bad entries) or 2 (store errors)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import chromadb
import pytest

from e5v.cli import main
from e5v.collection.files import stamp, walk
from e5v.collection.records import Unchanged, load_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def index(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, list[str], list[str]]:
    status = main(["index", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out.splitlines(), err.splitlines()


def stored_paths(db: Path) -> list[str]:
    got = chromadb.PersistentClient(path=str(db)).get_collection("e5v").get(include=["metadatas"])
    return sorted({metadata["path"] for metadata in got["metadatas"]})


def notes(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"A short note called {name}.", encoding="utf-8")
    return [folder / name for name in names]


def test_loops_fifos_devices_and_odd_names_are_skipped_and_the_rest_indexed(
    tmp_path: Path, tiny_path: Path, capsys
) -> None:
    folder = tmp_path / "uploads"
    good = notes(folder, *(f"note{number:02d}.txt" for number in range(12)))
    (folder / "a.txt").symlink_to("b.txt")
    (folder / "b.txt").symlink_to("a.txt")  # a loop
    (folder / "gone.md").symlink_to("nowhere.md")  # broken
    os.mkfifo(folder / "y.txt")  # opening it would block for ever
    (folder / "zero.txt").symlink_to("/dev/zero")  # a device outside the tree
    latin1 = os.path.join(os.fsencode(folder), "caf\xe9.txt".encode("latin-1"))
    with open(latin1, "wb") as handle:  # a name that is not UTF-8, in the same write group
        handle.write(b"Coffee notes.")
    newline = folder / "two\nlines.txt"
    newline.write_text("A note whose name has a line break.", encoding="utf-8")

    status, out, err = index(capsys, folder, "--db", tmp_path / "db", "--model", tiny_path, "--batch-size", "2")
    assert status == 1
    failed = dict(line.removeprefix("failed: ").split(": ", 1) for line in err)
    assert len(failed) == len(err) == 6, err  # one line each, no traceback
    assert "symlink loop" in failed[str(folder / "a.txt")] and "symlink loop" in failed[str(folder / "b.txt")]
    assert "broken link (to 'nowhere.md')" in failed[str(folder / "gone.md")]
    assert "a FIFO, not a regular file" in failed[str(folder / "y.txt")]
    assert "'/dev/zero', outside the folders being indexed" in failed[str(folder / "zero.txt")]
    assert "not valid UTF-8; rename it" in failed[f"{folder}/caf\\udce9.txt"]
    assert out == ["indexed 13 files (13 records), skipped 0 unchanged, failed 6, pruned 0"]
    assert stored_paths(tmp_path / "db") == sorted(map(str, [*good, newline]))

    hits = main(["search", "a note", "--db", str(tmp_path / "db"), "-k", "20"])
    table = capsys.readouterr().out.splitlines()
    assert hits == 0 and len(table) == 14  # the header and one line per record
    assert any(f"{folder}/two\\nlines.txt" in row for row in table)

    # the re-run: the good files unread and unchanged, the same six reported again
    status, out, err = index(capsys, folder, "--db", tmp_path / "db")
    assert (status, len(err)) == (1, 6)
    assert out == ["indexed 0 files (0 records), skipped 13 unchanged, failed 6, pruned 0"]


def test_a_device_is_never_read(tmp_path: Path, tiny_path: Path, capsys) -> None:
    """Followed on purpose (or named), a link to a character device is still refused."""
    folder = tmp_path / "docs"
    notes(folder, "ok.md")
    (folder / "zero.txt").symlink_to("/dev/zero")
    try:
        os.mknod(folder / "null.txt", 0o600 | 0o020000, os.makedev(1, 3))  # a device node, where allowed
        devices = ["null.txt", "zero.txt"]
    except PermissionError:
        devices = ["zero.txt"]
    db = tmp_path / "db"
    status, out, err = index(capsys, folder, "--follow-links", "--db", db, "--model", tiny_path)
    assert status == 1 and out[0].startswith("indexed 1 file ")
    assert sorted(err) == [
        f"failed: {folder / name}: a character device, not a regular file; e5v reads only regular files"
        for name in devices
    ]
    status, _, err = index(capsys, folder / "zero.txt", "--db", db)
    assert status == 1 and err == [
        f"failed: {folder / 'zero.txt'}: a character device, not a regular file; e5v reads only regular files"
    ]


def test_a_fifo_swapped_in_after_the_walk_is_not_opened_blocking(tmp_path: Path) -> None:
    path = tmp_path / "late.txt"
    os.mkfifo(path)
    done: list[object] = []
    reader = threading.Thread(target=lambda: done.append(load_file(path)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert done and "a FIFO, not a regular file" in done[0].reason  # type: ignore[union-attr]


def test_links_out_of_the_tree_are_not_followed_unless_asked(tmp_path: Path, tiny_path: Path, capsys) -> None:
    uploads, outside = tmp_path / "uploads", tmp_path / "outside"
    (kept,) = notes(uploads, "kept.txt")
    (secret,) = notes(outside, "secret.txt")
    (uploads / "innocent.txt").symlink_to(Path("..", "outside", "secret.txt"))
    (uploads / "again.txt").symlink_to("kept.txt")  # inside the tree: the file itself, once
    (uploads / "passwd.txt").symlink_to("/etc/passwd")
    db = tmp_path / "db"

    status, out, err = index(capsys, uploads, "--db", db, "--model", tiny_path)
    assert out[0].startswith("indexed 1 file (1 record)")
    assert status == 1
    assert [line.split(": ")[1] for line in err] == [str(uploads / "innocent.txt"), str(uploads / "passwd.txt")]
    assert all("outside the folders being indexed: not followed (pass --follow-links" in line for line in err)
    assert stored_paths(db) == [str(kept)]
    main(["search", "a short note called secret.txt", "--db", str(db), "--json"])
    assert str(secret) not in capsys.readouterr().out

    status, _, err = index(capsys, uploads, "--db", db, "--follow-links")
    assert (status, err) == (0, [])  # trusted now: indexed under the links' own names, by their suffix
    assert stored_paths(db) == sorted(map(str, [kept, uploads / "innocent.txt", uploads / "passwd.txt"]))

    # a named link is followed: the user asked for that file
    assert walk([uploads / "innocent.txt"]).files == [uploads / "innocent.txt"]


def test_an_unchanged_file_is_skipped_by_its_stamp_then_its_hash(tmp_path: Path, tiny_path: Path, capsys) -> None:
    from e5v.collection.repository import Store

    folder = tmp_path / "docs"
    (path,) = notes(folder, "long.txt")
    path.write_text("Paragraph.\n\n" * 400, encoding="utf-8")
    db = tmp_path / "db"
    assert index(capsys, folder, "--db", db, "--model", tiny_path, "--max-chars", "100")[0] == 0
    known = Store(db).stored()
    assert list(known) == [str(path)] and known[str(path)].stamp == stamp(path.stat())
    assert load_file(path, known=known) == Unchanged(str(path))  # decided before reading

    os.utime(path)  # touched: read and hashed, found equal, and its new stamp stored
    assert load_file(path, known=known) == Unchanged(str(path), stamp(path.stat()))
    status, out, _ = index(capsys, folder, "--db", db, "--max-chars", "100")
    assert status == 0 and out[0].startswith("indexed 0 files (0 records), skipped 1 unchanged")
    assert load_file(path, known=Store(db).stored()) == Unchanged(str(path))


RACER = """
import sys, time
from pathlib import Path
import e5v.cli.index, e5v.collection.repository, tqdm.auto  # imported, so that the runs meet at the database
from chromadb_e5v import E5VEmbeddingFunction
from e5v.cli import main

folder, db, model, ready, go = sys.argv[1:]
E5VEmbeddingFunction(model).embedder  # loaded, too
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
sys.exit(main(["index", folder, "--db", db, "--model", model]))
"""


def test_runs_racing_on_a_new_database_all_succeed(tmp_path: Path, tiny_path: Path) -> None:
    """Four ``e5v index`` runs, their models loaded, let go on a new --db at the same moment."""
    db, go = tmp_path / "db", tmp_path / "go"
    folders = [notes(tmp_path / f"folder{number}", f"note{number}.md")[0].parent for number in range(4)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(folder), str(db), str(tiny_path), str(tmp_path / f"ready{n}"), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n, folder in enumerate(folders)
    ]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{n}").exists() for n in range(4)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(run.wait(timeout=240), *run.communicate()) for run in runs]
    for status, out, err in results:
        assert (status, err) == (0, ""), err
        assert out.startswith("indexed 1 file (1 record)")
    assert stored_paths(db) == sorted(str(folder / f"note{n}.md") for n, folder in enumerate(folders))


def test_a_failing_database_is_one_line_and_exit_2(tmp_path: Path, tiny_path: Path, capsys) -> None:
    folder = tmp_path / "docs"
    notes(folder, "a.md")
    db = tmp_path / "db"
    db.mkdir()
    (db / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    status, out, err = index(capsys, folder, "--db", db, "--model", tiny_path)
    assert status == 2 and out == []
    assert len(err) == 1 and err[0].startswith(f"e5v index: error: the Chroma database {str(db)!r} failed while ")


def test_examples_copy_with_a_loop_still_indexes(tmp_path: Path, tiny_path: Path, capsys) -> None:
    """A realistic tree: the example corpus plus one loop and one FIFO deep inside."""
    corpus = tmp_path / "corpus"
    shutil.copytree(EXAMPLES, corpus)
    (corpus / "notes" / "loop.md").symlink_to("loop.md")
    os.mkfifo(corpus / "notes" / "pipe.txt")
    status, out, err = index(capsys, corpus, "--db", tmp_path / "db", "--model", tiny_path)
    assert status == 1 and len(err) == 2
    assert out[0].startswith("indexed 10 files")
