"""Bulk embedding on Ray Data: a local 2-CPU Ray instance, the tiny checkpoint, real photos."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from e5v.cli import main, ray_embed

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'e5v[ray]')")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from e5v.ray.data import _EmbedBatch, embed_dataset  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

TOLERANCE = 1e-5
#: Seconds any one Ray job of this module may take before the test fails instead of hanging.
JOB_LIMIT = 180


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (main thread, POSIX)."""

    def expire(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"Ray job still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the module, its session files under a short /tmp path
    (unix socket paths are limited to 107 bytes); yields its address."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    with deadline(JOB_LIMIT):
        info = ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=256 * 1024**2,
            _temp_dir=temp_dir,
        )
    try:
        yield info.address_info["gcs_address"]
    finally:
        ray.shutdown()
        context.execution_options.preserve_order = preserve_order
        shutil.rmtree(temp_dir, ignore_errors=True)


def vectors(rows: list[dict], column: str) -> np.ndarray:
    return np.array([row[column] for row in rows], dtype=np.float32)


def test_texts_on_two_actors_match_the_embedder_in_order_and_skip_bad_rows(ray_cluster, tiny_path, embedder):
    texts: list[str | None] = [f"caption {i}: a photo of thing number {i}" for i in range(11)]
    texts[4] = None  # a null cell
    texts[5] = "a text with a stray <image> placeholder"  # the same batch of 3: two bad rows in one batch
    ds = ray.data.from_items([{"id": i, "text": text} for i, text in enumerate(texts)], override_num_blocks=4)

    out = embed_dataset(ds, model_name=tiny_path, text_column="text", batch_size=3, concurrency=2, on_error="skip")
    with deadline(JOB_LIMIT):
        rows = out.take_all()

    assert [row["id"] for row in rows] == list(range(11))
    assert [row["text"] for row in rows] == texts
    good = [i for i in range(11) if i not in (4, 5)]
    expected = embedder.embed_texts([texts[i] for i in good])
    np.testing.assert_allclose(vectors([rows[i] for i in good], "embedding"), expected, atol=TOLERANCE)
    assert all(rows[i]["embedding_error"] is None for i in good)
    assert rows[4]["embedding"] is None and "expected text (str)" in rows[4]["embedding_error"]
    assert rows[5]["embedding"] is None and "placeholder" in rows[5]["embedding_error"]
    assert out.schema().base_schema.field("embedding").type == pa.list_(pa.float32(), embedder.dimension)


def test_composed_paths_and_tensor_columns_in_one_pipeline(ray_cluster, tiny_path, embedder, photos, photo_dir):
    names = ["cat", "astronaut", "logo", "camera"]
    paths = [str(photo_dir / f"{name}.png") for name in names]
    paths[2] = str(photo_dir / "missing.png")
    captions = [f"make the {name} blue" for name in names]
    rgb = [photos[name].convert("RGB") for name in names]
    fixed = [np.asarray(image.resize((40, 30))) for image in rgb]  # one shape: a fixed-shape tensor column
    varying = [np.asarray(image.resize((24 + 8 * i, 20 + 4 * i))) for i, image in enumerate(rgb)]
    ds = ray.data.from_items(
        [
            {"id": i, "path": paths[i], "caption": captions[i], "fixed": fixed[i], "var": varying[i]}
            for i in range(len(names))
        ]
    )
    shared = {"model_name": tiny_path, "batch_size": 2, "num_cpus_per_worker": 0.5}
    out = embed_dataset(
        ds, image_column="path", text_column="caption", output_column="e_comp", on_error="skip", **shared
    )
    out = embed_dataset(out, image_column="var", output_column="e_var", **shared)
    out = embed_dataset(
        out, image_column="fixed", text_column="caption", mode="interleaved", output_column="e_inter", **shared
    )
    with deadline(JOB_LIMIT):
        rows = out.take_all()

    assert [row["id"] for row in rows] == [0, 1, 2, 3]
    good = [0, 1, 3]
    np.testing.assert_allclose(
        vectors([rows[i] for i in good], "e_comp"),
        embedder.embed_composed([paths[i] for i in good], [captions[i] for i in good]),
        atol=TOLERANCE,
    )
    assert rows[2]["e_comp"] is None and "does not exist" in rows[2]["embedding_error"]
    np.testing.assert_allclose(vectors(rows, "e_var"), embedder.embed_images(varying), atol=TOLERANCE)
    interleaved = embedder.embed_interleaved([[image, text] for image, text in zip(fixed, captions)])
    np.testing.assert_allclose(vectors(rows, "e_inter"), interleaved, atol=TOLERANCE)


