"""``e5v serve --replicas N`` / ``--ray``: the server's app as Ray Serve replicas (:mod:`e5v.ray.serve`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from e5v.cli.serve import collection_from_args, listen, say_what_is_served, server_url
from e5v.errors import ModelLoadError

if TYPE_CHECKING:
    from e5v.ray.serve import ServeOptions

__all__ = ["serve_replicas"]

logger = logging.getLogger("e5v.cli.serve")

#: Seconds a Ray cluster's address has to accept a connection before --ray-address is refused.
JOIN_PROBE_S = 10.0

#: Seconds past --graceful-shutdown-timeout that stopping Serve and Ray may take before e5v exits anyway.
STOP_MARGIN_S = 30.0


def serve_replicas(args: argparse.Namespace, keys: list[str]) -> int:
    """Serve ``args`` as Ray Serve replicas until SIGTERM or SIGINT (or print their config)."""
    from e5v.optional import require

    require("ray.serve", "ray")
    options = serve_options(args, keys)
    if not args.quiet:  # the start-up and ready lines, without -v
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    if args.ray_config:
        print_config(args, options)
        return 0
    if args.ray_address is not None:
        _reachable(args.ray_address)
    listener = listen(args.host, args.port)  # a port in use is said before Ray starts
    port = listener.getsockname()[1]
    try:
        if args.db is not None or args.chroma_url is not None:
            store, model, _ = collection_from_args(
                args, {}
            )  # a missing collection or another model: said before Ray starts
        else:
            store, model = None, options.model
        assert model is not None
        say_what_is_served(args, model, options.served_model_name or model, keys, store, listener)
    finally:
        listener.close()  # Ray's proxy binds it
    return _run(args, options, port)


def serve_options(args: argparse.Namespace, keys: list[str]) -> ServeOptions:
    """The replicas' options from the command line; raises :class:`~e5v.errors.ConfigurationError`."""
    from e5v.defaults import DEFAULT_MODEL
    from e5v.ray.serve import ServeOptions
    from e5v.server.http import allowed_hosts

    gpus = args.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if (args.device or "").startswith("cuda") else 0.0
    served = args.db is not None or args.chroma_url is not None
    scaling = {
        name: getattr(args, name)
        for name in ("min_replicas", "max_replicas", "target_ongoing_requests")
        if getattr(args, name) is not None
    }
    options = ServeOptions(
        model=args.model if served else args.model or DEFAULT_MODEL,
        revision=args.revision,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        served_model_name=args.served_model_name,
        threads=args.threads,
        chroma_url=args.chroma_url,
        db=None if args.db is None else os.path.abspath(args.db),
        collection=args.collection,
        api_keys=keys,
        api_key_env_var=None,  # the keys of $E5V_API_KEY are in `keys` already
        max_concurrent_requests=args.max_concurrent_requests,
        max_client_batch_size=args.max_client_batch_size,
        payload_limit=args.payload_limit,
        max_request_pixels=args.max_request_pixels,
        body_timeout=args.body_timeout,
        allowed_hosts=allowed_hosts(args.host, keyed=bool(keys), extra=args.allowed_hosts),
        cors_origins=args.cors_origin,
        allow_remote_images=args.allow_remote_images,
        access_log=args.access_log,
        batching=args.batching,
        replicas=args.replicas or 1,
        autoscale=args.ray,
        **scaling,
        gpus_per_replica=gpus,
        graceful_shutdown_timeout=args.graceful_shutdown_timeout,
        health_check_period=args.health_check_period,
        health_check_timeout=args.health_check_timeout,
    )
    return options.checked()


def print_config(args: argparse.Namespace, options: ServeOptions) -> None:
    """Print the Ray Serve config of ``options`` (``serve run``/``serve deploy``, a RayService's
    ``serveConfigV2``): the proxy's address and one application built by ``e5v.ray.serve:build``.
    Keys are left out: set ``$E5V_API_KEY`` in the replicas' environment."""
    import sys

    import yaml

    from e5v.ray.serve import APP_NAME, IMPORT_PATH, ServeOptions

    defaults = ServeOptions()
    left_out = {"api_keys", "api_key_env_var"}
    if not options.autoscale:
        left_out |= {"min_replicas", "max_replicas", "target_ongoing_requests"}
    given = {
        name: value for name, value in options.model_dump(exclude=left_out).items() if value != getattr(defaults, name)
    }
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": args.host, "port": args.port, "keep_alive_timeout_s": _whole(args.keep_alive_timeout)},
        "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": given}],
    }
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))


