"""A newcomer's first hour, through the real command line: no weights, no network, the
usual mistakes. Each failure is one ``e5v COMMAND: error:`` line, fast, and leaves
nothing behind. "No network" is a Hub endpoint on a closed loopback port, so nothing
here reaches the internet.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import pytest

from e5v.cli import SUBCOMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_hub(tmp_path: Path) -> dict[str, str]:
    """A process environment with the Hub unreachable, an empty Hub cache and offline mode off."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


def e5v(*args: str | Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=180)


def one_error_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"e5v {command}: error: "), result.stderr
    return lines[0]


def hub_cache_entry(home: Path, repo: str, checkpoint: Path) -> None:
    """``checkpoint`` placed in the Hub cache under ``home`` as if downloaded as ``repo``."""
    commit = "0" * 40
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, base / "snapshots" / commit)


# -- 1, 2: the first run without the weights ----------------------------------------------


def test_no_hub_fails_at_once_leaves_nothing_and_the_retry_works(tmp_path: Path, no_hub, tiny_path: Path) -> None:
    db = tmp_path / "e5v_db"
    failed = e5v("index", EXAMPLES, "--db", db, env=no_hub)
    assert failed.returncode == 2
    line = one_error_line(failed, "index")
    assert "Hugging Face Hub" in line and "unreachable" in line and "royokong/e5-v" in line
    assert "--model DIR" in line and "HF_HUB_OFFLINE=1" in line and "build_tiny_checkpoint" in line
    assert "Retrying" not in failed.stderr and not db.exists()

    for bad in (tmp_path / "no-such-dir", tmp_path):  # a missing folder; a folder that is no checkpoint
        refused = e5v("index", EXAMPLES, "--db", db, "--model", bad, env=no_hub)
        assert refused.returncode == 2 and str(bad) in one_error_line(refused, "index")
        assert not db.exists()

    retry = e5v("index", EXAMPLES, "--db", db, "--model", tiny_path, env=no_hub)
    assert retry.returncode == 0, retry.stderr
    assert retry.stdout.startswith("indexed 10 files")


def test_an_empty_collection_of_another_model_does_not_block(tmp_path: Path, tiny_path: Path) -> None:
    """A database that an earlier e5v left with an empty collection tied to a model that
    never embedded anything (``royokong/e5-v`` here, not on this machine)."""
    import chromadb

    from chromadb_e5v import E5VEmbeddingFunction

    db = tmp_path / "db"
    client = chromadb.PersistentClient(path=str(db))
    client.create_collection("e5v", embedding_function=E5VEmbeddingFunction("royokong/e5-v"))
    assert main(["index", str(EXAMPLES / "notes"), "--db", str(db), "--model", str(tiny_path), "-q"]) == 0
    collection = chromadb.PersistentClient(path=str(db)).get_collection("e5v")
    assert collection.count() == 5
    assert collection.configuration_json["embedding_function"]["config"]["model_name"] == str(tiny_path)


def test_search_without_the_hub_is_one_line(tmp_path: Path, no_hub) -> None:
    import chromadb

    from chromadb_e5v import E5VEmbeddingFunction

    db = tmp_path / "db"
    collection = chromadb.PersistentClient(path=str(db)).create_collection(
        "e5v", embedding_function=E5VEmbeddingFunction("royokong/e5-v")
    )
    collection.add(ids=["x"], embeddings=[[1.0] + [0.0] * 4095], metadatas=[{"path": "/x.png", "kind": "image"}])
    result = e5v("search", "a cat", "--db", db, env=no_hub)
    assert result.returncode == 2
    assert "cannot download 'royokong/e5-v'" in one_error_line(result, "search")


def test_unreachable_hub_loads_a_cached_model_with_one_warning(tmp_path: Path, no_hub, tiny_path: Path) -> None:
    hub_cache_entry(Path(no_hub["HF_HOME"]), "e5v-test/tiny", tiny_path)
    result = e5v("embed", "a photo of a cat", "--model", "e5v-test/tiny", "--output", tmp_path / "v.npy", env=no_hub)
    assert result.returncode == 0, result.stderr
    warning, wrote = result.stderr.splitlines()  # the warning once: the libraries' handlers do not repeat it
    assert warning.startswith("WARNING e5v.model.loading: the Hugging Face Hub is unreachable")
    assert "loading e5v-test/tiny from the cache" in warning
    assert wrote.startswith("wrote 1 embedding of")


