"""``e5v embed-dataset``: Parquet, JSONL or CSV in, Parquet with an embedding column out, on Ray Data."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from e5v.cli.common import add_model_options, as_flags, counted

__all__ = ["register"]

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}

EPILOG = """\
Each row of INPUT (a file, a folder of files, or a glob, read with ray.data.read_*)
gets an embedding column: a fixed-size list of float32 of unit length. Every column
of INPUT is kept. OUTPUT is a folder of Parquet files, in input order unless
--no-preserve-order. Needs the ray extra: pip install "e5v[ray]".

--text-column alone embeds texts, --image-column alone images (paths, URIs, encoded
bytes or arrays), both a composed query (the image modified as the text says) or,
with --mode interleaved, the image followed by the text as one item.

Without --address a local Ray instance is started (--num-cpus CPUs); with --address
auto (or ray://HOST:PORT) the job joins a running cluster, whose workers need e5v
and access to the model and to any image paths.

With --on-error skip, rows that cannot be embedded get a null embedding and a reason
in --error-column; the exit status is then 1 if any row failed, 0 otherwise.

examples:
  e5v embed-dataset captions.parquet out/ --text-column caption --num-cpus 8 --device cpu
  e5v embed-dataset s3://bucket/pairs/ s3://bucket/pairs-e5v/ --format parquet \\
      --image-column image --text-column edit --address auto --workers 8 --gpus-per-worker 1
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed-dataset",
        help="embed a Parquet/JSONL/CSV dataset on Ray Data (one model per worker), write Parquet",
        description="Bulk-embed a table with E5-V on a pool of Ray actors, each loading the model once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="a .parquet, .jsonl or .csv file, a folder or a glob")
    parser.add_argument("output", metavar="OUTPUT", help="folder for the Parquet output")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())), help="input format (default: by suffix)")
    columns = parser.add_argument_group("columns")
    columns.add_argument("--text-column", default=None, help="column of texts")
    columns.add_argument("--image-column", default=None, help="column of images")
    columns.add_argument(
        "--mode", choices=("composed", "interleaved"), default="composed", help="with both columns (default: composed)"
    )
    columns.add_argument("--output-column", default="embedding", help="name of the new column (default: embedding)")
    columns.add_argument("--id-column", default=None, help="column that names a row in error messages")
    columns.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="a bad row (default: fail)")
    columns.add_argument("--error-column", default="embedding_error", help="reasons, with --on-error skip")
    add_model_options(parser, local_device=False)
    cluster = parser.add_argument_group("ray")
    cluster.add_argument("--address", default=None, help="join this Ray cluster (auto, ray://HOST:PORT)")
    cluster.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    cluster.add_argument("--workers", type=int, default=1, help="model actors (default: 1)")
    cluster.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per actor (default: 0)")
    cluster.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per actor (default: 1)")
    cluster.add_argument(
        "--preserve-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write rows in input order (default: on)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.text_column is None and args.image_column is None:
        sys.stderr.write("e5v embed-dataset: error: give --text-column, --image-column, or both\n")
        return 2
    kind = args.format or FORMATS.get(Path(args.input).suffix.lower())
    if kind is None:
        sys.stderr.write(
            f"e5v embed-dataset: error: cannot tell the format of {args.input!r}; pass --format parquet, json or csv\n"
        )
        return 2
    from e5v.optional import require

    ray = require("ray", "ray")
    require("pyarrow", "ray")
    from e5v.ray import embed_dataset

    if args.address is None:
        cpus = args.num_cpus or os.cpu_count() or 1
        if args.workers * args.cpus_per_worker > cpus - 1:
            sys.stderr.write(
                f"e5v embed-dataset: error: {args.workers} workers of {args.cpus_per_worker:g} CPUs leave none of "
                f"the {cpus} CPUs for reading and writing; use fewer --workers, a lower --cpus-per-worker "
                "(e.g. 0.5), or more --num-cpus\n"
            )
            return 2
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = args.preserve_order
        reader: Any = {"parquet": ray.data.read_parquet, "json": ray.data.read_json, "csv": ray.data.read_csv}[kind]
        embedded = embed_dataset(
            reader(args.input),
            model_name=args.model,
            text_column=args.text_column,
            image_column=args.image_column,
            mode=args.mode,
            output_column=args.output_column,
            id_column=args.id_column,
            batch_size=args.batch_size,
            concurrency=args.workers,
            num_gpus_per_worker=args.gpus_per_worker,
            num_cpus_per_worker=args.cpus_per_worker,
            device=args.device,
            dtype=args.dtype,
            on_error=args.on_error,
            error_column=args.error_column,
            embedder_options={"revision": args.revision} if args.revision else None,
        )
        embedded.write_parquet(args.output)
    except Exception as exc:  # Ray wraps worker errors; show the e5v one when there is one
        sys.stderr.write(f"e5v embed-dataset: error: {as_flags(_reason(exc))}\n")
        return 1
    finally:
        ray.shutdown()
    return _summary(args)


def _reason(exc: Exception) -> str:
    """The message of the e5v error inside a Ray error, else the error itself."""
    found = re.findall(r"^e5v\.errors\.\w+: (.+)$", str(exc), flags=re.MULTILINE)
    return found[-1] if found else f"{type(exc).__name__}: {exc}"


def _summary(args: argparse.Namespace) -> int:
    import pyarrow.dataset as pads

    written = pads.dataset(args.output, format="parquet")
    rows = written.count_rows()
    failed = written.count_rows(filter=pads.field(args.error_column).is_valid()) if args.on_error == "skip" else 0
    note = f"; {failed} failed (see column {args.error_column!r})" if failed else ""
    sys.stdout.write(f"wrote {counted(rows, 'row')} to {args.output}{note}\n")
    return 1 if failed else 0
