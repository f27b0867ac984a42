"""The command line on the second day: typos answered with the closest command, choice or
flag, usage errors that name their command, counts in words, missing paths refused with
exit status 2 before anything loads, and ``e5v eval`` saying what it wrote where. The real
CLI, in this process (``main``) or as ``python -m e5v`` where the process's status matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5v.cli import main


@pytest.fixture()
def own_data(tmp_path: Path) -> Path:
    """Two text queries over a corpus of three texts, in BEIR's layout."""
    root = tmp_path / "own"
    root.mkdir()
    corpus = [{"id": "d1", "text": "espresso"}, {"id": "d2", "text": "a cat"}, {"id": "d3", "text": "a rocket"}]
    queries = [{"id": "q1", "text": "coffee"}, {"id": "q2", "text": "a kitten"}]
    for name, rows in (("corpus", corpus), ("queries", queries)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "qrels.tsv").write_text("q1\td1\t1\nq2\td2\t1\n", encoding="utf-8")
    return root


def own_args(root: Path, model: str | Path) -> list[str]:
    files = ["--queries", root / "queries.jsonl", "--corpus", root / "corpus.jsonl", "--qrels", root / "qrels.tsv"]
    return ["eval", "retrieval", *map(str, files), "--model", str(model)]


def e5v(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a usage error prints; the status must be 2."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


# -- typos ------------------------------------------------------------------------------


def test_a_mistyped_command_gets_the_closest_one_and_status_2() -> None:
    done = e5v("serch", "a cat")
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("e5v: error: argument COMMAND: invalid choice: 'serch'; did you mean 'search'? (choose")
    assert line.endswith("(see `e5v --help`)")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["search", "a cat", "--colection", "x"],
            "e5v search: error: unrecognized arguments: --colection x; did you mean --collection?",
        ),
        (
            ["index", "x", "--pdf-recrods", "text"],
            "e5v index: error: unrecognized arguments: --pdf-recrods text; did you mean --pdf-records?",
        ),
        (
            ["embed", "x", "--outptu=v.npy"],
            "e5v embed: error: unrecognized arguments: --outptu=v.npy; did you mean --output?",
        ),
        (["--verbsoe", "index", "x"], "e5v index: error: unrecognized arguments: --verbsoe; did you mean --verbose?"),
        (
            ["search", "x", "--jsn", "--colection", "y"],
            "did you mean --json (for --jsn), --collection (for --colection)?",
        ),
        (
            ["search", "x", "--kind", "imag"],
            "e5v search: error: argument --kind: invalid choice: 'imag'; did you mean 'image'? (choose from",
        ),
        (
            ["embed", "x", "--kind", "txt"],
            "e5v embed: error: argument --kind: invalid choice: 'txt'; did you mean 'text'?",
        ),
    ],
)
def test_a_mistyped_flag_or_choice_gets_the_closest_one_from_its_command(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(argv, capsys)


def test_nothing_close_is_suggested_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["search", "x", "--zzzzzz"], capsys)
    assert err == "e5v search: error: unrecognized arguments: --zzzzzz (see `e5v search --help`)\n"


# -- counts in words ----------------------------------------------------------------------


def test_one_file_and_one_embedding_are_said_in_the_singular(
    tmp_path: Path, photo_dir: Path, tiny_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "cat.png").write_bytes((photo_dir / "cat.png").read_bytes())
    assert main(["index", str(folder), "--db", str(tmp_path / "db"), "--model", str(tiny_path), "-q"]) == 0
    assert capsys.readouterr().out == "indexed 1 file (1 record), skipped 0 unchanged, failed 0, pruned 0\n"

    out = tmp_path / "v.npy"
    assert main(["embed", "a photo of a cat", "--model", str(tiny_path), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err.startswith(f"wrote 1 embedding of dimension {np.load(out).shape[1]} to {out}")
    assert main(["embed", "a", "b", "--model", str(tiny_path), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err.startswith("wrote 2 embeddings of dimension")


# -- a path that does not exist -------------------------------------------------------------


def test_index_refuses_a_missing_path_with_status_2_and_creates_nothing(tmp_path: Path, photo_dir: Path) -> None:
    db = tmp_path / "db"
    done = e5v("index", photo_dir, tmp_path / "no-such-folder", "--db", db, "--model", "never-loaded")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"e5v index: error: PATH {str(tmp_path / 'no-such-folder')!r} does not exist (from {os.getcwd()!r}); check "
        "the path\n"
    )
    assert not db.exists()  # refused before the database (or the model) was touched


def test_embed_refuses_a_missing_image_and_output_folder_before_loading(tmp_path: Path, photo_dir: Path) -> None:
    missing = tmp_path / "missing.png"
    done = e5v("embed", photo_dir / "cat.png", missing, "--kind", "image", "--model", "never-loaded")
    assert (done.returncode, done.stdout) == (2, "")
    assert (
        done.stderr
        == f"e5v embed: error: INPUT 2 ({str(missing)!r}): there is no such file (from {os.getcwd()!r}); check "
        "the path\n"
    )

    output = tmp_path / "no-such-folder" / "v.npy"
    done = e5v("embed", "a cat", "--model", "never-loaded", "-o", output)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"e5v embed: error: --output {str(output)!r}: its folder") and "does not exist" in (
        done.stderr
    )


@pytest.mark.parametrize("flag", ["--queries", "--corpus", "--qrels"])
def test_eval_refuses_a_missing_data_file_by_its_flag(
    own_data: Path,
    tmp_path: Path,
    flag: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = own_args(own_data, "never-loaded")
    missing = str(tmp_path / "missing.jsonl")
    args[args.index(flag) + 1] = missing
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"e5v eval: error: {flag} {missing!r} does not exist (from {os.getcwd()!r}); check the path\n"
    )
    assert main([*own_args(own_data, "never-loaded"), "--output", str(tmp_path / "nope" / "r.json")]) == 2
    assert "its folder" in capsys.readouterr().err


# -- e5v eval says where -------------------------------------------------------------------


def test_eval_says_where_it_wrote_the_report_and_the_cache(
    own_data: Path,
    tiny_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache, output = tmp_path / "cache", tmp_path / "report.json"
    assert main([*own_args(own_data, tiny_path), "--cache", str(cache), "--output", str(output), "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"wrote the report to {output.resolve()}" in err and output.is_file()
    assert err[-1] == (
        f"embedding cache: {cache.resolve()} (a rerun embeds nothing twice; --no-cache to store nothing)"
    )
    assert cache.is_dir() and any(cache.iterdir())
