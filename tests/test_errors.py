"""One exception tree: every e5v error is defined in ``e5v.errors`` and documented there;
library messages name parameters, and the CLI says them as its flags."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import e5v.errors
from e5v.cli import main
from e5v.cli.common import as_flags
from e5v.errors import E5VError, StoreError

SOURCE = Path(e5v.errors.__file__).parent
#: Layers whose messages are about the command line or a server's options by design: the
#: CLI itself, the benchmarks it runs, and the HTTP server, whose clients can only fix a
#: refusal by the flags it was started with.
SPEAKS_FLAGS = ("cli", "bench", "server", "wire")
FLAG = re.compile(r"(?<![\w`-])--[a-z][a-z-]+")


def _modules() -> list[Path]:
    return sorted(path for path in SOURCE.rglob("*.py") if path.name != "errors.py")


def test_every_error_class_is_defined_in_errors_and_documented() -> None:
    """No module but errors.py defines a public exception; each there says when it is raised."""
    public = {name for name, value in vars(e5v.errors).items() if inspect.isclass(value)}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
                assert not bases & (public | {"Exception", "ValueError", "RuntimeError"}), (
                    f"{path.relative_to(SOURCE)} defines the exception {node.name}; define it in e5v/errors.py"
                )
    for name in e5v.errors.__all__:
        error = getattr(e5v.errors, name)
        assert issubclass(error, E5VError), name
        assert error.__doc__ and len(error.__doc__) > 40, f"{name} has no docstring that says when it is raised"


def _texts(node: ast.AST) -> list[str]:
    """The strings in an expression, each f-string whole with ``{}`` for its fields."""
    if isinstance(node, ast.JoinedStr):
        return ["".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)]
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return [text for child in ast.iter_child_nodes(node) for text in _texts(child)]


def _raised_strings(path: Path) -> list[str]:
    raised = [node.exc for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Raise) and node.exc]
    return [text for exc in raised for text in _texts(exc)]


def test_library_errors_name_parameters_not_flags() -> None:
    """Below the CLI, benchmarks and server, a raised message names no command-line flag
    (a whole command in backticks, such as `e5v index PATH --db DIR`, may be suggested)."""
    for path in _modules():
        if path.relative_to(SOURCE).parts[0] in SPEAKS_FLAGS:
            continue
        for text in _raised_strings(path):
            bare = re.sub(r"`[^`]*\s[^`]*`", "", text)  # commands in backticks
            assert not FLAG.search(bare), f"{path.relative_to(SOURCE)} raises {text!r}: name the parameter in backticks"


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("pick another `name` (or `db`)", "pick another --collection (or --db)"),
        ("pass `follow_links=True` to index it", "pass --follow-links to index it"),
        ("then pass `data_dir=/data/e5v`", "then pass --data-dir /data/e5v"),
        ("`url` must look like http://host:port", "--chroma-url must look like http://host:port"),
        ("lower `batch_size` or `grad_accum`", "lower --batch-size or --grad-accum"),
        ("run `e5v index PATH --db x`; ``literal``", "run `e5v index PATH --db x`; ``literal``"),
    ],
)
def test_the_cli_says_parameters_as_its_flags(message: str, said: str) -> None:
    assert as_flags(message) == said


def test_a_store_error_names_the_parameter_and_the_cli_its_flag(tmp_path: Path, capsys) -> None:
    from e5v.collection.repository import Store

    with pytest.raises(StoreError, match=r"^`name` 'a b' is not a name Chroma accepts") as raised:
        Store(tmp_path / "db", "a b")
    assert "--" not in str(raised.value)
    assert main(["search", "a cat", "--db", str(tmp_path / "db"), "--collection", "a b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e5v search: error: --collection 'a b' is not a name Chroma accepts"), err
    with pytest.raises(StoreError, match=r"^`url` must look like http://host:port"):
        Store(tmp_path / "db", url="localhost:8000")
    assert main(["search", "a cat", "--chroma-url", "localhost:8000"]) == 2
    assert "error: --chroma-url must look like http://host:port" in capsys.readouterr().err
