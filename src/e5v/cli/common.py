"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from e5v.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from e5v.embedder import E5VEmbedder

__all__ = ["add_collection_options", "add_model_options", "embedder_from_args"]


def add_model_options(
    parser: argparse.ArgumentParser, *, model_default: str | None = DEFAULT_MODEL, model_help: str | None = None
) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--batch-size``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=model_default,
        help=model_help or f"hub id or local directory (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    group.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    group.add_argument("--batch-size", type=int, default=16, help="items per forward pass (default: 16)")


def embedder_from_args(args: argparse.Namespace, **options: object) -> E5VEmbedder:
    """Load the model once for this command, from the model options."""
    from e5v.embedder import E5VEmbedder

    return E5VEmbedder(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **options)


def add_collection_options(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--collection``, ``--revision`` (of the model of a new collection)."""
    group = parser.add_argument_group("collection")
    group.add_argument("--db", default="./e5v_db", help="Chroma database folder (default: ./e5v_db)")
    group.add_argument("--collection", default="e5v", help="collection name (default: e5v)")
    group.add_argument(
        "--chroma-url", default=None, help="use a Chroma server (http://host:port) instead of the --db folder"
    )
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
