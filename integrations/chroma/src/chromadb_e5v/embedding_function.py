"""``E5VEmbeddingFunction``: Chroma documents and images embedded by E5-V into one space."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from chromadb.api.types import Embeddable, EmbeddingFunction, Embeddings, Space, is_document, is_image
from chromadb.utils.embedding_functions import register_embedding_function

from e5v import DEFAULT_MODEL, E5VEmbedder, Embedder, InvalidInputError, PromptSet, RemoteEmbedder
from e5v.client import API_KEY_ENV_VAR
from e5v.collection.binding import FUNCTION_NAME, Binding, dtype_name, model_key, prompts_config, served_identity
from e5v.core.batching import check_batch_size
from e5v.core.inputs import describe
from e5v.core.prompts import get_prompts
from e5v.errors import ConfigurationError
from e5v.model.identity import model_identity
from e5v.model.loading import resolve_device, resolve_dtype

__all__ = ["E5VEmbeddingFunction", "clear_cache"]

logger = logging.getLogger(__name__)

# Embedders shared by every function of this process: Chroma rebuilds the function
# from its config on each add and query of a collection opened without one.
# (model_name, revision, resolved dtype, prompts) -> {device: embedder}
_EMBEDDERS: dict[tuple[Any, ...], dict[str, E5VEmbedder]] = {}
_EMBEDDERS_LOCK = threading.Lock()


@register_embedding_function
class E5VEmbeddingFunction(EmbeddingFunction[Embeddable]):
    """E5-V for Chroma: documents (``str``) and images (numpy arrays, as Chroma and its
    ``ImageLoader`` pass them) into one space, queried with cosine distance.

    Pass a model name (a hub id or a local directory; ``None``: ``e5v.DEFAULT_MODEL``)
    and options, or a ready :class:`e5v.E5VEmbedder` as ``embedder``. Functions of one
    process for the same model, revision, dtype and prompts share one embedder, and so
    one loaded model. The config persisted with a collection holds the model name,
    revision, dtype (``None``: the device's default; with ``embedder``, its dtype), batch
    size (``"auto"``: the embedder's, by default 16 items on CPU and 256 on GPU) and
    prompts, never the device: a collection reopened without the function (after
    ``import chromadb_e5v``) reuses this process's embedder for that config, or loads
    the model on the default device of the machine that opens it. The config also holds
    the model's identity (``model_id``, see :mod:`e5v.model.identity`): the same
    checkpoint moved or copied elsewhere is the same model.

    Remote mode: with ``base_url`` an ``e5v serve`` embeds (through
    :class:`e5v.RemoteEmbedder`) and no model is loaded here. The key is ``api_key``,
    else the value of the variable ``api_key_env_var``; the config holds ``base_url``
    and ``api_key_env_var``, never the key, so a reopened collection reads the key from
    that variable. The model name is the server's (``model_name``, if given, must be
    it: checked on first use; without it, the config holds the server's model and its
    ``model_id``); ``prompts`` is a preset name the server applies (``None``:
    ``"e5v"``); ``device``, ``dtype``, ``revision`` and ``embedder`` do not apply.
    """

    def __init__(
        self,
        model_name: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | Literal["auto"] = "auto",
        revision: str | None = None,
        prompts: str | PromptSet | None = None,
        embedder: E5VEmbedder | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env_var: str = API_KEY_ENV_VAR,
    ) -> None:
        check_batch_size(batch_size)
        self.batch_size = batch_size
        self._embedder: Embedder | None = embedder
        self._remote: RemoteEmbedder | None = None
        self._api_key_env_var = api_key_env_var
        self._model_id: str | None = None
        self._identify = True  # find model_id on first use (not for a config persisted without one)
        if base_url is not None:
            _check_remote_options(device=device, dtype=dtype, revision=revision, embedder=embedder)
            self._prompts = get_prompts(prompts)
            preset = prompts_config(self._prompts)
            if not isinstance(preset, str):
                raise ValueError(
                    "with base_url, prompts must be a preset name the server knows (e.g. 'e5v', 'cirr'); "
                    "custom prompt sets embed in-process only"
                )
            self._remote = RemoteEmbedder(base_url, api_key, api_key_env_var=api_key_env_var, prompts=preset)
            self._model_name: str | None = None if model_name is None else str(model_name)
            self._revision: str | None = None
            self._dtype: str | None = None
            self._device: str | torch.device | None = None
        elif api_key is not None or api_key_env_var != API_KEY_ENV_VAR:
            raise ValueError("api_key and api_key_env_var are for an e5v server: pass base_url too")
        elif embedder is not None:
            _check_embedder_options(embedder, model_name, device, dtype, revision, prompts)
            self._dtype = dtype_name(embedder.dtype)
            self._model_name = model_key(embedder.model_name)
            self._revision = embedder.revision
            self._prompts = embedder.prompts
            self._device = embedder.device
            _share(embedder)
        else:
            self._dtype = None if dtype is None else dtype_name(dtype)
            self._model_name = model_key(DEFAULT_MODEL if model_name is None else model_name)
            self._revision = revision
            self._prompts = get_prompts(prompts)
            self._device = device

    @property
    def embedder(self) -> Embedder:
        """The shared :class:`e5v.E5VEmbedder`, loaded on first use (Chroma rebuilds the
        function on every add, also when the caller passes ``embeddings=``), or in remote
        mode the :class:`e5v.RemoteEmbedder`, once the server's model is checked."""
        if self._embedder is None:
            if self._remote is not None:
                self._embedder = _checked(self._remote, self._model_name)
                self._model_name = self._remote.model_name
            else:
                assert self._model_name is not None  # in-process, it is always set
                self._embedder = _shared_embedder(
                    self._model_name, self._revision, self._dtype, self._prompts, self._device
                )
        return self._embedder

    # -- embedding --------------------------------------------------------------------

    def __call__(self, input: Embeddable) -> Embeddings:
        """Embed documents and/or images (HxW, HxWx3 or HxWx4 arrays), in input order.

        Raises :class:`e5v.InvalidInputError` naming the first item that is neither.
        """
        items = list(input)
        for index, item in enumerate(items):
            if not (is_document(item) or is_image(item)):
                raise InvalidInputError(
                    f"Chroma can embed documents (str) and images (numpy arrays HxW, HxWx3 or HxWx4), "
                    f"got {describe(item)}; check the documents, images or uris you passed",
                    index=index,
                )
        return self._run(self.embedder.embed, items)

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str]) -> Embeddings:
        """Composed queries (``images[i]`` changed as ``texts[i]`` says), to pass as
        ``collection.query(query_embeddings=...)``."""
        return self._run(self.embedder.embed_composed, images, texts)

    def embed_interleaved(self, items: Sequence[Any]) -> Embeddings:
        """Interleaved items (``e5v.Interleaved`` or sequences of texts and images), one
        vector each, to pass as ``collection.query(query_embeddings=...)``."""
        return self._run(self.embedder.embed_interleaved, items)

    def _run(self, embed: Callable[..., np.ndarray], *args: Any) -> Embeddings:
        """``embed(*args)`` at this function's batch size (``"auto"``: the embedder's); a
        key the server refuses names the variable the key is read from."""
        try:
            return list(embed(*args, batch_size=None if self.batch_size == "auto" else self.batch_size))
        except ConfigurationError as exc:
            if self._remote is None:
                raise
            raise ConfigurationError(
                f"{exc}; set {self._api_key_env_var} to the server's key (or pass api_key=)"
            ) from None

    # -- Chroma's config protocol -----------------------------------------------------

    @staticmethod
    def name() -> str:
        return FUNCTION_NAME

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        """Unit vectors: cosine, inner product and L2 rank alike."""
        return ["cosine", "ip", "l2"]

    @property
    def binding(self) -> Binding:
        """What this function's vectors come from; in remote mode without ``model_name``,
        asks the server for its model."""
        remote = self._remote
        if self._identify and remote is None and self._model_name is not None:
            self._model_id, self._identify = model_identity(self._model_name), False
        elif self._identify and remote is not None and self._model_name is None:
            self.embedder  # noqa: B018 - checks the server, which says its model and identity
            self._model_id, self._identify = served_identity(remote), False
        return Binding(
            self._model_name if self._model_name is not None else self.embedder.model_name,
            revision=self._revision,
            dtype=self._dtype,
            batch_size=self.batch_size,
            prompts=self._prompts,
            base_url=None if remote is None else remote.base_url,
            api_key_env_var=None if remote is None else self._api_key_env_var,
            model_id=self._model_id,
        )

    def get_config(self) -> dict[str, Any]:
        """The persisted config: :meth:`e5v.collection.binding.Binding.to_config`."""
        return self.binding.to_config()

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> E5VEmbeddingFunction:
        """The function a config describes, on this machine's default device (the
        embedder is shared, so rebuilding never loads the model again), or through the
        config's server, with the key read from its ``api_key_env_var``."""
        binding = Binding.from_config(config)
        function = E5VEmbeddingFunction(
            binding.model,
            revision=binding.revision,
            dtype=binding.dtype,
            batch_size=binding.batch_size,
            prompts=binding.prompts,
            base_url=binding.base_url,
            api_key_env_var=binding.api_key_env_var or API_KEY_ENV_VAR,
        )
        function._model_id, function._identify = binding.model_id, False  # as persisted: an old config stays so
        return function

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        """``ValueError`` naming what is wrong with a persisted config."""
        Binding.from_config(config)

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        """Refuse a change of model (its identity), revision or prompts: the stored vectors
        would no longer match new ones. dtype, batch size, base_url (another server of the
        same model, or in-process), api_key_env_var and model_name (the same model moved)
        may change."""
        old, new = Binding.from_config(old_config), Binding.from_config(new_config)
        for key in old.differences(new):
            name = "model_name" if key == "model_id" and not (old.model_id and new.model_id) else key
            raise ValueError(
                f"cannot change the e5v {name} of a collection from {old_config.get(name)!r} to "
                f"{new_config.get(name)!r}: its stored vectors come from the old one; create a new collection"
            )

    def __repr__(self) -> str:
        if self._remote is not None:
            return f"E5VEmbeddingFunction(base_url={self._remote.base_url!r}, batch_size={self.batch_size!r})"
        return f"E5VEmbeddingFunction({self._model_name!r}, dtype={self._dtype!r}, batch_size={self.batch_size!r})"


