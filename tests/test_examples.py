"""Every script in ``examples/`` runs as its docstring says, offline on a tiny checkpoint:
in-process (``--model``) and through a real ``e5v serve`` subprocess (``--base-url``),
over ``examples/data``, and leaves no temporary database behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import KEY, start_server, stop

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
#: a ranked result line, with its score (if any) left out: "  1. image chelsea.png  (cosine ...)", "  2. 0.9  cats.md"
RESULT = re.compile(r"^\s*(\d+)\.\s+(?:\d\.\d+\s+)?(.+?)(?:\s+\(cosine distance [\d.]+\))?$")


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    try:
        yield url
    finally:
        stop(process)


def run_example(script: Path, arguments: list[str], where: Path) -> list[str]:
    """Run ``script`` in ``where`` with its own temporary folder, offline and with an empty Hugging Face
    cache; check it succeeded and left nothing behind; return its stdout's lines."""
    where.mkdir()
    scratch = where / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(where / "hf-home"),  # nothing cached: without --model only a server can embed
        "TMPDIR": str(scratch),
        "E5V_API_KEY": KEY,
    }
    result = subprocess.run(
        [sys.executable, str(script), *arguments], cwd=where, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    left = sorted(path.name for path in scratch.iterdir() if not path.name.startswith("torchinductor_"))
    assert left == [], f"{script.name} left {left} in its temporary folder"
    assert sorted(path.name for path in where.iterdir()) == ["tmp"], f"{script.name} wrote into its working folder"
    return result.stdout.splitlines()


def results(lines: list[str]) -> list[str]:
    """The ranked lines, without their scores: what a model and the same model behind a server agree on."""
    return [" ".join(match.groups()) for line in lines if (match := RESULT.match(line))]


def test_every_example_is_tested() -> None:
    names = [script.name for script in SCRIPTS]
    assert names == ["chroma_collection.py", "langchain_rag.py", "llamaindex_multimodal.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.stem)
def test_example_runs_in_process_and_through_a_server(script: Path, tiny_path: Path, server: str, tmp_path) -> None:
    text = script.read_text(encoding="utf-8")
    docstring = text.split('"""')[1]
    assert "Needs " in docstring and "pip install " in docstring and "--base-url" in docstring
    assert "skimage" not in text and "examples/data" in docstring

    local = run_example(script, ["--model", str(tiny_path)], tmp_path / "local")
    remote = run_example(script, ["--base-url", server], tmp_path / "remote")

    ranked = results(local)
    assert len(ranked) >= 12, local
    assert results(remote) == ranked  # the served model is the same one: the same rankings
    photo_query = next(i for i, line in enumerate(local) if re.search(r"(?i)image.*: chelsea\.png$", line))
    assert "chelsea.png" in local[photo_query + 1]  # a photo finds itself first
    named = {line.split()[-1] for line in ranked}
    assert {"chelsea.png", "rocket.jpg", "cats.md"} & named  # examples/data's files, by name


def test_remote_mode_takes_no_loading_options(server: str) -> None:
    for script in SCRIPTS:
        result = subprocess.run(
            [sys.executable, str(script), "--base-url", server, "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert result.stderr.splitlines()[-1] == (
            f"{script.name}: error: --base-url embeds with the server's model: drop --model, --device and --dtype"
        )
