"""``e5v serve``: an OpenAI-compatible embedding server for texts, images and more."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from e5v.cli.common import add_model_options, positive
from e5v.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from e5v.embedder import E5VEmbedder
    from e5v.store import Store

__all__ = ["register"]

from e5v.client import API_KEY_ENV_VAR as API_KEY_VARIABLE  # may hold several keys, comma-separated

EPILOG = f"""\
POST /v1/embeddings takes OpenAI's request: "input" is a string or a list of items,
each a text, an image ({{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}}),
a list of text and image parts (one interleaved vector), or a composed query
({{"type": "composed", "image_url": ..., "text": "make it red"}}). Items from concurrent
requests are embedded together, in token-budgeted batches. The schema is at /docs;
also GET /v1/models, /health, /ready, /info, /metrics.

With --db, the collection made by `e5v index` is served too, with its own model:
a search page at / (text, image, or both: a composed query; "more like this";
thumbnails), and POST /v1/search, GET /v1/records/ID/thumbnail, GET /v1/collection.

Keys: --api-key (repeatable) or ${API_KEY_VARIABLE} (comma-separated); with any, /v1/*
needs "Authorization: Bearer KEY" (the page asks for it). The server binds to
127.0.0.1 unless --host says; with --db, another --host needs a key.

examples:
  e5v serve --model royokong/e5-v
  e5v serve --db e5v_db                      # the search page at http://127.0.0.1:8000/
  E5V_API_KEY=secret e5v serve --model /models/e5-v --host 0.0.0.0 --port 8080
  e5v serve --model tiny-e5v --port 8000     # a tiny random checkpoint (see README)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve embeddings over HTTP (OpenAI-compatible, multimodal)",
        description="Serve E5-V embeddings over HTTP: an OpenAI-compatible /v1/embeddings for every kind of input.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = add_model_options(
        parser,
        model_default=None,
        model_help=f"hub id or local checkpoint folder (default: {DEFAULT_MODEL}; with --db, the collection's model)",
    )
    group.add_argument(
        "--max-batch-tokens", type=positive, default=None, help="padded tokens a forward pass (default: the device's)"
    )
    group.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model)")
    collection = parser.add_argument_group("collection (the search page)")
    collection.add_argument(
        "--db", metavar="DIR", default=None, help="serve this Chroma database folder's collection too"
    )
    collection.add_argument(
        "--collection", metavar="NAME", default="e5v", help="the collection to serve, with --db (default: e5v)"
    )
    http = parser.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    http.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    http.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted key (repeatable; or ${API_KEY_VARIABLE})",
    )
    http.add_argument(
        "--max-concurrent-requests", type=positive, default=512, help="requests served at once; beyond: 429 (512)"
    )
    http.add_argument(
        "--max-client-batch-size", type=positive, default=256, help="items a request, at most; beyond: 413 (256)"
    )
    http.add_argument(
        "--payload-limit", type=positive, default=16 * 1024 * 1024, help="bytes a request body; beyond: 413 (16 MiB)"
    )
    http.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only, size-capped); default: inline data only",
    )
    http.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="embed each request on its own (a baseline for benchmarks)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    require("prometheus_client", "serve")
    from e5v.cli.common import embedder_from_args
    from e5v.errors import ConfigurationError
    from e5v.memory import keep_freed_memory
    from e5v.server.app import ServerConfig, create_app

    keys = [*args.api_key, *(key.strip() for key in os.environ.get(API_KEY_VARIABLE, "").split(",") if key.strip())]
    if args.db is not None and not keys and not _loopback(args.host):
        raise ConfigurationError(
            f"--db serves the collection's files, so --host {args.host} needs a key: set --api-key KEY (or "
            f"${API_KEY_VARIABLE}), or leave --host at 127.0.0.1"
        )
    options: dict[str, object] = {"allow_remote": args.allow_remote_images}
    if args.max_batch_tokens is not None:
        options["max_batch_tokens"] = args.max_batch_tokens
    if args.db is not None:
        store, model, load = _collection(args, options)
    else:
        args.model = args.model or DEFAULT_MODEL
        store, model, load = None, args.model, partial(embedder_from_args, args, **options)
    config = ServerConfig(
        model_name=args.served_model_name or model,
        load=load,
        store=store,
        api_keys=keys,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        allow_remote_images=args.allow_remote_images,
        batching=args.batching,
    )
    keep_freed_memory()  # before the model loads: rounds reuse their memory
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def _loopback(host: str) -> bool:
    """Whether ``host`` is an address of this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _collection(args: argparse.Namespace, options: dict[str, Any]) -> tuple[Store, str, Callable[[], E5VEmbedder]]:
    """The store of ``--db``, its model's name, and how to load that model with the
    collection's revision, dtype and prompts (as ``e5v search`` does). Raises
    :class:`~e5v.store.StoreError` for a missing or empty collection, or another ``--model``."""
    from e5v.embedder import E5VEmbedder
    from e5v.prompts import PromptSet
    from e5v.store import Store, StoreError

    store = Store(args.db, args.collection)
    if store.count() == 0:
        raise StoreError(
            f"collection {args.collection!r} in {args.db!r} holds no records yet; index files first with "
            f"`e5v index PATH --db {args.db}`"
        )
    model = store.model(args.model, args.revision)
    config = store.config or {}
    prompts = config.get("prompts")

    def load() -> E5VEmbedder:
        return E5VEmbedder(
            model,
            revision=config.get("revision"),
            device=args.device,
            dtype=args.dtype if args.dtype is not None else config.get("dtype"),
            batch_size=args.batch_size,
            prompts=PromptSet(**prompts) if isinstance(prompts, dict) else prompts,
            **options,
        )

    return store, model, load
