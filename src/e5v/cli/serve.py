"""``e5v serve``: an OpenAI-compatible embedding server for texts, images and more."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e5v.cli.common import add_model_options, positive
from e5v.defaults import DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MODEL

if TYPE_CHECKING:
    from e5v.collection.repository import Store
    from e5v.core.embedder import E5VEmbedder

__all__ = ["collection_from_args", "listen", "register", "say_what_is_served", "server_url"]

from e5v.client import API_KEY_ENV_VAR as API_KEY_VARIABLE  # may hold several keys, comma-separated

logger = logging.getLogger(__name__)

EPILOG = f"""\
POST /v1/embeddings takes OpenAI's request: "input" is a string or a list of items,
each a text, an image ({{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}}),
a list of text and image parts (one interleaved vector), or a composed query
({{"type": "composed", "image_url": ..., "text": "make it red"}}). Items from concurrent
requests are embedded together, in token-budgeted batches. The schema is at /docs;
also GET /v1/models, /health, /ready, /info, /metrics.

With --db (or --chroma-url), the collection made by `e5v index` is served too, with its
own model: a search page at / (text, image, or both: a composed query; "more like this";
thumbnails), and POST /v1/search, GET /v1/records/ID/thumbnail, GET /v1/collection.

At start the server says on stderr the model, whether keys are on, the collection and
the URLs, then one "ready" line with the dimension, device and dtype once the model has
loaded. A port in use is one error line (exit 2), said before anything loads. Every
answer carries x-request-id (the request's own, else a new one); /v1/embeddings and
/v1/search also x-total-time, x-queue-time, x-inference-time (ms) and x-compute-tokens.
--access-log logs one line a request (not the page's files or thumbnails).

Keys: --api-key (repeatable), --api-key-file (one a line) or ${API_KEY_VARIABLE}
(comma-separated); with any, /v1/* needs "Authorization: Bearer KEY" (the page asks for
it). An empty key, file or variable is refused at start. The server binds to 127.0.0.1
unless --host says; with --db, another --host needs a key.

Host check: bound to loopback without keys, the server answers only requests whose Host
is localhost, 127.0.0.1 or [::1] (any port), so a web page cannot reach it through a
rebinding domain; others get 421. --allowed-hosts adds names (and, given, applies the
check on any bind). CORS is off (no Access-Control-* headers) unless --cors-origin.

Slow clients: a request's body must arrive within --body-timeout (else 408, connection
closed), its headers within --header-timeout of the connection opening or of the last
answer (else the connection is closed); a request takes a --max-concurrent-requests slot
only once its body is in. Connections over --max-connections are closed at once.
SIGTERM stops taking connections, lets requests finish for --graceful-shutdown-timeout,
then cancels the rest and exits.

Ray Serve replicas (the ray extra): --replicas N serves the same app as N replicas, each
holding one model, on a local Ray cluster e5v starts and stops (or --ray-address ADDR);
--ray autoscales from --min-replicas to --max-replicas. Every answer names its replica in
x-e5v-replica. A --db folder is served by one replica at most: use --chroma-url for more.
--ray-config prints a Ray Serve config (serve run, serve deploy, KubeRay) and exits.

examples:
  e5v serve --model royokong/e5-v
  e5v serve --model royokong/e5-v --device cuda --replicas 4      # one GPU each
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
        "--chroma-url", metavar="URL", default=None, help="serve a collection of this Chroma server instead of a --db"
    )
    collection.add_argument(
        "--collection",
        metavar="NAME",
        default="e5v",
        help="the collection to serve, with --db or --chroma-url (default: e5v)",
    )
    http = parser.add_argument_group("server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    http.add_argument("--port", type=port_option, default=8000, help="port, 0 for any free one (default: 8000)")
    http.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"accepted key (repeatable; or ${API_KEY_VARIABLE}, comma-separated); an empty one is refused",
    )
    http.add_argument(
        "--api-key-file", metavar="PATH", default=None, help="read accepted keys from PATH, one a line (blank skipped)"
    )
    http.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="also answer this Host name (repeatable; default: loopback names only, when on loopback without keys)",
    )
    http.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow cross-origin requests from ORIGIN, e.g. https://app.example (repeatable; default: none)",
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
        "--max-request-pixels",
        type=positive,
        metavar="N",
        default=DEFAULT_MAX_REQUEST_PIXELS,
        help=f"decoded pixels of a request's images; beyond: 413 ({DEFAULT_MAX_REQUEST_PIXELS})",
    )
    http.add_argument(
        "--max-connections",
        type=positive,
        metavar="N",
        default=1024,
        help="open connections; beyond: closed at once (1024)",
    )
    http.add_argument(
        "--body-timeout",
        type=seconds,
        metavar="SECONDS",
        default=30.0,
        help="seconds for a request body to arrive; then 408 (30)",
    )
    http.add_argument(
        "--header-timeout",
        type=seconds,
        metavar="SECONDS",
        default=10.0,
        help="seconds for request headers to arrive, from connecting or the last answer; then closed (10)",
    )
    http.add_argument(
        "--keep-alive-timeout",
        type=seconds,
        metavar="SECONDS",
        default=5.0,
        help="seconds an idle connection is kept open (5)",
    )
    http.add_argument(
        "--graceful-shutdown-timeout",
        type=seconds,
        metavar="SECONDS",
        default=10.0,
        help="seconds SIGTERM waits for requests in flight before cancelling them and exiting (10)",
    )
    http.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only, size-capped); default: inline data only",
    )
    http.add_argument(
        "--access-log",
        action="store_true",
        help="log one line a request: client, method, path, status, ms, request id (not the page's files or "
        "thumbnails; default: off)",
    )
    http.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="embed each request on its own (a baseline for benchmarks)",
    )
    http.add_argument(
        "--threads",
        type=positive,
        metavar="T",
        default=None,
        help="torch's CPU threads, of the server or of each replica (default: torch's own; in a replica, its CPUs)",
    )
    _add_ray_options(parser)
    parser.set_defaults(handler=run)


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``e5v serve`` as Ray Serve replicas (:mod:`e5v.ray.serve`)."""
    ray = parser.add_argument_group("Ray Serve replicas (the ray extra)")
    ray.add_argument(
        "--replicas", type=positive, metavar="N", default=None, help="serve the same app as N Ray Serve replicas"
    )
    ray.add_argument(
        "--ray", action="store_true", help="Ray Serve replicas, autoscaled from --min-replicas to --max-replicas"
    )
    ray.add_argument(
        "--min-replicas", type=natural, metavar="A", default=None, help="with --ray: replicas at least (default: 1)"
    )
    ray.add_argument(
        "--max-replicas", type=positive, metavar="B", default=None, help="with --ray: replicas at most (default: 2)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=positive_number,
        metavar="T",
        default=None,
        help="with --ray: requests in flight a replica, Ray's autoscaling target (default: 2)",
    )
    ray.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="join this Ray cluster (e.g. auto, ray://head:10001; default: start a local one, stopped at exit)",
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=non_negative,
        metavar="G",
        default=None,
        help="GPUs each replica holds (default: 1 with --device cuda, else 0)",
    )
    ray.add_argument(
        "--health-check-period",
        type=seconds,
        metavar="SECONDS",
        default=10.0,
        help="seconds between Ray's health checks of a replica (10)",
    )
    ray.add_argument(
        "--health-check-timeout",
        type=seconds,
        metavar="SECONDS",
        default=30.0,
        help="seconds a health check may take before Ray replaces the replica (30)",
    )
    ray.add_argument(
        "--ray-config",
        action="store_true",
        help="print a Ray Serve config (YAML, for serve run / serve deploy / a KubeRay RayService) and exit",
    )


def run(args: argparse.Namespace) -> int:
    from e5v.optional import require

    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    require("prometheus_client", "serve")
    from e5v.errors import ConfigurationError
    from e5v.server.http import loopback

    keys = _keys(args)
    ray = _ray_wanted(args)
    served = args.db is not None or args.chroma_url is not None
    if args.db is not None and args.chroma_url is not None:
        raise ConfigurationError("--db and --chroma-url both name a collection's database; give one of them")
    if served and not keys and not loopback(args.host):
        flag = "--db" if args.db is not None else "--chroma-url"
        raise ConfigurationError(
            f"{flag} serves the collection's files, so --host {args.host} needs a key: set --api-key KEY (or "
            f"${API_KEY_VARIABLE}), or leave --host at 127.0.0.1"
        )
    if ray:
        from e5v.cli.serve_ray import serve_replicas

        return serve_replicas(args, keys)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    listener = listen(args.host, args.port)  # a port in use is said before anything loads
    try:
        return _serve(args, keys, listener, uvicorn)
    finally:
        listener.close()


def _ray_wanted(args: argparse.Namespace) -> bool:
    """Whether the options ask for Ray Serve replicas; raises :class:`~e5v.errors.ConfigurationError`
    for Ray options that need ``--replicas`` or ``--ray``, or both of those."""
    from e5v.errors import ConfigurationError

    if args.replicas is not None and args.ray:
        raise ConfigurationError("--replicas serves a fixed number and --ray autoscales; give one of them")
    autoscaling = [
        flag
        for flag, value in (
            ("--min-replicas", args.min_replicas),
            ("--max-replicas", args.max_replicas),
            ("--target-ongoing-requests", args.target_ongoing_requests),
        )
        if value is not None
    ]
    if autoscaling and not args.ray:
        raise ConfigurationError(f"{autoscaling[0]} sets Ray's autoscaling; add --ray (or give --replicas N)")
    ray = args.ray or args.replicas is not None
    if not ray:
        given = [
            flag
            for flag, value in (("--ray-address", args.ray_address), ("--gpus-per-replica", args.gpus_per_replica))
            if value is not None
        ]
        if given:
            raise ConfigurationError(f"{given[0]} is for Ray Serve replicas; add --replicas N or --ray")
    return ray or args.ray_config


def _serve(args: argparse.Namespace, keys: list[str], listener: socket.socket, uvicorn: Any) -> int:
    """Serve on ``listener`` until stopped: say what is served, then hand it to uvicorn."""
    from e5v.cli.common import embedder_from_args
    from e5v.errors import ConfigurationError
    from e5v.server.app import ServerConfig, create_app
    from e5v.server.http import allowed_hosts, bounded_protocol
    from e5v.server.memory import keep_freed_memory

    if not args.quiet:  # the start-up lines and the ready line, without -v
        for name in (__name__, "e5v.server"):
            said = logging.getLogger(name)
            said.setLevel(min(said.getEffectiveLevel(), logging.INFO))
    options: dict[str, object] = {"allow_remote": args.allow_remote_images}
    if args.max_batch_tokens is not None:
        options["max_batch_tokens"] = args.max_batch_tokens
    if args.db is not None or args.chroma_url is not None:
        store, model, load = collection_from_args(args, options)
    else:
        args.model = args.model or DEFAULT_MODEL
        store, model, load = None, args.model, partial(embedder_from_args, args, **options)
    name = args.served_model_name or model
    say_what_is_served(args, model, name, keys, store, listener)
    config = ServerConfig(
        model_name=name,
        load=load,
        store=store,
        api_keys=keys,
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        max_request_pixels=args.max_request_pixels,
        allow_remote_images=args.allow_remote_images,
        batching=args.batching,
        body_timeout=args.body_timeout,
        allowed_hosts=allowed_hosts(args.host, keyed=bool(keys), extra=args.allowed_hosts),
        cors_origins=args.cors_origin,
        access_log=args.access_log,
    )
    keep_freed_memory()  # before the model loads: rounds reuse their memory
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=args.host,
            port=args.port,
            http=bounded_protocol(header_timeout=args.header_timeout, max_connections=args.max_connections),
            timeout_keep_alive=args.keep_alive_timeout,
            timeout_graceful_shutdown=args.graceful_shutdown_timeout,
            log_config=None,  # uvicorn's records go to e5v's one stderr handler
            log_level="info" if args.verbose else "warning",  # its start-up lines only with -v: e5v says its own
            access_log=False,  # e5v.server.http.AccessLog, with --access-log
        )
    )
    try:
        server.run(sockets=[listener])
    except OSError as exc:
        raise ConfigurationError(_cannot_listen(args.host, args.port, exc)) from None
    except SystemExit as exc:  # uvicorn's way out when it cannot start; it has logged why
        raise ConfigurationError(
            f"the server could not start on {args.host}:{args.port} (uvicorn's status {exc.code}; its reason is "
            "logged above)"
        ) from None
    return 0 if server.started else 1


def port_option(value: str) -> int:
    """``--port``: 0 (any free port) to 65535."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value!r}")
    return number


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (for uvicorn to listen on). Raises
    :class:`~e5v.errors.ConfigurationError` saying why not: the port is in use, needs
    privileges, or ``host`` is no address of this machine."""
    from e5v.errors import ConfigurationError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigurationError(
            f"--host {host} is not an address or name this machine can bind ({exc}); give an address such as "
            "127.0.0.1 or 0.0.0.0"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart can reuse the port
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(_cannot_listen(host, port, exc)) from None
    sock.set_inheritable(True)
    return sock


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is in use (another server, or another `e5v serve`, listens there); pick a free "
            "--port, or stop what holds it"
        )
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges this process lacks; pick --port 1024 or above"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host} is not an address of this machine; give one of its addresses, 127.0.0.1 or 0.0.0.0"
    return f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --host or --port"


def server_url(host: str, port: int) -> str:
    """The URL of the server bound to ``host``:``port``, as a browser on this machine reaches it."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"


def say_what_is_served(
    args: argparse.Namespace, model: str, name: str, keys: list[str], store: Store | None, listener: socket.socket
) -> None:
    """The start-up lines: the model, the keys, the collection, the URLs."""
    logger.info("model: %s%s, loading", model, "" if name == model else f", served as {name!r}")
    if keys:
        logger.info("keys: on (%d); /v1/* needs Authorization: Bearer KEY", len(keys))
    else:
        logger.info("keys: off; anyone who can reach %s:%s may use /v1/*", args.host, listener.getsockname()[1])
    url = server_url(args.host, listener.getsockname()[1])
    if store is not None:
        where = args.chroma_url or args.db
        records = store.count()
        logger.info("collection: %r in %s, %d record%s", store.name, where, records, "" if records == 1 else "s")
        logger.info("search page: %s/", url)
    logger.info("listening on %s (API docs: %s/docs)", url, url)


def natural(value: str) -> int:
    """A whole number, 0 or more, or argparse's error."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {value!r}")
    return int(value)


def positive_number(value: str) -> float:
    """A positive finite number, or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def non_negative(value: str) -> float:
    """A finite number, 0 or more (GPUs may be fractions), or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number, 0 or more, got {value!r}")
    return number


def seconds(value: str) -> float:
    """A positive number of seconds, or argparse's error."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return number


def _keys(args: argparse.Namespace) -> list[str]:
    """The keys of ``--api-key``, ``--api-key-file`` and ``$E5V_API_KEY``. Raises
    :class:`~e5v.errors.ConfigurationError` for an empty key, or a file or variable holding none."""
    from e5v.errors import ConfigurationError

    keys = []
    for key in args.api_key:
        if not key.strip():
            raise ConfigurationError("--api-key is empty; give a real key, or leave --api-key out for an open server")
        keys.append(key.strip())
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"--api-key-file {args.api_key_file!r} cannot be read ({exc})") from None
        found = [line.strip() for line in lines if line.strip()]
        if not found:
            raise ConfigurationError(f"--api-key-file {args.api_key_file!r} holds no key; write one key a line")
        keys += found
    variable = os.environ.get(API_KEY_VARIABLE)
    if variable is not None:
        found = [key.strip() for key in variable.split(",") if key.strip()]
        if not found:
            raise ConfigurationError(
                f"${API_KEY_VARIABLE} is set but holds no key; set it to KEY (or KEY1,KEY2), or unset it for an "
                "open server"
            )
        keys += found
    return keys


def collection_from_args(
    args: argparse.Namespace, options: dict[str, Any]
) -> tuple[Store, str, Callable[[], E5VEmbedder]]:
    """The store of ``--db``, its model's name, and how to load that model with the
    collection's revision, dtype and prompts (as ``e5v search`` does). Raises
    :class:`~e5v.collection.repository.StoreError` for a missing or empty collection, or another ``--model``."""
    from e5v.collection.repository import Store
    from e5v.errors import StoreError

    store = Store(args.db or ".", args.collection, url=args.chroma_url)
    if store.count() == 0:
        where, option = (args.db, "--db") if args.chroma_url is None else (args.chroma_url, "--chroma-url")
        raise StoreError(
            f"collection {args.collection!r} in {where!r} holds no records yet; index files first with "
            f"`e5v index PATH {option} {where} --collection {args.collection}`"
        )
    model = store.model(args.model, args.revision)
    load = store.loader(model, device=args.device, dtype=args.dtype, batch_size=args.batch_size, **options)
    return store, model, load