def clear_cache() -> None:
    """Forget the shared embedders; their models are freed once no function holds them
    (also call ``e5v.model.loading.clear_cache()``)."""
    with _EMBEDDERS_LOCK:
        _EMBEDDERS.clear()


def _key(model_name: str, revision: str | None, dtype: torch.dtype, prompts: PromptSet) -> tuple[Any, ...]:
    return (model_name, revision, dtype, prompts)


def _share(embedder: E5VEmbedder) -> None:
    """Offer a caller's embedder to functions rebuilt from the same config."""
    key = _key(model_key(embedder.model_name), embedder.revision, embedder.dtype, embedder.prompts)
    with _EMBEDDERS_LOCK:
        _EMBEDDERS.setdefault(key, {}).setdefault(str(embedder.device), embedder)


def _shared_embedder(
    model_name: str,
    revision: str | None,
    dtype: str | None,
    prompts: PromptSet,
    device: str | torch.device | None,
) -> E5VEmbedder:
    """The process's embedder for these options: any device when ``device`` is None."""
    resolved = resolve_device(device)
    key = _key(model_name, revision, resolve_dtype(dtype, resolved), prompts)
    with _EMBEDDERS_LOCK:
        by_device = _EMBEDDERS.setdefault(key, {})
        if device is None and by_device:
            return next(iter(by_device.values()))
        if str(resolved) in by_device:
            return by_device[str(resolved)]
        embedder = E5VEmbedder(model_name, device=device, dtype=dtype, revision=revision, prompts=prompts)
        by_device[str(resolved)] = embedder
        logger.debug("e5v embedding function: new embedder %r", embedder)
        return embedder


