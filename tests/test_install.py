"""An integration installs on its own from this checkout, with the core, by the README's one command.

None of the packages is on PyPI, so ``pip install ./integrations/chroma`` alone cannot find
``e5v>=0.1``; naming the core's directory in the same command lets pip resolve it. The test
runs exactly that command in a brand-new virtualenv of the base interpreter (nothing of the
dev venv is visible in it), then embeds a document and an image through ``chromadb-e5v``
into a real persistent Chroma collection and queries it, offline, on a tiny random
checkpoint; then the optional features this venv lacks must each say how to install them.
It takes about 3 minutes on 2 cores (the install: resolving and unpacking
torch, transformers and chromadb from the local mirrors; pip's cache does not shorten it
because the wheels are local files and the checkout is rebuilt every time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The command of README.md ("Install (development)") and integrations/chroma/README.md, run from the repo root.
INSTALL = "pip install torch==2.13.0 . ./integrations/chroma"
VENV_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 1800  # about 150 s here; a hang must fail, not stall CI
RUN_TIMEOUT_S = 600  # about 10 s here

PROBE = """
import importlib.util, json, sys
names = ["pytest", "e5v", "chromadb", "chromadb_e5v", "torch", "transformers"]
print(json.dumps({"prefix": sys.prefix, "path": sys.path,
                  "found": [n for n in names if importlib.util.find_spec(n) is not None]}))
"""

CHROMA_CHECK = """
import json, sys
from pathlib import Path

import chromadb
import numpy as np

import chromadb_e5v
import e5v
from e5v.testing import build_tiny_checkpoint

root = Path(sys.argv[1])
path = build_tiny_checkpoint(root / "tiny")
ef = chromadb_e5v.E5VEmbeddingFunction(path, device="cpu")
client = chromadb.PersistentClient(path=str(root / "db"), settings=chromadb.Settings(anonymized_telemetry=False))
collection = client.get_or_create_collection("media", embedding_function=ef)
image = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)
collection.add(ids=["doc"], documents=["A cat sleeps on a warm sofa."])
collection.add(ids=["img"], images=[image])
by_text = collection.query(query_texts=["A cat sleeps on a warm sofa."], n_results=2, include=["distances"])
by_image = collection.query(query_images=[image], n_results=2, include=["distances", "embeddings"])
print(json.dumps({
    "files": [e5v.__file__, chromadb_e5v.__file__],
    "count": collection.count(),
    "by_text": by_text["ids"][0],
    "by_image": by_image["ids"][0],
    "distances": by_text["distances"][0] + by_image["distances"][0],
    "dim": len(by_image["embeddings"][0][0]),
}))
"""


def fresh_env(venv: Path) -> dict[str, str]:
    """This process's environment (pip's mirror settings included) as an activated ``venv`` sees it."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}}
    dev_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    return env


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output[-6000:]}"
    return done.stdout


def run_json(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int) -> dict:
    """The JSON object that a script prints on the last line of its stdout."""
    return json.loads(run(args, cwd=cwd, env=env, timeout=timeout).splitlines()[-1])


def build_artefacts() -> set[Path]:
    """``build/``, ``dist/`` and ``*.egg-info`` in the directories that the install builds from."""
    chroma = REPO / "integrations" / "chroma"
    return {
        p
        for root in (REPO, REPO / "src", chroma, chroma / "src")
        for p in root.iterdir()
        if p.name in {"build", "dist"} or p.name.endswith(".egg-info")
    }


def test_readme_install_command_is_the_one_tested() -> None:
    for readme in (REPO / "README.md", REPO / "integrations" / "chroma" / "README.md"):
        assert INSTALL in readme.read_text(encoding="utf-8"), f"{readme} no longer says `{INSTALL}`"


def test_chroma_integration_installs_with_the_core_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # sys.executable is the dev venv's python: `-m venv` from a venv makes a venv of the base interpreter.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=VENV_TIMEOUT_S)
    python = str(venv / "bin" / "python")
    env = fresh_env(venv)

    probe = run_json([python, "-c", PROBE], cwd=tmp_path, env=env, timeout=VENV_TIMEOUT_S)
    assert Path(probe["prefix"]) == venv
    assert probe["found"] == [], f"the fresh venv sees the dev venv's packages: {probe['found']}"
    assert not [p for p in probe["path"] if p.startswith(sys.prefix)], probe["path"]

    before = build_artefacts()
    pip, *args = INSTALL.split()
    run([str(venv / "bin" / pip), *args], cwd=REPO, env=env, timeout=INSTALL_TIMEOUT_S)
    assert build_artefacts() == before, "pip left build artefacts in the checkout"

    script = tmp_path / "check.py"
    script.write_text(CHROMA_CHECK, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    result = run_json([python, str(script), str(work)], cwd=tmp_path, env=env, timeout=RUN_TIMEOUT_S)
    site = venv / "lib"
    assert all(Path(f).is_relative_to(site) for f in result["files"]), result["files"]  # installed, not the checkout
    assert result["count"] == 2
    assert result["by_text"] == ["doc", "img"]
    assert result["by_image"] == ["img", "doc"]
    assert result["distances"][0] < 1e-4 and result["distances"][2] < 1e-4, result["distances"]
    assert result["dim"] == 64  # the tiny checkpoint's hidden size

    # The optional features this venv lacks (peft, scikit-image, Ray, FastAPI; then the Chroma integration)
    # each stop with one line naming the install command, before any model loads.
    e5v = str(venv / "bin" / "e5v")
    tiny = str(work / "tiny")
    missing = {
        'pip install "e5v[train]"': ["train", "--model", tiny, "--data", "pairs.csv", "--output", "adapter"],
        'pip install "e5v[bench]"': ["bench", "--model", tiny, "--texts", "1", "--images", "0", "--mixed", "0"],
        'pip install "e5v[ray]"': ["embed-dataset", "rows.jsonl", "out", "--text-column", "text"],
        'pip install "e5v[serve]"': ["serve", "--model", tiny, "--port", "0"],
    }
    # The collection needs chromadb, never the integration package (the core imports no integration).
    run([str(venv / "bin" / "pip"), "uninstall", "-y", "chromadb"], cwd=tmp_path, env=env, timeout=RUN_TIMEOUT_S)
    missing['pip install "e5v[chroma]"'] = ["index", str(work)]
    for install, args in missing.items():
        done = subprocess.run([e5v, *args], cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        (line,) = done.stderr.splitlines()
        assert done.returncode == 2 and line.startswith(f"e5v {args[0]}: error: ") and install in line, done.stderr
