"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Literal

from e5v.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from e5v.embedder import E5VEmbedder

__all__ = ["add_collection_options", "add_model_options", "batch_size_option", "embedder_from_args", "positive"]


def add_model_options(
    parser: argparse.ArgumentParser, *, model_default: str | None = DEFAULT_MODEL, model_help: str | None = None
) -> argparse._ArgumentGroup:
    """``--model``, ``--device``, ``--dtype``, ``--batch-size``, in a group returned for more."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=model_default,
        help=model_help or f"hub id or local directory (default: {DEFAULT_MODEL})",
    )
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    group.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    group.add_argument(
        "--batch-size",
        type=batch_size_option,
        default="auto",
        help="most items per forward pass: a number or 'auto' (16 on CPU, 256 on GPU; fewer where the token "
        "budget says so)",
    )
    return group


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


def batch_size_option(value: str) -> int | Literal["auto"]:
    """``--batch-size``: ``auto`` or a positive number."""
    return "auto" if value == "auto" else positive(value, "a positive number or 'auto'")


def positive(value: str, expected: str = "a positive number") -> int:
    """A positive integer option, or argparse's error saying what was ``expected``."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number
