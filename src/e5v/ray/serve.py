"""``e5v serve`` as Ray Serve replicas: the server's own FastAPI app, N times.

Each replica is one process holding one embedder and the app of
:func:`e5v.server.app.create_app` with its own cross-request scheduler, so every route,
limit, key check and error shape is the single server's. A replica reports itself started
only once its model has loaded (Ray routes to it from then on), its ``check_health`` fails
when the model or its scheduler stops, and every answer carries ``x-e5v-replica: ID``.
``/metrics`` is the answering replica's registry; Ray's own ``ray_serve_*`` metrics on each
node's metrics export port give the cluster's view.

From Python, on a running Ray cluster (``e5v serve --replicas N`` does this for you)::

    from ray import serve
    from e5v.ray.serve import ServeOptions, build_app

    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(build_app(ServeOptions(model="royokong/e5-v", replicas=4, gpus_per_replica=1)), name="e5v")

or with Ray's CLI and a config (``e5v serve --ray-config`` prints one; its ``import_path``
is ``e5v.ray.serve:build``, for ``serve run``/``serve deploy`` and a KubeRay RayService)::

    serve run e5v.ray.serve:build model=royokong/e5-v replicas=2
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator
from ray import serve

from e5v.client import API_KEY_ENV_VAR
from e5v.defaults import DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_MODEL
from e5v.errors import ConfigurationError, ModelLoadError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from e5v.core.embedder import E5VEmbedder

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "IMPORT_PATH", "REPLICA_HEADER", "ServeOptions", "build", "build_app"]

logger = logging.getLogger(__name__)

#: The Ray Serve application's and deployment's names, and the builder's import path.
APP_NAME = "e5v"
DEPLOYMENT_NAME = "E5V"
IMPORT_PATH = "e5v.ray.serve:build"
#: The response header naming the replica that answered.
REPLICA_HEADER = "x-e5v-replica"
#: Seconds between a loading replica's looks at its model.
_LOAD_POLL_S = 0.1
_REQUEST_ID = b"x-request-id"


class ServeOptions(BaseModel):
    """What the replicas serve and how Ray runs them: ``e5v serve``'s options, as
    ``serve run e5v.ray.serve:build KEY=VALUE`` or a config's ``args`` give them.

    Lists (``api_keys``, ``allowed_hosts``, ``cors_origins``) may be given as one
    comma-separated string. Keys are best left out of a config: each replica also accepts
    those of the environment variable ``api_key_env_var`` (comma-separated), as
    ``e5v serve`` does."""

    model_config = ConfigDict(extra="forbid")

    # the model (with a collection: checked against the collection's, which it defaults to)
    model: str | None = None
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: PositiveInt | Literal["auto"] = "auto"
    max_batch_tokens: PositiveInt | None = None
    served_model_name: str | None = None
    threads: PositiveInt | None = None  # torch's CPU threads in each replica (None: torch's own)
    # the collection of the search page: a Chroma server (any number of replicas) or a folder (one)
    chroma_url: str | None = None
    db: str | None = None
    collection: str = "e5v"
    # the app's keys and limits, per replica (e5v.server.app.ServerConfig)
    api_keys: list[str] = Field(default_factory=list)
    api_key_env_var: str | None = API_KEY_ENV_VAR
    max_concurrent_requests: PositiveInt = 512
    max_client_batch_size: PositiveInt = 256
    payload_limit: PositiveInt = 16 * 1024 * 1024
    max_request_pixels: PositiveInt = DEFAULT_MAX_REQUEST_PIXELS
    body_timeout: PositiveFloat = 30.0
    allowed_hosts: list[str] | None = None
    cors_origins: list[str] = Field(default_factory=list)
    allow_remote_images: bool = False
    access_log: bool = False
    batching: bool = True
    # Ray: a fixed number of replicas, or autoscaling between min and max
    replicas: PositiveInt = 1
    autoscale: bool = False
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: PositiveInt = 2
    target_ongoing_requests: PositiveFloat = 2.0
    gpus_per_replica: float = Field(default=0.0, ge=0)
    graceful_shutdown_timeout: PositiveFloat = 10.0
    health_check_period: PositiveFloat = 10.0
    health_check_timeout: PositiveFloat = 30.0

    @field_validator("api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def checked(self) -> ServeOptions:
        """These options, or a :class:`~e5v.errors.ConfigurationError` for a combination
        the replicas cannot serve."""
        if self.db is not None and self.chroma_url is not None:
            raise ConfigurationError("`db` and `chroma_url` both name a collection's database; give one of them")
        if self.autoscale and self.min_replicas > self.max_replicas:
            raise ConfigurationError(
                f"`min_replicas` {self.min_replicas} is over `max_replicas` {self.max_replicas}; give a range"
            )
        if self.db is not None and self.most_replicas > 1:
            raise ConfigurationError(
                "`chroma run --path DIR` serves a Chroma folder to any number of replicas, given its URL as "
                f"`chroma_url`; `db` {self.db} is a folder one process only may open, and each replica would open its "
                "own (or run one replica)"
            )
        return self

    @property
    def most_replicas(self) -> int:
        """The replicas there may be at once: ``replicas``, or ``max_replicas`` when autoscaling."""
        return self.max_replicas if self.autoscale else self.replicas

    def deployment_options(self) -> dict[str, Any]:
        """The Ray Serve deployment's options: replicas or autoscaling, each replica's CPUs
        (``threads``, else 1) and GPUs, drain and health-check times, and Ray's own per-request access log only
        with ``access_log`` (each line costs the replica's process time). Ray routes a replica up
        to twice ``max_concurrent_requests`` at once, so the app's own 429 answers those
        beyond its limit and probes still pass."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": 2 * self.max_concurrent_requests,
            "ray_actor_options": {"num_cpus": self.threads or 1, "num_gpus": self.gpus_per_replica},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout,
            "health_check_period_s": self.health_check_period,
            "health_check_timeout_s": self.health_check_timeout,
            "logging_config": {"enable_access_log": self.access_log},
        }
        if self.autoscale:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options

    def keys(self) -> list[str]:
        """``api_keys`` and those of ``api_key_env_var``; raises :class:`~e5v.errors.ConfigurationError`
        for a variable that is set but holds no key."""
        keys = [key.strip() for key in self.api_keys]
        variable = None if self.api_key_env_var is None else os.environ.get(self.api_key_env_var)
        if variable is not None:
            found = [key.strip() for key in variable.split(",") if key.strip()]
            if not found:
                raise ConfigurationError(
                    f"${self.api_key_env_var} is set but holds no key; set it to KEY (or KEY1,KEY2), or unset it"
                )
            keys += [key for key in found if key not in keys]
        return keys


