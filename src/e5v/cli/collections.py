"""``e5v collections``: list, inspect, delete and rebind the collections of a database."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from e5v.cli.common import add_model_options, as_flags, positive
from e5v.defaults import DEFAULT_REBIND_SAMPLE as DEFAULT_SAMPLE
from e5v.defaults import DEFAULT_REBIND_TOLERANCE as DEFAULT_TOLERANCE

if TYPE_CHECKING:
    from e5v.collection.catalog import CollectionInfo

__all__ = ["register"]

EPILOG = """\
A collection is bound to its model's identity, not to where the model's files lie: a
hub id (and revision), or for a local checkpoint folder a fingerprint of its config.json
and weight files (see README, "Collections"). The same folder by another path, moved,
copied or served under another name opens it; another checkpoint is refused. `rebind`
points a collection at a checkpoint its identity cannot follow (re-saved, converted)
once a sample of its records embedded again gives the stored vectors back.

examples:
  e5v collections
  e5v collections --db ~/e5v_db --json
  e5v collections info e5v
  e5v collections delete old-photos --yes
  e5v collections rebind e5v --model /models/e5-v-safetensors
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "collections",
        help="list, inspect, delete and rebind collections",
        description="List the collections of a database (default), or act on one.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _database_options(parser, None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    info = actions.add_parser("info", help="what one collection holds, and its model's identity")
    info.add_argument("name", metavar="NAME", help="the collection")
    info.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    _database_options(info, argparse.SUPPRESS)
    delete = actions.add_parser("delete", help="delete a collection and its records")
    delete.add_argument("name", metavar="NAME", help="the collection")
    delete.add_argument("--yes", action="store_true", help="delete without asking (needed when stdin is no terminal)")
    _database_options(delete, argparse.SUPPRESS)
    rebind = actions.add_parser(
        "rebind",
        help="bind a collection to another checkpoint of the same model, after checking its vectors",
        description="Re-embed a sample of the collection's records with --model and bind the collection to it "
        "when the vectors match the stored ones.",
    )
    rebind.add_argument("name", metavar="NAME", help="the collection")
    _database_options(rebind, argparse.SUPPRESS)
    group = add_model_options(rebind, model_default=None, model_help="hub id or local checkpoint folder to bind to")
    group.add_argument(
        "--sample",
        type=positive,
        default=DEFAULT_SAMPLE,
        help=f"records embedded again to compare (default: {DEFAULT_SAMPLE})",
    )
    group.add_argument(
        "--tolerance",
        type=_tolerance,
        default=DEFAULT_TOLERANCE,
        help=f"largest cosine distance accepted between a new and a stored vector (default: {DEFAULT_TOLERANCE:g})",
    )
    group.add_argument("--force", action="store_true", help="rebind even when the vectors differ")
    parser.set_defaults(handler=run, action=None)


def _database_options(parser: argparse.ArgumentParser, default: object) -> None:
    """``--db`` and ``--chroma-url``; on an action, ``SUPPRESS`` keeps what was given before it."""
    group = parser.add_argument_group("database")
    group.add_argument(
        "--db",
        default="./e5v_db" if default is None else default,
        help="Chroma database folder (default: ./e5v_db)",
    )
    group.add_argument(
        "--chroma-url", default=default, help="use a Chroma server (http://host:port) instead of the --db folder"
    )


def _tolerance(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 2:
        raise argparse.ArgumentTypeError(f"expected a cosine distance from 0 to 2, got {value!r}")
    return number


def run(args: argparse.Namespace) -> int:
    from e5v.collection import catalog

    if args.action is None:
        found = catalog.list_collections(args.db, args.chroma_url)
        if args.json:
            _print_json([info.model_dump() for info in found])
        else:
            sys.stdout.write((_table(found) if found else f"no collections in {args.chroma_url or args.db}") + "\n")
        return 0
    if args.action == "info":
        info = catalog.collection_info(args.db, args.name, args.chroma_url)
        if args.json:
            _print_json(info.model_dump())
        else:
            sys.stdout.write(_details(info) + "\n")
        return 0
    if args.action == "delete":
        return _delete(args)
    return _rebind(args)


def _delete(args: argparse.Namespace) -> int:
    from e5v.collection import catalog

    info = catalog.collection_info(args.db, args.name, args.chroma_url)
    where = args.chroma_url or args.db
    if not args.yes:
        if not sys.stdin.isatty():
            sys.stderr.write(
                f"e5v collections delete: error: deleting {args.name!r} ({_records(info)}) needs --yes when stdin is "
                "not a terminal\n"
            )
            return 2
        sys.stderr.write(f"delete collection {args.name!r} ({_records(info)}) in {where}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in ("y", "yes"):
            sys.stderr.write("nothing deleted\n")
            return 1
    catalog.delete_collection(args.db, args.name, args.chroma_url)
    sys.stdout.write(f"deleted collection {args.name!r} ({_records(info)}) in {where}\n")
    return 0


def _rebind(args: argparse.Namespace) -> int:
    from e5v.collection import catalog
    from e5v.collection.repository import Store
    from e5v.errors import ConfigurationError

    if args.model is None:
        raise ConfigurationError("rebind needs --model: the checkpoint to bind the collection to")
    store = Store(args.db, args.name, url=args.chroma_url)
    check = catalog.rebind(
        store,
        args.model,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        sample=args.sample,
        tolerance=args.tolerance,
        force=args.force,
    )
    measured = (
        "no record could be embedded again to compare"
        if check.max_distance is None
        else f"cosine distance up to {check.max_distance:.4g} over {check.checked} records "
        f"(tolerance {check.tolerance:g})"
    )
    sys.stdout.write(f"collection {args.name!r} bound to {check.model} ({check.model_id}): {measured}\n")
    return 0


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _records(info: CollectionInfo) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in info.kinds.items())
    return f"{info.records} record{'' if info.records == 1 else 's'}" + (f": {kinds}" if kinds else "")


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _model(info: CollectionInfo) -> str:
    from e5v.model.identity import short_identity

    if info.model is None:
        return "-"
    identity = "" if info.model_id in (None, info.model) else f" ({short_identity(info.model_id)})"
    return info.model + identity + (f"@{info.revision}" if info.revision else "")


def _prompts(info: CollectionInfo) -> str:
    return "custom" if isinstance(info.prompts, dict) else str(info.prompts or "e5v")


def _table(found: list[CollectionInfo]) -> str:
    rows = [("name", "records", "model", "prompts", "size", "indexed")]
    for info in found:
        if info.error is not None:
            rows.append((info.name, "-", as_flags(info.error), "", "", ""))
            continue
        rows.append(
            (info.name, _records(info), _model(info), _prompts(info), _size(info.size_bytes), info.indexed_at or "-")
        )
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row[:5], widths)), row[5]]).rstrip() for row in rows
    )


def _details(info: CollectionInfo) -> str:
    if info.error is not None:
        return f"{info.name}: {as_flags(info.error)}"
    lines = [
        f"{info.name}: {_records(info)}, from {info.files} file{'' if info.files == 1 else 's'}",
        f"  model     {info.model}" + (f" at revision {info.revision}" if info.revision else ""),
        f"  identity  {info.model_id}",
        f"  prompts   {_prompts(info) if not isinstance(info.prompts, dict) else json.dumps(info.prompts)}",
        f"  dtype     {info.dtype or 'the default of the device'}",
    ]
    if info.server is not None:
        lines.append(f"  server    {info.server}")
    lines += [f"  size      {_size(info.size_bytes)}", f"  indexed   {info.indexed_at or 'unknown'}"]
    return "\n".join(lines)