def test_the_python_api_fails_the_same_way(tmp_path: Path) -> None:
    from e5v import E5VEmbedder, ModelLoadError

    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache and HF_HUB_OFFLINE=1") as raised:
        E5VEmbedder("e5v-test/not-downloaded")
    assert raised.value.__cause__ is None
    with pytest.raises(ModelLoadError, match="no checkpoint folder"):
        E5VEmbedder(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "script", ["chroma_collection.py", "langchain_rag.py", "llamaindex_multimodal.py"], ids=lambda name: name[:-3]
)
def test_example_scripts_without_the_model_print_one_line(script: str, no_hub) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, text=True, env=no_hub, timeout=180
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{script}: error: cannot download 'royokong/e5-v'"), result.stderr


# -- 3: device and dtype, before anything is loaded or created --------------------------


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (["--device", "gpu"], "unknown device 'gpu'; use cpu, cuda"),
        (["--device", "cuda:99"], "this machine has: cpu"),
        (["--dtype", "float8"], "unknown dtype 'float8'; use one of float32, bfloat16, float16"),
    ],
)
def test_bad_device_or_dtype_fails_before_anything(option, expected, tmp_path: Path, capsys) -> None:
    db = tmp_path / "db"
    for command in (["index", str(EXAMPLES), "--db", str(db)], ["embed", "x"], ["search", "x", "--db", str(db)]):
        with pytest.raises(SystemExit) as exited:
            main([*command, *option])
        assert exited.value.code == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"e5v {command[0]}: error: argument {option[0]}: ") and expected in line
    assert not db.exists()


def test_the_embedder_checks_device_and_dtype_before_loading(tmp_path: Path) -> None:
    from e5v import E5VEmbedder
    from e5v.errors import ConfigurationError, E5VError

    missing = tmp_path / "not-loaded"  # loading it would raise ModelLoadError instead
    with pytest.raises(ConfigurationError, match="this machine has: cpu"):
        E5VEmbedder(missing, device="cuda:99")
    with pytest.raises(ConfigurationError, match="unknown device 'gpu'"):
        E5VEmbedder(missing, device="gpu")
    with pytest.raises(ConfigurationError, match="unknown dtype 'float8'; use one of") as raised:
        E5VEmbedder(missing, dtype="float8")
    assert isinstance(raised.value, E5VError) and isinstance(raised.value, ValueError)


# -- 4: optional packages ---------------------------------------------------------------


def test_a_missing_package_names_what_to_install() -> None:
    from e5v.errors import MissingDependencyError
    from e5v.optional import FEATURES, require

    assert require("json", "train").__name__ == "json"
    for feature, wanted in FEATURES.items():
        with pytest.raises(MissingDependencyError) as raised:
            require("e5v_no_such_package", feature)
        assert str(raised.value) == (
            f"{wanted.description} needs the package 'e5v_no_such_package', which is not installed: {wanted.install}"
        )


# -- 6: silence where users need a word ------------------------------------------------


