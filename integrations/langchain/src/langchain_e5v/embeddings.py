"""``E5VEmbeddings``: LangChain ``Embeddings`` backed by :class:`e5v.E5VEmbedder` or an ``e5v serve``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from e5v import DEFAULT_MODEL, Interleaved, RemoteEmbedder
from e5v.client import API_KEY_ENV_VAR
from e5v.core.inputs import ImageLike
from e5v.core.protocol import Embedder

__all__ = ["E5VEmbeddings"]

#: Fields that say how to load the model; they cannot be combined with ``embedder=``.
_LOADING_FIELDS = frozenset(
    {"model", "model_name", "device", "dtype", "revision", "cache_dir", "model_kwargs", "embedder_kwargs"}
)
#: Fields that say which server to call; they need ``base_url`` and cannot be combined with ``embedder=``.
_REMOTE_FIELDS = frozenset({"base_url", "api_key", "api_key_env_var"})
#: ``RemoteEmbedder`` options ``embedder_kwargs`` may hold with ``base_url``.
_REMOTE_OPTIONS = frozenset({"prompts", "timeout", "retries", "max_retry_after"})
#: ``E5VEmbedder`` options set from fields, so not allowed in ``embedder_kwargs``.
_FIELD_OPTIONS = frozenset(
    {
        "model_name_or_path",
        "device",
        "dtype",
        "batch_size",
        "revision",
        "cache_dir",
        "model_kwargs",
        "show_progress_bar",
    }
)


class E5VEmbeddings(BaseModel, Embeddings):
    """E5-V embeddings for LangChain: texts, images, interleaved and composed inputs in one space.

    Build it by name (``model_name``, a hub id or a local directory) with the loading
    options below, wrap an existing :class:`e5v.E5VEmbedder` or :class:`e5v.RemoteEmbedder`
    with ``embedder=``, or give ``base_url`` to embed through an ``e5v serve`` instead of
    loading a model (``model_name`` is then the server's). Adapters built by name for the
    same model, device and dtype share one loaded model.

    ``embed_image`` is the method ``langchain_chroma.Chroma.add_images`` and
    ``similarity_search_by_image`` call. Every method returns lists of Python floats;
    the ``aembed_*`` methods run the model on an executor thread, off the event loop (remote: they are
    :class:`e5v.RemoteEmbedder`'s async calls).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model_name: str = Field(default=DEFAULT_MODEL, alias="model")
    """Hub id or local directory of the checkpoint; with ``base_url``, the server's model."""
    device: str | None = None
    """``"cuda"``, ``"cuda:1"``, ``"cpu"``...; ``None``: CUDA when available, else CPU."""
    dtype: str | None = None
    """``"bfloat16"``, ``"float16"`` or ``"float32"``; ``None``: bfloat16 on GPU, float32 on CPU."""
    batch_size: int | None = Field(default=None, ge=1)
    """Most items per forward pass (with ``base_url``: per request); ``None``: the embedder's
    (built by name: 16 on CPU, 256 on GPU; remote: the server's ``max_client_batch_size``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the checkpoint."""
    cache_dir: str | None = None
    """Hugging Face cache directory."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for transformers' ``from_pretrained`` (``E5VEmbedder(model_kwargs=...)``)."""
    embedder_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other :class:`e5v.E5VEmbedder` options: ``prompts``, ``adapter``, ``device_map``, ``max_batch_tokens``,
    ``allow_remote``, ``max_image_pixels``, ``max_text_tokens``, ``allow_pickle``; with ``base_url``, the
    :class:`e5v.RemoteEmbedder` options ``prompts`` (a preset name the server knows), ``timeout`` (seconds a call
    may take in all), ``retries``, ``max_retry_after``."""
    show_progress: bool | None = None
    """Show a progress bar while embedding; ``None``: the embedder's setting."""
    base_url: str | None = None
    """URL of an ``e5v serve`` (``http://host:port``) to embed through instead of loading a model."""
    api_key: SecretStr | None = None
    """API key for ``base_url``; ``None``: the value of the variable ``api_key_env_var``, if set."""
    api_key_env_var: str = API_KEY_ENV_VAR
    """Environment variable holding the API key when ``api_key`` is ``None``."""

    _embedder: Embedder = PrivateAttr()

    def __init__(self, *, embedder: Embedder | None = None, **data: Any) -> None:
        if embedder is not None:
            self._wrap(embedder, data)
        elif data.get("base_url") is not None:
            self._connect(data)
        else:
            stray = sorted((_REMOTE_FIELDS - {"base_url"}) & data.keys())
            if stray:
                raise ValueError(f"E5VEmbeddings got {stray} without base_url; they say how to reach an e5v server")
            super().__init__(**data)
            from e5v import E5VEmbedder

            self._embedder = E5VEmbedder(
                self.model_name,
                device=self.device,
                dtype=self.dtype,
                revision=self.revision,
                cache_dir=self.cache_dir,
                model_kwargs=self.model_kwargs,
                **({} if self.batch_size is None else {"batch_size": self.batch_size}),
                **self.embedder_kwargs,
            )

    def _wrap(self, embedder: Embedder, data: dict[str, Any]) -> None:
        """Adopt a built embedder; its settings fill the fields that describe it."""
        conflicts = sorted((_LOADING_FIELDS | _REMOTE_FIELDS) & data.keys())
        if conflicts:
            raise ValueError(
                f"E5VEmbeddings got embedder= and loading options {conflicts}; the embedder is already built, "
                "so pass either embedder= or the loading options, not both"
            )
        described: dict[str, Any] = {}
        if isinstance(embedder, RemoteEmbedder):
            described = {"base_url": embedder.base_url}
        else:
            from e5v import E5VEmbedder

            if isinstance(embedder, E5VEmbedder):
                described = {
                    "device": str(embedder.device),
                    "dtype": str(embedder.dtype).removeprefix("torch."),
                    "revision": embedder.revision,
                }
        super().__init__(model_name=embedder.model_name, **described, **data)
        self._embedder = embedder

    def _connect(self, data: dict[str, Any]) -> None:
        """Embed through the ``e5v serve`` at ``base_url``; ``model_name`` becomes the server's."""
        conflicts = sorted((_LOADING_FIELDS - {"embedder_kwargs"}) & data.keys())
        if conflicts:
            raise ValueError(
                f"E5VEmbeddings got base_url= and loading options {conflicts}; the server at base_url has loaded "
                "its model, so pass either base_url= or the loading options, not both"
            )
        super().__init__(**data)
        unknown = sorted(self.embedder_kwargs.keys() - _REMOTE_OPTIONS)
        if unknown:
            raise ValueError(
                f"embedder_kwargs {unknown} do not apply with base_url; it takes only {sorted(_REMOTE_OPTIONS)} "
                "(set the model's options on the server, `e5v serve`)"
            )
        remote = RemoteEmbedder(
            self.base_url,
            api_key=None if self.api_key is None else self.api_key.get_secret_value(),
            api_key_env_var=self.api_key_env_var,
            **self.embedder_kwargs,
        )
        self.model_name = remote.model_name
        self._embedder = remote

    @field_validator("embedder_kwargs")
    @classmethod
    def _no_duplicate_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        duplicated = sorted(_FIELD_OPTIONS & value.keys())
        if duplicated:
            raise ValueError(f"embedder_kwargs must not hold {duplicated}; set them as E5VEmbeddings fields")
        return value

    @property
    def embedder(self) -> Embedder:
        """The :class:`e5v.E5VEmbedder` or :class:`e5v.RemoteEmbedder` doing the work."""
        return self._embedder

    @property
    def dimension(self) -> int:
        """Vector size (4096 for E5-V)."""
        return self._embedder.dimension

    def _options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "show_progress_bar": self.show_progress}

    # -- LangChain Embeddings -------------------------------------------------------

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed texts, one vector each."""
        return _floats(self._embedder.embed_texts(texts, **self._options()))

    def embed_query(self, text: str) -> list[float]:
        """Embed one text (E5-V embeds queries and documents alike)."""
        return self.embed_documents([text])[0]

    # -- images, interleaved and composed inputs ------------------------------------

    def embed_image(self, uris: Sequence[ImageLike]) -> list[list[float]]:
        """Embed images: file paths (``str``), or any image-like :class:`e5v.E5VEmbedder` takes
        (a remote embedder reads files here and sends their bytes).

        All of them in one call; the embedder batches them by ``batch_size``.
        """
        return _floats(self._embedder.embed_images(uris, **self._options()))

    def embed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]]) -> list[list[float]]:
        """Embed interleaved items (an :class:`e5v.Interleaved` or a list of text and image parts), one vector
        each."""
        return _floats(self._embedder.embed_interleaved(items, **self._options()))

    def embed_composed(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[list[float]]:
        """Embed composed queries: ``images[i]`` modified as ``texts[i]`` says."""
        return _floats(self._embedder.embed_composed(images, texts, **self._options()))

    # -- async: the remote embedder's own async calls, else the model on an executor thread --

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """:meth:`embed_documents` without blocking the event loop."""
        if isinstance(self._embedder, RemoteEmbedder):
            return _floats(await self._embedder.aembed_texts(texts, **self._options()))
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """:meth:`embed_query` without blocking the event loop."""
        return (await self.aembed_documents([text]))[0]

    async def aembed_image(self, uris: Sequence[ImageLike]) -> list[list[float]]:
        """:meth:`embed_image` without blocking the event loop."""
        if isinstance(self._embedder, RemoteEmbedder):
            return _floats(await self._embedder.aembed_images(uris, **self._options()))
        return await run_in_executor(None, self.embed_image, uris)

    async def aembed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]]) -> list[list[float]]:
        """:meth:`embed_interleaved` without blocking the event loop."""
        if isinstance(self._embedder, RemoteEmbedder):
            return _floats(await self._embedder.aembed_interleaved(items, **self._options()))
        return await run_in_executor(None, self.embed_interleaved, items)

    async def aembed_composed(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[list[float]]:
        """:meth:`embed_composed` without blocking the event loop."""
        if isinstance(self._embedder, RemoteEmbedder):
            return _floats(await self._embedder.aembed_composed(images, texts, **self._options()))
        return await run_in_executor(None, self.embed_composed, images, texts)


def _floats(vectors: np.ndarray) -> list[list[float]]:
    return vectors.tolist()
