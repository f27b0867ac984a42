"""``e5v embed``: embeddings of texts and image files, as .npy or JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from e5v.cli.common import (
    add_model_options,
    add_server_option,
    counted,
    embedder_from_args,
    remote_from_args,
    show_progress,
)

__all__ = ["register"]

EPILOG = """\
With --kind auto (the default) an INPUT that names an existing file with an image
extension (jpg, jpeg, png, webp, gif, bmp, tif, tiff) is embedded as that image;
every other INPUT is embedded as text, itself (a .txt file's name is not read). An
INPUT that reads like a file name but is embedded as text gets a warning on stderr.
--kind text or --kind image treats every INPUT as that kind; with --kind image, an
INPUT that does not exist is an error before the model loads (exit status 2).

--output FILE.npy writes a float32 matrix (one unit row per INPUT, in order);
FILE.jsonl, or stdout without --output, one JSON object per line:
{"input": ..., "kind": "text"|"image", "embedding": [...]}.

examples:
  e5v embed "a photo of a cat" cat.jpg --output vectors.npy
  e5v embed "first sentence" "second sentence" --kind text > vectors.jsonl
  e5v embed photos/*.png --kind image --output photos.jsonl --model /models/e5-v
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed texts and image files to .npy or JSON lines",
        description="Embed texts and image files with E5-V, for other pipelines.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="a text, or an image file")
    parser.add_argument("-o", "--output", metavar="FILE", help="FILE.npy or FILE.jsonl (default: JSON lines to stdout)")
    parser.add_argument(
        "--kind", choices=("auto", "text", "image"), default="auto", help="how to read INPUTs (default: auto)"
    )
    add_server_option(add_model_options(parser))
    parser.set_defaults(handler=run)


def kind_of(value: str, kind: str) -> str:
    """``image`` or ``text`` for one INPUT, by the rule of the epilog."""
    if kind != "auto":
        return kind
    from e5v.collection.files import IMAGE_SUFFIXES

    path = Path(value)
    try:
        is_image = path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    except (OSError, ValueError):  # not a usable path: text
        is_image = False
    return "image" if is_image else "text"


def text_warning(value: str) -> str | None:
    """Why an INPUT embedded as text may have been meant as a file, or ``None``."""
    from e5v.collection.files import IMAGE_SUFFIXES, TEXT_SUFFIXES

    if "\n" in value or len(value) > 1024:
        return None
    path = Path(value).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES | TEXT_SUFFIXES and not value.startswith(("/", "./", "../", "~")):
        return None
    try:
        exists = path.exists()
    except (OSError, ValueError):
        return None
    if not exists:
        return (
            f"looks like a file name, but there is no such file (from {os.getcwd()!r}); it is embedded as text. "
            "Check the path, or pass --kind text to embed such strings without this warning"
        )
    if path.suffix.lower() in TEXT_SUFFIXES:
        return "names a text file; its name is embedded, not its content (e5v index reads text files)"
    return None


def run(args: argparse.Namespace) -> int:
    from e5v.errors import InvalidInputError

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in (".npy", ".jsonl"):
        sys.stderr.write(f"e5v embed: error: --output must end in .npy or .jsonl, got {str(output)!r}\n")
        return 2
    if output is not None and not output.parent.is_dir():
        sys.stderr.write(
            f"e5v embed: error: --output {str(output)!r}: its folder {str(output.parent)!r} does not exist; create "
            "it, or write elsewhere\n"
        )
        return 2
    if args.kind == "image":
        for number, value in enumerate(args.inputs, 1):
            if not os.path.lexists(os.path.expanduser(value)):
                sys.stderr.write(
                    f"e5v embed: error: INPUT {number} ({value!r}): there is no such file (from {os.getcwd()!r}); "
                    "check the path\n"
                )
                return 2
    kinds = [kind_of(value, args.kind) for value in args.inputs]
    if args.kind == "auto":
        for number, (value, kind) in enumerate(zip(args.inputs, kinds), 1):
            warning = text_warning(value) if kind == "text" else None
            if warning:
                sys.stderr.write(f"e5v embed: warning: INPUT {number} ({value!r}) {warning}\n")
    items = [Path(value) if kind == "image" else value for value, kind in zip(args.inputs, kinds)]
    try:
        embedder = remote_from_args(args) if args.server else embedder_from_args(args)
        vectors = embedder.embed(items, show_progress_bar=show_progress(args.quiet))
    except InvalidInputError as exc:
        index = exc.index if exc.index is not None else 0
        reason = str(exc).removeprefix(f"item {exc.index}: ")
        sys.stderr.write(f"e5v embed: error: INPUT {index + 1} ({args.inputs[index]!r}): {reason}\n")
        return 2
    if output is not None and output.suffix.lower() == ".npy":
        import numpy as np

        np.save(output, vectors)
    else:
        lines = (
            json.dumps({"input": value, "kind": kind, "embedding": vector.tolist()}, ensure_ascii=False) + "\n"
            for value, kind, vector in zip(args.inputs, kinds, vectors)
        )
        if output is None:
            sys.stdout.writelines(lines)
        else:
            with output.open("w", encoding="utf-8") as handle:
                handle.writelines(lines)
    if output is not None:
        sys.stderr.write(f"wrote {counted(len(vectors), 'embedding')} of dimension {vectors.shape[1]} to {output}\n")
    return 0