def _checked(remote: RemoteEmbedder, expected: str | None) -> RemoteEmbedder:
    """``remote``, once its server is known to serve ``expected`` (``None``: any model)."""
    if expected is not None and remote.model_name != expected:
        raise ConfigurationError(
            f"the e5v server at {remote.base_url} serves {remote.model_name!r}, not {expected!r}: their vectors do "
            f"not compare. Point base_url at a server of {expected!r}, or create a new collection for the other model"
        )
    return remote


def _check_remote_options(**options: object) -> None:
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(
            f"with base_url the e5v server embeds with its own model, so {', '.join(given)} would be ignored; "
            "drop them, or drop base_url to load the model here"
        )


def _check_embedder_options(
    embedder: E5VEmbedder,
    model_name: str | Path | None,
    device: object,
    dtype: object,
    revision: str | None,
    prompts: object,
) -> None:
    given = {"device": device, "dtype": dtype, "revision": revision, "prompts": prompts}
    clashing = [name for name, value in given.items() if value is not None]
    if model_name is not None and model_key(model_name) != model_key(embedder.model_name):
        clashing.insert(0, "model_name")
    if clashing:
        raise ValueError(
            f"pass either embedder= or model options, not both: {', '.join(clashing)} would be ignored; "
            "set them on the E5VEmbedder instead"
        )