def _run(args: argparse.Namespace, options: ServeOptions, port: int) -> int:
    """Start (or join) Ray, run the application, say it is ready, and wait for a signal."""
    import ray
    from ray import serve

    from e5v.ray.serve import APP_NAME, build_app

    if not args.verbose:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
    stop = threading.Event()
    handlers = {number: signal.signal(number, lambda *_: stop.set()) for number in (signal.SIGTERM, signal.SIGINT)}
    owned = args.ray_address is None
    started = time.perf_counter()
    serving = False  # whether this process started Ray Serve (and so stops it)
    try:
        if owned:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local cluster reports nothing anywhere
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)  # "token auth is on": it is
            replicas = options.most_replicas
            ray.init(
                address="local",
                num_cpus=max(os.cpu_count() or 1, replicas * (options.threads or 1)),
                include_dashboard=False,
                logging_level=logging.INFO if args.verbose else logging.WARNING,
                log_to_driver=bool(args.verbose),
                configure_logging=False,
            )
        else:
            _join(args.ray_address, bool(args.verbose))
        for number in handlers:  # ray.init installs its own
            signal.signal(number, lambda *_: stop.set())
        serving = True
        serve.start(
            http_options={"host": args.host, "port": port, "keep_alive_timeout_s": _whole(args.keep_alive_timeout)}
        )
        try:
            serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise ModelLoadError(f"the replicas did not start: {_reason(exc)}") from None
        _say_ready(args, options, port, time.perf_counter() - started)
        while not stop.wait(1.0):
            pass
        logger.info("stopping: requests in flight have %g s to finish", args.graceful_shutdown_timeout)
        return 0
    finally:
        for number in handlers:
            signal.signal(number, signal.SIG_IGN)  # a second signal does not cut the shutdown short
        _shutdown(args.graceful_shutdown_timeout + STOP_MARGIN_S, serving=serving, owned=owned)
        for number, handler in handlers.items():
            signal.signal(number, handler)


def _whole(seconds: float) -> int:
    """Seconds as Ray's proxy takes them: whole, at least 1."""
    return max(1, round(seconds))


def _join(address: str, verbose: bool) -> None:
    """Connect to the Ray cluster at ``address``; refused when it is unreachable or already runs Ray Serve."""
    import ray
    from ray import serve

    from e5v.errors import ConfigurationError

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose, configure_logging=False)
    except ConnectionError as exc:
        raise ConfigurationError(
            f"--ray-address {address}: {str(exc).rstrip('.')}. Start Ray there with `ray start --head`; "
            "a cluster with token authentication (`ray start`'s default once ~/.ray/auth_token exists) "
            "is joined with RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token) "
            "in this environment"
        ) from None
    running = serve.status()
    if not (running.proxies or running.applications):
        return  # no Serve instance yet: e5v starts one, and stops it when it stops
    raise ConfigurationError(
        f"--ray-address {address}: Ray Serve already runs on this cluster, on its own port and options; "
        "deploy e5v into it the Ray way (`e5v serve ... --ray-config > serve.yaml`, then `serve deploy serve.yaml`), "
        "or stop it first (`serve shutdown`)"
    )


def _reachable(address: str) -> None:
    """Refuse a ``host:port`` address where nothing listens (Ray would retry it for many minutes);
    ``auto`` and ``ray://`` addresses are Ray's to resolve."""
    import socket

    from e5v.errors import ConfigurationError

    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_PROBE_S).close()
    except OSError as exc:
        raise ConfigurationError(
            f"--ray-address {address}: nothing answers there ({exc.strerror or exc}); "
            "start Ray there with `ray start --head --port PORT`, or give the head node's GCS address"
        ) from None


def _shutdown(limit: float, *, serving: bool, owned: bool) -> None:
    """Stop what this process started within ``limit`` seconds, then leave Ray: on a cluster e5v
    started, its application (Ray stops the rest); on a joined one, the Serve instance it started."""
    import ray
    from ray import serve

    from e5v.ray.serve import APP_NAME

    def stop() -> None:
        try:
            if owned:
                serve.delete(APP_NAME)  # its replicas drain, then stop; ray.shutdown stops the rest of the cluster
            else:
                serve.shutdown()  # the application drains, then Serve's controller and proxies stop
        except Exception as exc:  # Ray's own failure to stop: said, and the cluster still goes
            logger.warning("Ray Serve did not stop cleanly: %s", exc)

    if serving:
        stopping = threading.Thread(target=stop, name="e5v-ray-stop", daemon=True)
        stopping.start()
        stopping.join(limit)
        if stopping.is_alive():
            logger.warning("Ray Serve did not stop within %g s; stopping Ray", limit)
    ray.shutdown()


def _reason(exc: BaseException) -> str:
    """Why the deployment failed: the e5v error its replicas raised (the last line of the
    deployment's status naming one), else Ray's own last line."""
    from ray import serve

    from e5v.ray.serve import APP_NAME, DEPLOYMENT_NAME

    said = str(exc)
    with contextlib.suppress(KeyError, RuntimeError):  # no status to read: Ray's exception says what there is
        said = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message or said
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    for line in reversed(lines):
        name, _, message = line.partition(": ")
        if name.startswith("e5v.errors.") and message:
            return message
    return lines[-1] if lines else type(exc).__name__


def _say_ready(args: argparse.Namespace, options: ServeOptions, port: int, took: float) -> None:
    """One ``ready`` line, from the application's ``/info`` (as a client sees it)."""
    import httpx

    url = server_url(args.host, port)
    info: dict[str, Any] = httpx.get(f"{url}/info", timeout=30).json()
    if options.autoscale:
        scale = f"{options.min_replicas} to {options.max_replicas} replicas (autoscaled)"
    else:
        scale = f"{options.replicas} replica{'' if options.replicas == 1 else 's'}"
    logger.info(
        "ready: %s, %s-d, on %s in %s, %s on Ray Serve, up in %.1f s",
        info.get("model"),
        info.get("dimension"),
        info.get("device"),
        info.get("dtype"),
        scale,
        took,
    )