def test_unsupported_files_are_counted_and_named(tmp_path: Path, tiny_path: Path, capsys) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.docx").write_bytes(b"PK")
    (folder / ".hidden.docx").write_bytes(b"PK")
    assert main(["index", str(folder), "--db", str(tmp_path / "db"), "--model", str(tiny_path)]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[0] == "indexed 0 files (0 records), skipped 0 unchanged, failed 0, ignored 1 unsupported, pruned 0"
    assert summary[1].startswith(f"unsupported, not indexed: {folder / 'report.docx'} (e5v indexes .bmp")
    assert not (tmp_path / "db").exists()  # nothing to embed: nothing created


def test_search_arguments_are_checked_before_the_model_loads(tmp_path: Path, tiny_path: Path, capsys, caplog) -> None:
    db, model = tmp_path / "db", tmp_path / "model"
    shutil.copytree(tiny_path, model)  # a checkpoint this process has not loaded yet
    indexed = e5v("index", EXAMPLES / "notes", "--db", db, "--model", model, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert indexed.returncode == 0, indexed.stderr
    with pytest.raises(SystemExit) as exited:
        main(["search", "a cat", "-k", "0", "--db", str(db)])
    assert exited.value.code == 2 and "argument -k: expected a positive number, got '0'" in capsys.readouterr().err
    caplog.set_level("INFO", logger="e5v.model.loading")
    assert main(["search", "--image", str(tmp_path / "nope.png"), "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("e5v search: error: image file") and "does not exist" in err
    assert "loading" not in caplog.text  # the model was not loaded

    import chromadb

    from chromadb_e5v import E5VEmbeddingFunction

    function = E5VEmbeddingFunction(model)
    chromadb.PersistentClient(path=str(db)).create_collection("empty", embedding_function=function)
    assert main(["search", "a cat", "--db", str(db), "--collection", "empty"]) == 2
    assert "holds no records yet; index files first" in capsys.readouterr().err
    assert "loading" not in caplog.text


def test_embed_warns_when_an_input_looks_like_a_missing_file(tmp_path: Path, tiny_path: Path, capsys) -> None:
    notes = EXAMPLES / "notes" / "cats.md"
    args = ["embed", "nosuch.png", "a photo of a cat", str(notes), "--model", str(tiny_path)]
    assert main([*args, "--output", str(tmp_path / "v.npy")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("e5v embed: warning: INPUT 1 ('nosuch.png') looks like a file name, but there is no such")
    assert err[1].startswith(f"e5v embed: warning: INPUT 3 ({str(notes)!r}) names a text file; its name is embedded")
    assert err[2].startswith("wrote 3 embeddings") and len(err) == 3
    assert main([*args, "--kind", "text", "--output", str(tmp_path / "v.npy")]) == 0
    assert not any("warning" in line for line in capsys.readouterr().err.splitlines())


# -- 7: noise ---------------------------------------------------------------------------


def rendered(raw: str) -> list[str]:
    """What a terminal shows of ``raw``: each ``\\r`` rewrites its line, cursor-up lines dropped."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        shown = line.split("\r")[-1]
        if shown.strip() and "\x1b[A" not in shown:
            lines.append(shown)
    return lines


def run_in_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``e5v ARGS`` with its stdout and stderr on a pseudo-terminal; its exit status and output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # 40 rows, 200 columns
    process = subprocess.Popen(
        [sys.executable, "-m", "e5v", *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 180)
        if not ready:
            process.kill()
            raise AssertionError("e5v hung")
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_one_progress_display_on_a_terminal_none_elsewhere(tmp_path: Path, tiny_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    status, output = run_in_terminal(
        ["index", str(EXAMPLES), "--db", str(tmp_path / "db"), "--model", str(tiny_path)], env
    )
    assert status == 0, output
    shown = rendered(output)
    assert [line for line in shown if line.startswith("Embedding: 100%")] == [shown[-3]]  # once, then the PDF's
    assert [line for line in shown if line.startswith("PDF pages: 100%")] == [shown[-2]]  # once, then the summary
    assert shown[-1].startswith("indexed 10 files")
    assert "Loading weights" not in output and "Writing" not in output and "Warning" not in output

    quiet_status, quiet = run_in_terminal(
        ["index", str(EXAMPLES), "--db", str(tmp_path / "q"), "--model", str(tiny_path), "-q"], env
    )
    assert quiet_status == 0 and rendered(quiet) == [line for line in rendered(quiet) if not re.search(r"\d+%", line)]

    piped = subprocess.run(
        [sys.executable, "-m", "e5v", "index", str(EXAMPLES), "--db", tmp_path / "p", "--model", tiny_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr  # no bars in a log


def test_training_and_adapters_load_without_warnings(tmp_path: Path, tiny_path: Path, capsys) -> None:
    data = tmp_path / "pairs.csv"
    data.write_text("anchor,positive\n" + "".join(f"sentence {i},another sentence {i}\n" for i in range(4)))
    adapter = tmp_path / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = ["train", "--model", str(tiny_path), "--data", str(data), "--output", str(adapter)]
        assert main([*args, "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "0", "--cpu"]) == 0
        from e5v import E5VEmbedder

        E5VEmbedder(tiny_path, adapter=adapter).embed_texts(["x"])
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert capsys.readouterr().err == ""


# -- 9: help ----------------------------------------------------------------------------


@pytest.mark.parametrize("module", SUBCOMMANDS)
def test_every_command_has_examples_and_quiet(module: str, capsys) -> None:
    command = {"ray_embed": "embed-dataset", "bench_serve": "bench-serve"}.get(module, module)
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"e5v {command} " in text.split("examples:")[1]
    assert "-q, --quiet" in text
    if "--revision" in text:
        model_group = text.split("\nmodel:\n")[1].split("\n\n")[0]
        assert "--revision" in model_group


def test_lora_options_say_what_they_are(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lora-r LORA_R LoRA rank (default: 64)" in text
    assert re.search(r"--lora-alpha LORA_ALPHA [^-]*\(default: 16\)", text)
    assert re.search(r"--lora-dropout LORA_DROPOUT [^-]*\(default: 0\.05\)", text)


# -- 10: the README's offline trial -------------------------------------------------------


def test_the_readmes_offline_trial_runs_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("**Try it first without the 16 GB model**", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    shutil.copytree(EXAMPLES, tmp_path / "examples" / "data")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euc", block], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    indexed, header, *rows = result.stdout.splitlines()
    assert indexed.startswith("indexed 10 files") and header.split() == ["rank", "score", "kind", "path", "passage"]
    assert indexed.startswith("indexed 10 files (14 records)") and len(rows) == 10  # -k 10 by default, of 14
