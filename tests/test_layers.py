"""The layer contract (``[tool.importlinter]`` in pyproject.toml) holds, and it catches an
import from a lower layer to a higher one, a cycle, and an import of an integration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``e5v`` package under ``root/src``, with ``root``'s pyproject."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run(
        [LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_the_layers_hold() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("core/inputs.py", "import e5v.server.app", "e5v.core is not allowed to import e5v.server"),
        ("model/loading.py", "import e5v.core.embedder", "e5v.model is not allowed to import e5v.core"),
        ("collection/repository.py", "import e5v.cli", "e5v.collection is not allowed to import e5v.cli"),
        ("core/cache.py", "import chromadb_e5v", "e5v is not allowed to import chromadb_e5v"),
    ],
)
def test_an_import_against_the_layers_fails_the_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "src" / "e5v" / module
    target.write_text(target.read_text() + f"\n{line}  # against the layers\n")
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert broken in done.stdout, done.stdout


OLD_PATHS = {
    "e5v.loading": "e5v.model.loading",
    "e5v.runner": "e5v.model.runner",
    "e5v.embedder": "e5v.core.embedder",
    "e5v.inputs": "e5v.core.inputs",
    "e5v.prompts": "e5v.core.prompts",
    "e5v.batching": "e5v.core.batching",
    "e5v.cache": "e5v.core.cache",
}


@pytest.mark.parametrize(("old", "new"), sorted(OLD_PATHS.items()))
def test_an_old_module_path_is_the_new_module_with_a_deprecation_warning(old: str, new: str) -> None:
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{old} moved to {new}; import from there" in done.stdout


@pytest.mark.parametrize(
    ("old", "names"),
    [
        ("e5v.store", ["Store", "StoreError", "Hit", "StoredRecord", "index_files", "IndexSummary"]),
        ("e5v.indexing", ["Record", "record_id", "split_passages", "open_regular", "walk", "load_file"]),
    ],
)
def test_a_split_module_keeps_its_old_names_with_a_deprecation_warning(old: str, names: list[str]) -> None:
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        f"    from {old} import {', '.join(names)}\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{old} moved to e5v.collection" in done.stdout
