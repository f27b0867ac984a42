"""Bulk embedding of a Ray Data dataset by a pool of actors, each loading E5-V once.

Needs the ``ray`` extra (``pip install "e5v[ray]"``). Every worker node must have
``e5v`` installed and be able to read the model and any image paths of the dataset::

    import ray
    from e5v.ray import embed_dataset

    ray.init(address="auto")
    ds = ray.data.read_parquet("s3://bucket/captions/")
    out = embed_dataset(ds, text_column="caption", concurrency=8, num_gpus_per_worker=1)
    out.write_parquet("s3://bucket/captions-e5v/")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from e5v.core.batching import check_batch_size
from e5v.core.embedder import DEFAULT_MODEL
from e5v.core.inputs import Interleaved, describe
from e5v.errors import ConfigurationError, InvalidInputError

if TYPE_CHECKING:
    import ray.data

__all__ = ["AUTO_ROWS_PER_BATCH", "embed_dataset"]

logger = logging.getLogger(__name__)

Mode = Literal["composed", "interleaved"]
OnError = Literal["fail", "skip"]

#: Rows of a Ray batch with ``batch_size="auto"``: enough for an actor to plan full
#: forward passes on a GPU (256 items each at most) with little padding.
AUTO_ROWS_PER_BATCH = 256


def embed_dataset(
    ds: ray.data.Dataset,
    *,
    model_name: str | Path = DEFAULT_MODEL,
    text_column: str | None = None,
    image_column: str | None = None,
    mode: Mode = "composed",
    output_column: str = "embedding",
    id_column: str | None = None,
    batch_size: int | Literal["auto"] = "auto",
    concurrency: int | tuple[int, int] = 1,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    device: str | None = None,
    dtype: str | None = None,
    on_error: OnError = "fail",
    error_column: str = "embedding_error",
    embedder_options: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """Add ``output_column`` to every row of ``ds``: its E5-V embedding, computed lazily
    by ``concurrency`` actors (an int, or ``(min, max)`` to autoscale) that each load
    the model once, on ``num_gpus_per_worker`` GPUs and ``num_cpus_per_worker`` CPUs
    (held for the whole job: leave CPUs free for Ray's read and write tasks).

    What is embedded: ``text_column`` alone: texts; ``image_column`` alone: images;
    both: composed queries (the image modified as the text says), or with
    ``mode="interleaved"`` one interleaved item per row, the image followed by the text.
    Image cells may be paths or URIs (str), encoded bytes, arrays (Ray tensor
    columns, or nested lists), or Hugging Face image structs ``{"bytes", "path"}``.

    The embedding is a ``fixed_size_list<float32>[dimension]`` of unit length, other
    columns pass through unchanged. Ray Data may reorder rows across blocks: carry an
    id column, or set ``ray.data.DataContext.get_current().execution_options.preserve_order``.

    ``device=None`` is ``"cuda"`` when ``num_gpus_per_worker > 0``, else ``"cpu"``;
    ``dtype=None`` is bfloat16 on GPU, float32 on CPU. ``batch_size`` is both the rows
    per Ray batch and the most items per forward pass (``"auto"``: Ray batches of
    :data:`AUTO_ROWS_PER_BATCH` rows, over which each actor plans forward passes of the
    embedder's default size, 16 items on CPU and 256 on GPU, within its token budget). ``embedder_options`` go to
    :class:`~e5v.E5VEmbedder` (``prompts``, ``adapter``, ``max_image_pixels`` ...).

    A row that cannot be embedded (:class:`~e5v.InvalidInputError`: a missing file, a
    null cell ...) fails the job with ``on_error="fail"``, the message naming the row by
    ``id_column`` (else by its input). With ``on_error="skip"`` its embedding is null and
    ``error_column`` (a string column, null for good rows) says why.
    """
    if text_column is None and image_column is None:
        raise ConfigurationError(
            "embed_dataset needs text_column, image_column, or both (a composed or interleaved item)"
        )
    if mode not in ("composed", "interleaved"):
        raise ConfigurationError(f"mode must be 'composed' or 'interleaved', got {mode!r}")
    if on_error not in ("fail", "skip"):
        raise ConfigurationError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    check_batch_size(batch_size)
    import ray.data

    if isinstance(concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    if device is None:
        device = "cuda" if num_gpus_per_worker > 0 else "cpu"
    return ds.map_batches(
        _EmbedBatch,
        batch_format="pyarrow",
        batch_size=AUTO_ROWS_PER_BATCH if batch_size == "auto" else batch_size,
        compute=compute,
        num_gpus=num_gpus_per_worker,
        num_cpus=num_cpus_per_worker,
        fn_constructor_kwargs={
            "model_name": str(model_name),
            "text_column": text_column,
            "image_column": image_column,
            "mode": mode,
            "output_column": output_column,
            "id_column": id_column,
            "on_error": on_error,
            "error_column": error_column,
            "embedder_options": {
                "device": device,
                "dtype": dtype,
                "batch_size": batch_size,
                **(embedder_options or {}),
            },
        },
    )


class _EmbedBatch:
    """The actor: loads the model once, then embeds one Arrow batch per call."""

    def __init__(
        self,
        *,
        model_name: str,
        text_column: str | None,
        image_column: str | None,
        mode: Mode,
        output_column: str,
        id_column: str | None,
        on_error: OnError,
        error_column: str,
        embedder_options: dict[str, Any],
    ) -> None:
        from e5v.core.embedder import E5VEmbedder

        self.embedder = E5VEmbedder(model_name, **embedder_options)
        self.text_column = text_column
        self.image_column = image_column
        self.mode = mode
        self.output_column = output_column
        self.id_column = id_column
        self.on_error = on_error
        self.error_column = error_column
        logger.info("e5v actor ready: %r", self.embedder)

    def __call__(self, table: pa.Table) -> pa.Table:
        added = [self.output_column] + ([self.error_column] if self.on_error == "skip" else [])
        for name in added:
            if name in table.column_names:
                raise ConfigurationError(f"the dataset already has a column {name!r}; choose another name for it")
        if self.id_column is not None:
            _require(table, self.id_column)
        texts = self._column(table, self.text_column, _text_cells)
        images = self._column(table, self.image_column, _image_cells)
        vectors = np.zeros((table.num_rows, self.embedder.dimension), dtype=np.float32)
        errors: list[str | None] = [None] * table.num_rows
        pending = list(range(table.num_rows))
        while pending:
            try:
                vectors[pending] = self._embed(
                    [texts[i] for i in pending] if texts is not None else None,
                    [images[i] for i in pending] if images is not None else None,
                )
                break
            except InvalidInputError as exc:
                if exc.index is None:
                    raise
                row = pending.pop(exc.index)
                reason = str(exc).removeprefix(f"item {exc.index}: ")
                if self.on_error == "fail":
                    raise InvalidInputError(
                        f"row {self._label(table, row, texts, images)}: {reason}; "
                        "pass on_error='skip' to record bad rows and go on"
                    ) from None
                logger.warning("row %s skipped: %s", self._label(table, row, texts, images), reason)
                errors[row] = reason
        table = table.append_column(self.output_column, _vector_column(vectors, errors))
        if self.on_error == "skip":
            table = table.append_column(self.error_column, pa.array(errors, type=pa.string()))
        return table

    def _embed(self, texts: list[Any] | None, images: list[Any] | None) -> np.ndarray:
        if images is None:
            return self.embedder.embed_texts(texts)  # type: ignore[arg-type]
        if texts is None:
            return self.embedder.embed_images(images)
        if self.mode == "interleaved":
            return self.embedder.embed_interleaved([Interleaved([image, text]) for image, text in zip(images, texts)])
        return self.embedder.embed_composed(images, texts)

    def _column(self, table: pa.Table, name: str | None, cells: Any) -> list[Any] | None:
        if name is None:
            return None
        return cells(_require(table, name))

    def _label(self, table: pa.Table, row: int, texts: list[Any] | None, images: list[Any] | None) -> str:
        """How an error message names a row: its id, else its input cells."""
        if self.id_column is not None:
            return f"{self.id_column}={table.column(self.id_column)[row].as_py()!r}"
        cells = [(self.text_column, texts), (self.image_column, images)]
        return ", ".join(f"{name}={describe(values[row])}" for name, values in cells if values is not None)


def _require(table: pa.Table, name: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise ConfigurationError(f"the dataset has no column {name!r}; its columns are {table.column_names}")
    return table.column(name)


def _text_cells(column: pa.ChunkedArray) -> list[Any]:
    return column.to_pylist()


def _image_cells(column: pa.ChunkedArray) -> list[Any]:
    """Python image-likes from an Arrow column: str, bytes, ndarray, or ``None`` for nulls."""
    kind = column.type
    if isinstance(kind, pa.ExtensionType):  # Ray's fixed- and variable-shape tensor columns
        return list(column.combine_chunks().to_numpy(zero_copy_only=False))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        leaf = kind
        while hasattr(leaf, "value_type"):
            leaf = leaf.value_type
        dtype = leaf.to_pandas_dtype()
        return [None if cell is None else np.asarray(cell, dtype=dtype) for cell in column.to_pylist()]
    if pa.types.is_struct(kind):  # Hugging Face datasets' Image feature
        return [_hf_image(cell) for cell in column.to_pylist()]
    return column.to_pylist()


def _hf_image(cell: dict[str, Any] | None) -> Any:
    if cell is None:
        return None
    return cell.get("bytes") or cell.get("path") or cell


def _vector_column(vectors: np.ndarray, errors: Sequence[str | None]) -> pa.Array:
    """Rows of ``vectors`` as a fixed-size list column, null where ``errors`` has a reason."""
    kind = pa.list_(pa.float32(), vectors.shape[1])
    if not any(errors):
        return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.array([None if error else vector for vector, error in zip(vectors, errors)], type=kind)