def test_a_bad_row_fails_the_job_naming_the_row(ray_cluster, tiny_path):
    ds = ray.data.from_items([{"id": f"doc-{i}", "text": None if i == 4 else f"text {i}"} for i in range(6)])
    out = embed_dataset(ds, model_name=tiny_path, text_column="text", id_column="id", batch_size=4)
    with deadline(JOB_LIMIT), pytest.raises(ray.exceptions.RayError) as raised:
        out.materialize()
    # what e5v embed-dataset prints of it: the e5v error inside Ray's
    assert ray_embed._reason(raised.value) == (
        "row id='doc-4': expected text (str), got builtins.NoneType; pass on_error='skip' to record bad rows and go on"
    )


def test_arguments_are_checked_before_anything_runs(ray_cluster, tiny_path):
    ds = ray.data.from_items([{"text": "a"}])
    with pytest.raises(ValueError, match="text_column, image_column, or both"):
        embed_dataset(ds, model_name=tiny_path)
    with pytest.raises(ValueError, match="on_error"):
        embed_dataset(ds, model_name=tiny_path, text_column="text", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        embed_dataset(ds, model_name=tiny_path, text_column="text", image_column="x", mode="mixed")  # type: ignore[arg-type]


def test_the_actor_reads_nested_list_and_hugging_face_image_columns(tiny_path, embedder, photos):
    """The actor's batch function in-process (no Ray): Arrow types Ray leaves as they are."""
    arrays = [np.asarray(photos[name].convert("RGB").resize((30, 20))) for name in ("cat", "coffee")]
    encoded = []
    for name in ("rocket", "logo"):
        buffer = io.BytesIO()
        photos[name].save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    table = pa.table(
        {
            "lists": pa.array([a.tolist() for a in arrays], type=pa.list_(pa.list_(pa.list_(pa.uint8())))),
            "hf": [{"bytes": encoded[0], "path": "rocket.png"}, {"bytes": encoded[1], "path": None}],
        }
    )
    options = {"device": "cpu", "dtype": None, "batch_size": 2}

    def actor(column: str) -> _EmbedBatch:
        return _EmbedBatch(
            model_name=str(tiny_path),
            text_column=None,
            image_column=column,
            mode="composed",
            output_column=f"e_{column}",
            id_column=None,
            on_error="fail",
            error_column="unused",
            embedder_options=options,
        )

    out = actor("hf")(actor("lists")(table))
    assert out.column_names == ["lists", "hf", "e_lists", "e_hf"]
    np.testing.assert_allclose(
        np.array(out.column("e_lists").to_pylist()), embedder.embed_images(arrays), atol=TOLERANCE
    )
    np.testing.assert_allclose(np.array(out.column("e_hf").to_pylist()), embedder.embed_images(encoded), atol=TOLERANCE)
    with pytest.raises(ValueError, match="already has a column 'e_hf'"):
        actor("hf")(out)


def test_cli_refuses_options_that_would_hang_or_cannot_work(tmp_path, capsys):
    assert main(["embed-dataset", "in.jsonl", "out", "--text-column=t", "--workers=2", "--num-cpus=2"]) == 2
    assert "leave none of the 2 CPUs for reading and writing" in capsys.readouterr().err
    assert main(["embed-dataset", str(tmp_path), "out", "--text-column=t"]) == 2
    assert "pass --format parquet, json or csv" in capsys.readouterr().err
    assert main(["embed-dataset", "in.csv", "out"]) == 2
    assert "give --text-column, --image-column, or both" in capsys.readouterr().err


def test_cli_jsonl_to_parquet_on_a_running_cluster(tmp_path, ray_cluster, tiny_path, embedder, photo_dir):
    names = ["cat", "rocket", "nothing-here", "text", "coffee"]
    rows = [
        {"id": i, "image": str(photo_dir / f"{name}.png"), "edit": f"the {name} at night"}
        for i, name in enumerate(names)
    ]
    source = tmp_path / "queries.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from e5v.cli import main; sys.exit(main(sys.argv[1:]))",
            "embed-dataset",
            str(source),
            str(output),
            "--image-column=image",
            "--text-column=edit",
            "--on-error=skip",
            f"--model={tiny_path}",
            "--device=cpu",
            "--batch-size=2",
            f"--address={ray_cluster}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=JOB_LIMIT,
    )

    assert done.returncode == 1, done.stderr[-3000:]  # one row failed
    assert f"wrote 5 rows to {output}; 1 failed (see column 'embedding_error')" in done.stdout
    table = pq.read_table(output)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("edit").to_pylist() == [row["edit"] for row in rows]
    errors = table.column("embedding_error").to_pylist()
    assert "does not exist" in errors[2] and errors[:2] + errors[3:] == [None] * 4
    got = table.column("embedding").to_pylist()
    assert got[2] is None
    good = [0, 1, 3, 4]
    expected = embedder.embed_composed([rows[i]["image"] for i in good], [rows[i]["edit"] for i in good])
    np.testing.assert_allclose(np.array([got[i] for i in good], dtype=np.float32), expected, atol=TOLERANCE)
