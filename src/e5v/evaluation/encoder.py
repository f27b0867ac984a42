"""What the benchmarks ask of a model, on top of :class:`~e5v.E5VEmbedder`: vectors of
texts, images and composed queries with a given prompt BODY, fed in chunks (a dataset's
images are decoded a chunk at a time) under one progress bar a step, through the
embedder's cache; and FashionIQ's sum of two prompts' final hidden states before
normalising, which the embedder's unit vectors cannot give.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from e5v.core.batching import plan_batches
from e5v.core.inputs import ImageLoader
from e5v.core.prompts import check_body, fill
from e5v.errors import EmbeddingError
from e5v.model import runner

if TYPE_CHECKING:
    from e5v.core.embedder import E5VEmbedder

__all__ = ["Column", "Encoder"]

#: Items handed to the embedder at once (a chunk's images are decoded together).
CHUNK_SIZE = 256


class Column:
    """One column of a ``datasets.Dataset``, read a slice at a time (images decoded on access)."""

    def __init__(self, dataset: Any, name: str) -> None:
        self._data = dataset.select_columns([name])
        self._name = name

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: slice) -> list[Any]:
        return list(self._data[index][self._name])


class Encoder:
    """Chunked, cached, progress-reporting embedding for the benchmarks."""

    def __init__(self, embedder: E5VEmbedder, *, progress: bool = False, chunk_size: int = CHUNK_SIZE) -> None:
        self.embedder = embedder
        self.progress = progress
        self.chunk_size = chunk_size

    def texts(self, texts: Sequence[str], body: str, desc: str) -> np.ndarray:
        """Texts under a text BODY (with ``<sent>``)."""
        return self._chunked(len(texts), desc, lambda s: self.embedder.embed_texts(list(texts[s]), **_opts(body)))

    def images(self, images: Sequence[Any], body: str, desc: str) -> np.ndarray:
        """Image-likes (or a :class:`Column`) under an image BODY (with ``<image>``)."""
        return self._chunked(len(images), desc, lambda s: self.embedder.embed_images(images[s], **_opts(body)))

    def composed(self, images: Sequence[Any], texts: Sequence[str], body: str, desc: str) -> np.ndarray:
        """``images[i]`` with ``texts[i]`` under a composed BODY (``<image>`` and ``<sent>``)."""
        return self._chunked(
            len(texts), desc, lambda s: self.embedder.embed_composed(images[s], list(texts[s]), **_opts(body))
        )

    def summed_composed(
        self, images: Sequence[Any], first: Sequence[str], second: Sequence[str], body: str, desc: str
    ) -> np.ndarray:
        """FashionIQ's query vectors: ``normalize(h(images[i], first[i]) + h(images[i], second[i]))``,
        ``h`` the final hidden state at the last token, before normalising. Cached like any vector."""
        check_body(body, "composed")
        if not len(images) == len(first) == len(second):
            raise ValueError(f"{len(images)} images, {len(first)} and {len(second)} texts")
        return self._chunked(
            len(first), desc, lambda s: self._summed(images[s], first[s], second[s], body), max(1, self.chunk_size // 4)
        )

    def states(self, images: Sequence[Any], texts: Sequence[str], body: str) -> np.ndarray:
        """Final hidden states (float32, not normalised) of composed prompts, one per pair."""
        return self._states(images, [list(texts)], body)[0]

    def _states(self, images: Sequence[Any], texts: Sequence[Sequence[str]], body: str) -> list[np.ndarray]:
        """Hidden states of ``images[i]`` with ``texts[j][i]`` for each list ``j``, each image
        processed once."""
        loader = ImageLoader(max_image_pixels=self.embedder.max_image_pixels)
        loaded = self.embedder.loaded
        pixels = [
            runner.process_images(loaded, [loader.load(image, i)], max_image_tiles=self.embedder.max_image_tiles)
            for i, image in enumerate(images)
        ]
        prompts = [self.embedder.prompts.wrap(fill(body, text)) for column in texts for text in column]
        encoded = runner.tokenize(loaded, prompts, pixels * len(texts))
        out = np.empty((len(encoded), self.embedder.dimension), dtype=np.float32)
        for batch in plan_batches(
            [item.length for item in encoded],
            max_items=self.embedder.batch_size,
            max_tokens=self.embedder.max_batch_tokens,
        ):
            with loaded.lock, torch.inference_mode():
                out[batch] = runner.last_states(loaded, [encoded[i] for i in batch]).cpu().numpy()
        if not np.isfinite(out).all():
            raise EmbeddingError("the model produced non-finite hidden states; use dtype='bfloat16' or 'float32'")
        return [out[j * len(images) : (j + 1) * len(images)] for j in range(len(texts))]

    def _summed(self, images: Sequence[Any], first: Sequence[str], second: Sequence[str], body: str) -> np.ndarray:
        embedder = self.embedder
        out = np.empty((len(first), embedder.dimension), dtype=np.float32)
        keys: dict[int, str] = {}
        todo = []
        for i, (image, a, b) in enumerate(zip(images, first, second)):
            if embedder.cache is None:
                todo.append(i)
                continue
            key, vector = embedder.cache_lookup(_pair_prompt(embedder, body, a, b), [image])
            if vector is None:
                if key is not None:
                    keys[i] = key
                todo.append(i)
            else:
                out[i] = vector
        if todo:
            a, b = self._states([images[i] for i in todo], [[first[i] for i in todo], [second[i] for i in todo]], body)
            summed = a + b
            vectors = summed / np.linalg.norm(summed, axis=1, keepdims=True)
            for i, vector in zip(todo, vectors):
                out[i] = vector
                if i in keys and embedder.cache is not None:
                    embedder.cache.put(keys[i], vector)
        return out

    def _chunked(
        self, total: int, desc: str, embed: Callable[[slice], np.ndarray], chunk_size: int | None = None
    ) -> np.ndarray:
        out = np.empty((total, self.embedder.dimension), dtype=np.float32)
        size = chunk_size or self.chunk_size
        bar = _bar(total, desc, self.progress)
        try:
            for start in range(0, total, size):
                stop = min(start + size, total)
                out[start:stop] = embed(slice(start, stop))
                bar.update(stop - start)
        finally:
            bar.close()
        return out


def _pair_prompt(embedder: E5VEmbedder, body: str, first: str, second: str) -> str:
    """The cache's prompt for a two-prompt sum: both full prompts, marked as a sum."""
    wrap = embedder.prompts.wrap
    return "\x00".join(("sum-of-final-states", wrap(fill(body, first)), wrap(fill(body, second))))


def _opts(body: str) -> dict[str, Any]:
    return {"prompt": body, "show_progress_bar": False}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item")
