"""``e5v index``: embed images, text files and PDFs into a Chroma collection, incrementally."""

from __future__ import annotations

import argparse
import sys

from e5v.cli.common import (
    add_collection_options,
    add_model_options,
    add_server_option,
    as_flags,
    connect_from_args,
    existing_paths,
    positive,
    remote_from_args,
    show_progress,
)
from e5v.defaults import DEFAULT_MODEL

__all__ = ["DEFAULT_CONCURRENCY", "register"]

#: ``--concurrency``: embedding requests in flight at once through ``--server``. Measured with a tiny checkpoint on
#: one CPU `e5v serve` of a shared 2-core machine, 400 notes: 12-15 s at 4, 14-16 s at 1, 17-21 s at 2 (under a
#: heavier load: 58 s at 4, 77 s at 1 and 2); replicas need at least one request each.
DEFAULT_CONCURRENCY = 4

EPILOG = """\
Images (jpg, jpeg, png, webp, gif, bmp, tif, tiff) are one record each; text files
(txt, md, UTF-8) are split into passages of at most --max-chars characters, cut at
blank lines, else sentence ends, else spaces, without overlap. Files are found
recursively in folders (hidden ones left out). A file whose content (sha256) is
unchanged is skipped; a changed one's records are replaced.

PDFs (pip install "e5v[pdf]") are read page by page; --pdf-records says what each page
becomes: "image" (the page rendered for E5-V's 336-px tile grid), "text" (its text in
passages, as text files) and "interleaved" (rendering and text as ONE vector). Search
results carry the page. Encrypted or corrupt PDFs are reported and skipped; a page that
cannot be read is reported and the rest of its PDF is indexed. A PDF stored with other
--pdf-records is indexed again.

Only regular files are read. Links to files inside the given folders are indexed
under the link's name; links to files outside them are skipped (--follow-links indexes
them), links to folders are never followed. FIFOs, devices, sockets, link loops,
broken links and names that are not UTF-8 are reported and skipped. A file whose
size, mtime and ctime are unchanged is skipped without reading it.

With --server URL the model runs in that `e5v serve`, and --concurrency N requests
(default: 4) are in flight at once, each one forward batch: set N to at least the
server's replicas (`e5v serve --replicas N`) so that each of them embeds. The records,
vectors and skipping are those of indexing with the model loaded here.

Files of other types are counted and named in the summary, not read. A PATH that
does not exist is an error before anything is read (exit status 2). A file that
cannot be indexed is reported on stderr and skipped; the exit status is 1 if any
failed (a PDF page too), 0 otherwise (2: nothing was indexed: bad options, no model, or a collection
or database that cannot be used). Nothing is created before the model has loaded.

examples:
  e5v index examples/data
  e5v index ~/photos ~/notes --db ~/e5v_db --batch-size 32
  e5v index reports/ --pdf-records image,text,interleaved
  e5v index docs/ --model /models/e5-v --prune --quiet
  e5v index examples/data --model tiny-e5v     # a tiny random checkpoint (see README)
  e5v index ~/notes --server http://gpu-box:8000 --concurrency 8 --chroma-url http://db:8000
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="index images, text files and PDFs into a Chroma collection",
        description="Embed images, text files and PDFs with E5-V into an embedded Chroma database.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files and folders to index")
    add_collection_options(parser)
    model = add_model_options(
        parser,
        model_default=None,
        model_help=f"hub id or local checkpoint folder (default: the collection's model; {DEFAULT_MODEL} for "
        "a new one)",
    )
    add_server_option(model)
    model.add_argument(
        "--concurrency",
        type=positive,
        default=None,
        metavar="N",
        help=f"with --server: embedding requests in flight at once, e.g. the server's replicas "
        f"(default: {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--max-chars", type=positive, default=800, help="longest text passage, in characters (default: 800)"
    )
    parser.add_argument(
        "--pdf-records",
        type=pdf_records_option,
        default=None,
        metavar="KINDS",
        help="what each PDF page becomes, comma-separated: image, text, interleaved (default: image,text)",
    )
    parser.add_argument("--prune", action="store_true", help="delete the records of indexed files that are gone")
    parser.add_argument(
        "--follow-links",
        action="store_true",
        help="also index files that links inside the folders point to outside them (default: skip those links)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from e5v.client import Embedder
    from e5v.collection.files import SkippedPath
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store
    from e5v.errors import ConfigurationError
    from e5v.files import printable_path

    def report(skipped: SkippedPath) -> None:
        # above the progress bars
        tqdm.write(f"failed: {printable_path(skipped.path)}: {as_flags(skipped.reason)}", file=sys.stderr)

    if args.concurrency is not None and not args.server:
        raise ConfigurationError(
            "--concurrency is the number of requests in flight to an `e5v serve`, so it needs --server URL; "
            "leave it out to index with the model loaded here"
        )
    existing_paths(args.paths, "PATH")  # before a database or model is touched
    store = Store(args.db, args.collection, create=True, url=args.chroma_url)
    requested = remote_from_args(args) if args.server else args.model  # a server: checked by its model_id
    store.model(requested, args.revision)  # refuse another model before reading any file

    def connect() -> Embedder:
        if not args.server:
            return connect_from_args(store, args)
        concurrency = DEFAULT_CONCURRENCY if args.concurrency is None else args.concurrency
        return store.connect(batch_size=args.batch_size, server=args.server, max_in_flight=concurrency)

    summary = index_files(
        store,
        args.paths,
        connect,
        batch_size=args.batch_size,
        max_chars=args.max_chars,
        pdf_records=args.pdf_records,
        prune=args.prune,
        follow_links=args.follow_links,
        progress=show_progress(args.quiet),
        report=report,
    )
    sys.stdout.write("\n".join(summary.lines()) + "\n")
    return 1 if summary.failed or summary.pages_failed else 0


def pdf_records_option(value: str) -> tuple[str, ...]:
    """``--pdf-records``: kinds of :data:`e5v.collection.records.RECORD_KINDS`, comma-separated."""
    from e5v.collection.records import record_kinds
    from e5v.errors import ConfigurationError

    try:
        return record_kinds(value)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
