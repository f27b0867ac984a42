"""``e5v search``: query a collection made by ``e5v index`` with text, an image, or both."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e5v.cli.common import (
    add_collection_options,
    add_model_options,
    add_server_option,
    as_flags,
    connect_from_args,
    positive,
    remote_from_args,
)

if TYPE_CHECKING:
    from e5v.collection.query import ResultHit
    from e5v.collection.repository import StoredRecord

__all__ = ["register"]

EPILOG = """\
TEXT alone is a text query, --image alone an image query, and both a composed query:
the image changed as TEXT says (E5-V's composed-retrieval prompt). The score is the
cosine similarity of query and result. By default the collection's own model is used;
another --model is refused. A PDF's records name their page: the table shows
FILE.pdf#page=N (the PDF open parameter viewers understand), --json a "page" key.

--where filters (repeat it: all must hold): KEY=VALUE, KEY!=VALUE, page=2..5 (either end
may be left out), path~TEXT (the path holds TEXT), path^=DIR/ (the path starts with DIR,
relative to here), text~WORDS (the passage holds WORDS); keys are kind, path, page,
passage, sha256 and any other metadata a record has.

--group page (the default when the collection holds PDF pages) gives one hit per PDF
page (and per other file): its image, text and interleaved records fused by
reciprocal-rank fusion, sum over kinds of 1/(60 + rank) (a photo or a note counts its own
term for the kind it cannot hold); the score shown is that fusion,
--json keeps each kind's cosine score and rank under "kinds". --group file gives one hit
per file, --group none one per record (the paper's protocol, for evaluation). Passages
are numbered from 0, as stored, in the table and in --json.

examples:
  e5v search "a cat"
  e5v search --image examples/data/chelsea.png -k 3
  e5v search "make it a dog" --image examples/data/chelsea.png --kind image
  e5v search "coffee brewing" --kind text --json | jq '.[0].text'
  e5v search "a galaxy" --where path~hubble --where page=2..
  e5v search "a bar chart of sales" --json --with-content | jq '.[0].content.media_type'
"""

PREVIEW_CHARS = 70


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search a collection by text, image, or a composed query",
        description="Search a collection made by `e5v index`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("text", nargs="?", metavar="TEXT", help="query text (with --image: the change to make)")
    parser.add_argument("--image", metavar="PATH", help="query image file")
    parser.add_argument("-k", type=positive, default=10, help="number of results (default: 10)")
    parser.add_argument(
        "--kind",
        choices=("image", "text", "interleaved"),
        help="only results of this kind (image: image files and PDF page renderings; interleaved: PDF pages as "
        "rendering and text in one vector)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FILTER",
        help="only records that pass FILTER: KEY=VALUE, KEY!=VALUE, page=2..5, path~TEXT, path^=DIR/, text~WORDS "
        "(repeatable; all must hold)",
    )
    parser.add_argument(
        "--group",
        choices=("page", "file", "none"),
        help="one hit per PDF page, per file, or per record (default: page when the collection holds PDF pages, "
        "else none)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--with-content",
        action="store_true",
        help="with --json: each image or PDF page hit's picture as base64 (PNG for pages, JPEG for images)",
    )
    parser.add_argument(
        "--content-size",
        type=positive,
        default=1024,
        metavar="PX",
        help="the longest side of --with-content pictures, in pixels (default: 1024)",
    )
    add_collection_options(parser)
    add_server_option(
        add_model_options(
            parser, model_default=None, model_help="hub id or local checkpoint folder (default: the collection's model)"
        )
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.collection.query import default_group, parse_where, search
    from e5v.collection.repository import Store
    from e5v.core.inputs import ImageLoader, query_item
    from e5v.errors import InvalidInputError, StoreError

    if args.text is None and args.image is None:
        sys.stderr.write("e5v search: error: give a query TEXT, an --image, or both\n")
        return 2
    if args.with_content and not args.json:
        sys.stderr.write("e5v search: error: --with-content goes with --json; add --json\n")
        return 2
    where = parse_where(args.where, base=Path.cwd())  # a bad filter fails before anything is opened
    try:
        if args.image is not None:
            ImageLoader().load(Path(args.image), 0)  # a bad --image fails before the model loads
        store = Store(args.db, args.collection, url=args.chroma_url)
        if store.count() == 0:
            raise StoreError(
                f"collection {args.collection!r} in {args.chroma_url or args.db!r} holds no records yet; "
                "index files first with `e5v index PATH`"
            )
        if args.server:
            remote_from_args(args)  # refuses model options before anything is read
        embedder = connect_from_args(store, args)
        [vector] = embedder.embed([query_item(args.text, None if args.image is None else Path(args.image))])
        group = args.group or default_group(store)
        found = search(store, vector, k=args.k, kind=args.kind, where=where, group=group)
    except InvalidInputError as exc:
        sys.stderr.write(f"e5v search: error: {as_flags(exc.reason)}\n")
        return 2
    hits = [result.hit(rank) for rank, result in enumerate(found, 1)]
    if args.json:
        listed = [hit.to_dict() for hit in hits]
        if args.with_content:
            for shown, result in zip(listed, found):
                shown["content"] = _content(result.record, args.content_size)
        sys.stdout.write(json.dumps(listed, ensure_ascii=False, indent=2) + "\n")
    else:
        sys.stdout.write((_table(hits) if hits else "no results") + "\n")
    return 0


def _content(record: StoredRecord, side: int) -> dict[str, Any] | None:
    """A hit's picture as ``{media_type, width, height, data}`` (base64), or ``None`` for a
    text or one that cannot be drawn (said on stderr)."""
    import base64
    import logging

    from e5v.errors import ThumbnailError
    from e5v.server.thumbnails import has_thumbnail, picture

    if not has_thumbnail(record):
        return None
    try:
        drawn = picture(record, side)
    except ThumbnailError as exc:
        logging.getLogger("e5v.cli.search").warning("no picture: %s", exc)
        return None
    data = base64.b64encode(drawn.data).decode("ascii")
    return {"media_type": drawn.media_type, "width": drawn.width, "height": drawn.height, "data": data}


def _table(hits: Sequence[ResultHit]) -> str:
    from e5v.files import printable_path

    rows = [("rank", "score", "kind", "path", "passage")]
    for hit in hits:
        preview = ""
        if hit.text is not None:
            flat = " ".join(hit.text.split())
            flat = flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 3] + "..."
            preview = flat if hit.passage is None else f"#{hit.passage} {flat}"
        path = printable_path(hit.path) + ("" if hit.page is None else f"#page={hit.page}")
        kind = hit.kind if hit.kinds is None else "+".join(hit.kinds)
        rows.append((str(hit.rank), f"{hit.score:.4f}", kind, path, preview))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:4], widths)), row[4]]).rstrip() for row in rows
    )
