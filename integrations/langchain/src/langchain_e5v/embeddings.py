"""``E5VEmbeddings``: LangChain ``Embeddings`` backed by :class:`e5v.E5VEmbedder`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from e5v import DEFAULT_MODEL, E5VEmbedder, Interleaved
from e5v.inputs import ImageLike

__all__ = ["E5VEmbeddings"]

#: Fields that say how to load the model; they cannot be combined with ``embedder=``.
_LOADING_FIELDS = frozenset(
    {"model", "model_name", "device", "dtype", "revision", "cache_dir", "model_kwargs", "embedder_kwargs"}
)
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
    options below, or wrap an existing :class:`e5v.E5VEmbedder` with ``embedder=``.
    Adapters built by name for the same model, device and dtype share one loaded model.

    ``embed_image`` is the method ``langchain_chroma.Chroma.add_images`` and
    ``similarity_search_by_image`` call. Every method returns lists of Python floats;
    the ``aembed_*`` methods run the model on an executor thread, off the event loop.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model_name: str = Field(default=DEFAULT_MODEL, alias="model")
    """Hub id or local directory of the checkpoint."""
    device: str | None = None
    """``"cuda"``, ``"cuda:1"``, ``"cpu"``...; ``None``: CUDA when available, else CPU."""
    dtype: str | None = None
    """``"bfloat16"``, ``"float16"`` or ``"float32"``; ``None``: bfloat16 on GPU, float32 on CPU."""
    batch_size: int | None = Field(default=None, ge=1)
    """Most items per forward pass; ``None``: the embedder's (built by name: 16 on CPU, 256 on GPU)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the checkpoint."""
    cache_dir: str | None = None
    """Hugging Face cache directory."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for transformers' ``from_pretrained`` (``E5VEmbedder(model_kwargs=...)``)."""
    embedder_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other :class:`e5v.E5VEmbedder` options: ``prompts``, ``adapter``, ``device_map``, ``max_batch_tokens``,
    ``allow_remote``, ``max_image_pixels``, ``max_text_tokens``, ``allow_pickle``."""
    show_progress: bool | None = None
    """Show a progress bar while embedding; ``None``: the embedder's setting."""

    _embedder: E5VEmbedder = PrivateAttr()

    def __init__(self, *, embedder: E5VEmbedder | None = None, **data: Any) -> None:
        if embedder is None:
            super().__init__(**data)
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
            return
        conflicts = sorted(_LOADING_FIELDS & data.keys())
        if conflicts:
            raise ValueError(
                f"E5VEmbeddings got embedder= and loading options {conflicts}; the embedder is already loaded, "
                "so pass either embedder= or the loading options, not both"
            )
        super().__init__(
            model_name=embedder.model_name,
            device=str(embedder.device),
            dtype=str(embedder.dtype).removeprefix("torch."),
            revision=embedder.revision,
            **data,
        )
        self._embedder = embedder

    @field_validator("embedder_kwargs")
    @classmethod
    def _no_duplicate_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        duplicated = sorted(_FIELD_OPTIONS & value.keys())
        if duplicated:
            raise ValueError(f"embedder_kwargs must not hold {duplicated}; set them as E5VEmbeddings fields")
        return value

    @property
    def embedder(self) -> E5VEmbedder:
        """The :class:`e5v.E5VEmbedder` doing the work."""
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
        """Embed images: file paths (``str``), or any image-like :class:`e5v.E5VEmbedder` takes.

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

    async def aembed_image(self, uris: Sequence[ImageLike]) -> list[list[float]]:
        """:meth:`embed_image` on an executor thread."""
        return await run_in_executor(None, self.embed_image, uris)

    async def aembed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]]) -> list[list[float]]:
        """:meth:`embed_interleaved` on an executor thread."""
        return await run_in_executor(None, self.embed_interleaved, items)

    async def aembed_composed(self, images: Sequence[ImageLike], texts: Sequence[str]) -> list[list[float]]:
        """:meth:`embed_composed` on an executor thread."""
        return await run_in_executor(None, self.embed_composed, images, texts)


def _floats(vectors: np.ndarray) -> list[list[float]]:
    return vectors.tolist()