def build_app(options: ServeOptions) -> serve.Application:
    """The Ray Serve application of ``options``: run it with ``serve.run(..., name=APP_NAME)``.
    Raises :class:`~e5v.errors.ConfigurationError` for options the replicas cannot serve."""
    options.checked()
    return E5VReplica.options(**options.deployment_options()).bind(options.model_dump())


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder of :data:`IMPORT_PATH`: ``args`` are :class:`ServeOptions`' fields."""
    return build_app(ServeOptions.model_validate(args))


@serve.deployment
@serve.ingress()
class E5VReplica:
    """One replica: the server's app around one embedder, started once the model has loaded."""

    async def __init__(self, options: dict[str, Any]) -> None:
        self._options = ServeOptions.model_validate(options)
        if self._options.threads is not None:
            import torch

            torch.set_num_threads(self._options.threads)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from e5v.server.app import ServerConfig, create_app

        options = self._options
        store, model, load = _collection(options) if _serves_collection(options) else _model(options)
        config = ServerConfig(
            model_name=options.served_model_name or model,
            load=load,
            store=store,
            api_keys=options.keys(),
            max_concurrent_requests=options.max_concurrent_requests,
            max_client_batch_size=options.max_client_batch_size,
            payload_limit=options.payload_limit,
            max_request_pixels=options.max_request_pixels,
            allow_remote_images=options.allow_remote_images,
            batching=options.batching,
            body_timeout=options.body_timeout,
            allowed_hosts=options.allowed_hosts,
            cors_origins=options.cors_origins,
            access_log=options.access_log,
        )
        app = create_app(config)
        started = app.router.lifespan_context

        @asynccontextmanager
        async def loaded(app: FastAPI) -> AsyncIterator[Any]:
            """The app's lifespan, its start-up done once the model has loaded or failed to
            (then Ray's first health check fails the replica, saying why)."""
            async with started(app) as state:
                while await self._problem() == "loading":
                    await asyncio.sleep(_LOAD_POLL_S)
                yield state

        app.router.lifespan_context = loaded
        self._app = app
        return _ReplicaHeader(app, self._replica)

    async def check_health(self) -> None:
        """Raise unless the model has loaded and its scheduler serves (Ray then replaces the replica)."""
        problem = await self._problem()
        if problem is not None:
            raise ModelLoadError(f"replica {self._replica} is not ready: {problem}")

    async def _problem(self) -> str | None:
        """``None`` when the app's readiness probe (its ``/ready``) says ready, ``"loading"``
        while the model loads, else why not."""
        assert self._app is not None
        answer = await self._app.state.ready()
        if answer.status_code == 200:
            return None
        said = json.loads(answer.body)
        return "loading" if said["status"] == "loading" else str(said["error"])


class _ReplicaHeader:
    """Add ``x-e5v-replica: ID`` to every HTTP answer, and leave its ``x-request-id`` to Ray's
    proxy, which sends the request's own (or a new one) on every answer."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() != _REQUEST_ID]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, tagged)


def _serves_collection(options: ServeOptions) -> bool:
    return options.db is not None or options.chroma_url is not None


def _embedder_options(options: ServeOptions) -> dict[str, Any]:
    extra: dict[str, Any] = {"allow_remote": options.allow_remote_images}
    if options.max_batch_tokens is not None:
        extra["max_batch_tokens"] = options.max_batch_tokens
    return extra


def _model(options: ServeOptions) -> tuple[None, str, Any]:
    """No collection: the model of ``model`` (the default's without)."""
    from e5v.core.embedder import E5VEmbedder

    model = options.model or DEFAULT_MODEL

    def load() -> E5VEmbedder:
        return E5VEmbedder(
            model,
            revision=options.revision,
            device=options.device,
            dtype=options.dtype,
            batch_size=options.batch_size,
            **_embedder_options(options),
        )

    return None, model, load


def _collection(options: ServeOptions) -> tuple[Any, str, Any]:
    """The collection's store, its model, and how to load that model with the collection's
    revision, dtype and prompts (as the single server does)."""
    from e5v.collection.repository import Store

    store = Store(options.db or ".", options.collection, url=options.chroma_url)
    model = store.model(options.model, options.revision)
    load = store.loader(
        model, device=options.device, dtype=options.dtype, batch_size=options.batch_size, **_embedder_options(options)
    )
    return store, model, load
