"""The README's main-job block, taken from README.md and run line by line as a user copies it:
in a fresh folder holding ``examples/data``, with this venv's ``e5v`` on PATH, offline, with a
tiny checkpoint in the Hugging Face cache as ``royokong/e5-v`` (the model it names). The
"Try it first" block below it is tested in test_first_hour.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5v import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
MAIN_JOB = "## The main job: index and search a folder"


def section(heading: str) -> str:
    """README.md from ``heading`` to the next heading of its level."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    level = heading.split()[0]
    end = text.find(f"\n{level} ", start + len(heading) + 2)
    return text[start : end if end > 0 else len(text)]


def first_bash_block(text: str) -> list[str]:
    """The command lines of the first fenced bash block in ``text`` (blank and comment lines left out)."""
    match = re.search(r"^```bash\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert match, "no ```bash block"
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A folder with ``examples/data`` in it, as a clone has, and nothing else."""
    folder = tmp_path / "clone"
    shutil.copytree(ROOT / "examples" / "data", folder / "examples" / "data")
    return folder


def user_env(tmp_path: Path) -> dict[str, str]:
    e5v = Path(sys.executable).parent / "e5v"
    assert e5v.is_file(), f"{e5v}: the venv has no e5v command"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "PATH": f"{e5v.parent}{os.pathsep}{env['PATH']}", "HF_HOME": str(tmp_path / "hf-home")}


def run_lines(lines: list[str], cwd: Path, env: dict[str, str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Each line in its own shell, in order; each must succeed without a traceback."""
    results = {}
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr, f"{line}\n{result.stderr}"
        results[line] = result
    return results


def test_the_main_job_block_runs_as_written(user_folder: Path, tiny_path: Path, tmp_path: Path) -> None:
    lines = first_bash_block(section(MAIN_JOB))
    assert lines[0].startswith("e5v index examples/data")
    env = {**user_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    commit = "0" * 40  # the tiny checkpoint as if downloaded as the default model
    cached = Path(env["HF_HOME"]) / "hub" / f"models--{DEFAULT_MODEL.replace('/', '--')}"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_path, cached / "snapshots" / commit)

    results = run_lines(lines, user_folder, env)

    assert results[lines[0]].stdout.startswith("indexed ")
    assert (user_folder / "e5v_db").is_dir()
    data = (user_folder / "examples" / "data").resolve()
    for line, result in results.items():
        if line.startswith("e5v search ") and "--json" in line:
            hits = json.loads(result.stdout)
            assert hits and all(Path(hit["path"]).resolve().is_relative_to(data) for hit in hits), line
        elif line.startswith("e5v search "):
            assert result.stdout.splitlines()[0].split()[:3] == ["rank", "score", "kind"], line
        outputs = re.findall(r"--output (\S+\.npy)", line)
        if outputs:
            assert np.load(user_folder / outputs[0]).shape[0] == 2, line
