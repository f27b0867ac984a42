"""Every import the READMEs and the examples show works, from its documented path, with no
deprecation warning: the public names stay where users import them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted(ROOT.glob("integrations/*/README.md")), *sorted(ROOT.glob("examples/*.py"))]
PACKAGES = r"(?:e5v|chromadb_e5v|langchain_e5v|llama_index\.embeddings\.e5v)"
IMPORT = re.compile(rf"^\s*(from {PACKAGES}(?:\.\w+)* import [\w, ]+|import {PACKAGES}(?:\.\w+)*)", re.MULTILINE)


def documented_imports() -> list[str]:
    found = {match.group(1).strip().rstrip(",") for path in DOCUMENTS for match in IMPORT.finditer(path.read_text())}
    return sorted(found)


def test_the_documents_show_imports_of_every_package() -> None:
    shown = " ".join(documented_imports())
    for package in ("from e5v import", "chromadb_e5v", "langchain_e5v", "llama_index.embeddings.e5v", "e5v.testing"):
        assert package in shown


@pytest.mark.parametrize("statement", documented_imports())
def test_a_documented_import_works_without_warnings(statement: str) -> None:
    error = "warnings.filterwarnings('error', message=r'e5v\\.\\w+ moved to', category=DeprecationWarning)"
    done = subprocess.run(
        [sys.executable, "-c", f"import warnings\n{error}\n{statement}\n"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{statement}: {done.stderr[-2000:]}"
