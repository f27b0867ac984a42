"""``E5VEmbedding``: E5-V as a LlamaIndex multimodal embedding model."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from e5v import DEFAULT_MODEL, E5VEmbedder, Interleaved, InvalidInputError, RemoteEmbedder
from e5v.client import API_KEY_ENV_VAR
from e5v.core.protocol import Embedder
from llama_index.core.base.embeddings.base import Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.embeddings import MultiModalEmbedding
from llama_index.core.schema import ImageDocument, ImageNode, ImageType, MetadataMode

__all__ = ["E5VEmbedding"]

logger = logging.getLogger(__name__)


class E5VEmbedding(MultiModalEmbedding):
    """E5-V embeddings for LlamaIndex: texts, queries and images in one space.

    One instance serves as both ``embed_model`` and ``image_embed_model`` of a
    ``MultiModalVectorStoreIndex``. Build it from a model name or local path (adapters
    with the same model, device and dtype share one loaded model), wrap an existing
    :class:`e5v.E5VEmbedder` with ``embedder=``, or give ``base_url=`` to embed through an
    ``e5v serve`` instead of loading a model (remote mode: the model name is the server's,
    and the key is ``api_key``, else the value of the variable ``api_key_env_var``; the
    key is never serialised, the URL and the variable's name are). Each call hands at most
    ``embed_batch_size`` items to the model (or the server) at a time, for texts and images
    alike (by default the embedder's batch size: 16 on CPU, 256 on GPU; remote, the
    server's ``max_client_batch_size``). The async methods run the model on a worker thread; in
    remote mode they are :class:`e5v.RemoteEmbedder`'s async calls.

    Images are ``str`` paths (or ``data:image/...;base64`` URIs) or binary streams such
    as ``BytesIO``. An :class:`~llama_index.core.schema.ImageNode` that carries text can
    be embedded as ONE interleaved vector (image, then text) with
    :meth:`embed_image_node`; store it on ``node.embedding`` before indexing and the
    index keeps it instead of embedding the image alone (``MultiModalVectorStoreIndex``
    puts an image node with text in both the image and the text store, under that vector).
    """

    model_name: str = Field(default=DEFAULT_MODEL, description="Hub id or local path of the E5-V checkpoint.")
    embed_batch_size: int = Field(
        default=16, gt=0, le=2048, description="Items per model batch (texts and images); the embedder's if not given."
    )
    device: str | None = Field(default=None, description="Torch device; None picks CUDA when available, else CPU.")
    dtype: str | None = Field(default=None, description="Torch dtype; None picks bfloat16 on GPU, float32 on CPU.")
    revision: str | None = Field(default=None, description="Hub revision (commit, branch or tag).")
    cache_dir: str | None = Field(default=None, description="Hugging Face cache directory.")
    embedder_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Other E5VEmbedder options (prompts, max_batch_tokens, device_map, allow_remote, ...).",
    )
    base_url: str | None = Field(
        default=None, description="URL of an `e5v serve` to embed through instead of loading a model."
    )
    api_key_env_var: str = Field(
        default=API_KEY_ENV_VAR, description="Environment variable read for the server's API key when none is given."
    )

    _embedder: Embedder = PrivateAttr()

    def __init__(
        self,
        model_name: str | Path | None = None,
        *,
        embedder: E5VEmbedder | None = None,
        embed_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        embedder_kwargs: dict[str, Any] | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env_var: str = API_KEY_ENV_VAR,
        **kwargs: Any,
    ) -> None:
        wrapped: Embedder
        if base_url is not None:
            _check_no_remote_load_options(embedder, device, dtype, revision, cache_dir, embedder_kwargs)
            remote = RemoteEmbedder(base_url, api_key, api_key_env_var=api_key_env_var)
            if model_name is not None and str(model_name) != remote.model_name:
                raise ValueError(
                    f"model_name {str(model_name)!r} differs from the model of the server at {remote.base_url} "
                    f"({remote.model_name!r}); drop model_name, the server decides the model"
                )
            model_name, base_url = remote.model_name, remote.base_url
            default_batch_size = min(int(remote.info.get("max_client_batch_size") or 256), 2048)
            wrapped = remote
        elif api_key is not None or api_key_env_var != API_KEY_ENV_VAR:
            raise ValueError("api_key and api_key_env_var are for a server; pass its base_url= too")
        elif embedder is not None:
            if not isinstance(embedder, E5VEmbedder):
                raise TypeError(
                    f"embedder= takes an e5v.E5VEmbedder, got {type(embedder).__name__}; "
                    "for an e5v server pass base_url= (and api_key=) instead"
                )
            _check_no_load_options(embedder, model_name, device, dtype, revision, cache_dir, embedder_kwargs)
            model_name = embedder.model_name
            device = str(embedder.device)
            dtype = str(embedder.dtype).removeprefix("torch.")
            revision = embedder.revision
            default_batch_size, wrapped = embedder.batch_size, embedder
        else:
            model_name = DEFAULT_MODEL if model_name is None else model_name
            embedder = E5VEmbedder(
                model_name,
                device=device,
                dtype=dtype,
                revision=revision,
                cache_dir=cache_dir,
                batch_size="auto" if embed_batch_size is None else embed_batch_size,
                **(embedder_kwargs or {}),
            )
            default_batch_size, wrapped = embedder.batch_size, embedder
        super().__init__(
            model_name=str(model_name),
            embed_batch_size=default_batch_size if embed_batch_size is None else embed_batch_size,
            device=device,
            dtype=dtype,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            embedder_kwargs=embedder_kwargs or {},
            base_url=base_url,
            api_key_env_var=api_key_env_var,
            **kwargs,
        )
        self._embedder = wrapped

    @classmethod
    def class_name(cls) -> str:
        return "E5VEmbedding"

    @property
    def embedder(self) -> Embedder:
        """The wrapped :class:`e5v.E5VEmbedder`, or in remote mode the :class:`e5v.RemoteEmbedder`."""
        return self._embedder

    # -- texts and queries (E5-V embeds both with the same prompt) ----------------------

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embeddings([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        try:
            return self._embedder.embed_texts(texts, batch_size=self.embed_batch_size).tolist()
        except InvalidInputError as exc:
            raise _BatchInputError(exc, texts) from None

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await self._aget_text_embeddings([query]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aget_text_embeddings([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        """The remote embedder's async call, or the model on a worker thread."""
        if not isinstance(self._embedder, RemoteEmbedder):
            return await asyncio.to_thread(self._get_text_embeddings, texts)
        try:
            return (await self._embedder.aembed_texts(texts, batch_size=self.embed_batch_size)).tolist()
        except InvalidInputError as exc:
            raise _BatchInputError(exc, texts) from None

    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False, **kwargs: Any) -> list[Embedding]:
        """LlamaIndex's batching, with an invalid text named by its index in ``texts``."""
        try:
            return super().get_text_embedding_batch(texts, show_progress, **kwargs)
        except _BatchInputError as exc:
            raise exc.in_list(texts, self.embed_batch_size) from None

    async def aget_text_embedding_batch(
        self, texts: list[str], show_progress: bool = False, **kwargs: Any
    ) -> list[Embedding]:
        """LlamaIndex's async batching, with an invalid text named by its index in ``texts``."""
        try:
            return await super().aget_text_embedding_batch(texts, show_progress, **kwargs)
        except _BatchInputError as exc:
            raise exc.in_list(texts, self.embed_batch_size) from None

    # -- images ---------------------------------------------------------------------------

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return self._get_image_embeddings([img_file_path])[0]

    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        try:
            return self._embedder.embed_images(img_file_paths, batch_size=self.embed_batch_size).tolist()
        except InvalidInputError as exc:
            raise _BatchInputError(exc, img_file_paths) from None

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return (await self._aget_image_embeddings([img_file_path]))[0]

    async def _aget_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        """The remote embedder's async call, or the model on a worker thread."""
        if not isinstance(self._embedder, RemoteEmbedder):
            return await asyncio.to_thread(self._get_image_embeddings, img_file_paths)
        try:
            return (await self._embedder.aembed_images(img_file_paths, batch_size=self.embed_batch_size)).tolist()
        except InvalidInputError as exc:
            raise _BatchInputError(exc, img_file_paths) from None

    def get_image_embedding_batch(
        self, img_file_paths: list[ImageType], show_progress: bool = False
    ) -> list[Embedding]:
        """LlamaIndex's batching, with an invalid image named by its index in ``img_file_paths``."""
        try:
            return super().get_image_embedding_batch(img_file_paths, show_progress)
        except _BatchInputError as exc:
            raise exc.in_list(img_file_paths, self.embed_batch_size) from None

    async def aget_image_embedding_batch(
        self, img_file_paths: list[ImageType], show_progress: bool = False
    ) -> list[Embedding]:
        """LlamaIndex's async batching, with an invalid image named by its index in ``img_file_paths``."""
        try:
            return await super().aget_image_embedding_batch(img_file_paths, show_progress)
        except _BatchInputError as exc:
            raise exc.in_list(img_file_paths, self.embed_batch_size) from None

    # -- interleaved ---------------------------------------------------------------------

    def get_interleaved_embedding(self, parts: Sequence[Any]) -> Embedding:
        """One vector for text and image parts in order: a ``str`` part is TEXT, so give
        image files as ``pathlib.Path`` (or ``BytesIO``, bytes, PIL images)."""
        return self._embedder.embed_interleaved([Interleaved(parts)])[0].tolist()

    def embed_image_node(self, node: ImageNode | ImageDocument) -> Embedding:
        """One vector for an image node and its text (``Interleaved([image, text])``).

        The text is the node's content as LlamaIndex embeds it (``MetadataMode.EMBED``,
        so with its metadata); a node whose text is empty gets its plain image embedding.
        The image comes from ``image`` (base64) or ``image_path``; URLs are not fetched.
        Set the result on ``node.embedding`` before indexing and the index keeps it.
        """
        return self.embed_image_nodes([node])[0]

    def embed_image_nodes(self, nodes: Sequence[ImageNode | ImageDocument]) -> list[Embedding]:
        """:meth:`embed_image_node` for many nodes, ``embed_batch_size`` at a time."""
        items: list[Any] = []
        for index, node in enumerate(nodes):
            image = _node_image(node, index)
            if node.text.strip():
                items.append(Interleaved([image, node.get_content(metadata_mode=MetadataMode.EMBED)]))
            else:
                items.append(image)
        return self._embedder.embed(items, batch_size=self.embed_batch_size).tolist()


class _BatchInputError(InvalidInputError):
    """An invalid item in one of the batches LlamaIndex cuts a list into; its index counts in that batch."""

    def __init__(self, error: InvalidInputError, batch: list[Any]) -> None:
        super().__init__(error.reason, index=error.index)
        self.batch = batch

    def in_list(self, items: list[Any], batch_size: int) -> InvalidInputError:
        """The same error with the item's index in ``items``, the list cut into batches of ``batch_size``."""
        if self.index is None:
            return self.shifted(0)
        for offset in range(0, len(items), batch_size):
            window = items[offset : offset + batch_size]
            if len(window) == len(self.batch) and all(a is b for a, b in zip(window, self.batch)):
                return self.shifted(offset)
        # an embeddings cache passes on only the texts of a batch it has no vectors for
        bad = self.batch[self.index]
        return self.shifted(next(i for i, item in enumerate(items) if item is bad) - self.index)


def _node_image(node: ImageNode | ImageDocument, index: int) -> Path | BytesIO:
    """The node's image as an input e5v reads as an image (never as text)."""
    if node.image:
        try:
            return BytesIO(base64.b64decode(node.image))
        except (binascii.Error, ValueError) as exc:
            raise InvalidInputError(
                f"node {node.node_id!r}: its image is not valid base64 ({exc}); set image to base64-encoded "
                "image bytes, or set image_path",
                index=index,
            ) from None
    if node.image_path:
        return Path(node.image_path)
    if node.image_url:
        raise InvalidInputError(
            f"node {node.node_id!r} has only image_url {node.image_url!r}; e5v does not fetch URLs here: "
            "download the image and set image_path (or image, base64)",
            index=index,
        )
    raise InvalidInputError(f"node {node.node_id!r} has no image; set image_path or image (base64)", index=index)


def _check_no_load_options(embedder: E5VEmbedder, model_name: str | Path | None, *options: Any) -> None:
    if model_name is not None and str(model_name) != embedder.model_name:
        raise ValueError(
            f"model_name {str(model_name)!r} differs from the given embedder's {embedder.model_name!r}; "
            "pass one or the other"
        )
    if any(option is not None for option in options):
        raise ValueError(
            "device, dtype, revision, cache_dir and embedder_kwargs configure loading a model; they cannot be "
            "combined with embedder= (configure the E5VEmbedder instead)"
        )


def _check_no_remote_load_options(embedder: E5VEmbedder | None, *options: Any) -> None:
    if embedder is not None:
        raise ValueError("pass either base_url= (a server) or embedder= (an in-process model), not both")
    if any(option is not None and option != {} for option in options):
        raise ValueError(
            "device, dtype, revision, cache_dir and embedder_kwargs configure loading a model; they cannot be "
            "combined with base_url= (the server loads the model: set them on `e5v serve`)"
        )
