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


def test_every_import_in_the_project_finds_its_name() -> None:
    """Each ``from <e5v package> import name`` in the sources, integrations, tests and
    examples (inside functions too, which only run on some paths) names something that is there."""
    import ast
    import importlib

    missing = []
    for folder in ("src", "integrations", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or node.level or not re.match(PACKAGES, node.module or ""):
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    package = hasattr(module, "__path__")
                    if not hasattr(module, alias.name) and not (
                        package and importlib.util.find_spec(f"{node.module}.{alias.name}")
                    ):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)
