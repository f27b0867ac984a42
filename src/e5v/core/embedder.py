"""``E5VEmbedder``: texts, images, interleaved and composed inputs into E5-V's shared space."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from e5v.core.batching import check_batch_size, chunked, plan_batches
from e5v.core.cache import EmbeddingCache, entry_key, image_digest, path_fingerprint
from e5v.core.inputs import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageLoader,
    Interleaved,
    Request,
    as_list,
    check_lengths,
    composed_request,
    content_key,
    image_request,
    interleaved_request,
    text_request,
    to_request,
)
from e5v.core.prompts import IMAGE_TOKEN, PromptSet, check_body, fill, get_prompts
from e5v.core.remote import RemotePolicy
from e5v.defaults import DEFAULT_MODEL
from e5v.errors import ConfigurationError, EmbeddingError
from e5v.model import loading, runner
from e5v.optional import require

__all__ = ["DEFAULT_MODEL", "E5VEmbedder", "Prepared"]

logger = logging.getLogger(__name__)

#: Default padded tokens in flight by device type (``max_batch_tokens="auto"``), shared
#: by the CPU workers. A CPU is compute-bound at small batches, and larger ones only cost
#: memory (on the "small" benchmark model, 1024-token batches ran 1.5x faster per item
#: than 4096-token ones).
AUTO_MAX_BATCH_TOKENS = {"cpu": 1024}
GPU_MAX_BATCH_TOKENS = 16384
#: Default most items a batch by device type (``batch_size="auto"``): on a CPU 16, with
#: which its token budget was measured; on an accelerator enough for the token budget to
#: set a batch's size, as in vLLM (256 sequences within its token budget) and
#: text-embeddings-inference.
AUTO_BATCH_SIZE = {"cpu": 16}
GPU_BATCH_SIZE = 256
#: Most threads that run the image processor on one batch's prompts at once.
MAX_IMAGE_THREADS = 8
#: Prompts tokenised in one call when bounding a call's token counts (their ids are dropped).
_TOKENIZE_CHUNK = 1024
#: Texts longer than this many tokens are cut (with a warning) before prompting.
DEFAULT_MAX_TEXT_TOKENS = 2048


@dataclass
class _Prepared:
    keys: list[tuple[Any, ...]]  # unique request keys of the batch, in order
    encoded: list[runner.Encoded]


@dataclass(frozen=True, eq=False)
class Prepared:
    """One item made ready for the model by :meth:`E5VEmbedder.prepare`: its prompt
    tokenised (text cut to ``max_text_tokens``), its images decoded and tiled; or its
    vector, found in the embedding cache.

    ``key`` identifies the content with its prompt (equal keys embed to equal vectors),
    ``tokens`` is the prompt's length as embedded (image features included), ``pixels``
    the decoded images' pixel count, ``cache_key`` where the vector goes in the cache."""

    key: tuple[Any, ...]
    tokens: int
    encoded: runner.Encoded | None = None
    pixels: int = 0
    cache_key: str | None = None
    vector: np.ndarray | None = None


class E5VEmbedder:
    """E5-V embeddings: unit-length float32 vectors, one per input, in input order.

    Texts, images, composed queries and interleaved items all land in one space. Every
    ``embed*`` method also takes ``batch_size`` and ``show_progress_bar`` for that call
    (``None``: the embedder's). The same checkpoint loaded twice with the same options is
    shared, not reloaded.

    Parameters:

    - ``model_name_or_path``: a hub id, a local directory saved with ``save_pretrained``, or
      a :class:`~e5v.model.loading.LoadedModel` used as it is (the loading options are then
      ignored).
    - ``device``: ``None`` picks CUDA when available, else CPU.
    - ``dtype``: ``None`` picks bfloat16 (float16 where unsupported) on GPU, float32 on CPU.
    - ``batch_size``: most items a batch; ``"auto"``: 16 on a CPU, 256 on an accelerator.
    - ``max_batch_tokens``: most padded tokens a batch; ``"auto"``: 16384 on an accelerator,
      on a CPU 1024 shared by the workers (512 a batch with two); ``None``: no limit.
      Batches are planned over the whole call, longest first, from token counts known
      before any image is decoded (exact for text, and for images from their size in the
      file header; a URI counts as the grid's largest image).
    - ``prompts``: a preset name of :data:`e5v.core.prompts.PRESETS` or a
      :class:`~e5v.core.prompts.PromptSet` (default: the paper's).
    - ``revision``, ``cache_dir``: the hub revision and download folder.
    - ``device_map``: passed to transformers (accelerate) for multi-GPU or offload.
    - ``allow_pickle``: load ``.bin`` weights (pickles) when there are no safetensors.
    - ``allow_remote``: fetch ``http(s)`` image URLs (``True``, or a
      :class:`~e5v.core.remote.RemotePolicy`); off by default.
    - ``max_image_pixels``: images with more pixels are refused (decompression bombs).
    - ``max_text_tokens``: texts longer than this many tokens are cut, with a warning.
    - ``show_progress_bar``: the default for every call.
    - ``model_kwargs``: more keyword arguments for ``from_pretrained``.
    - ``adapter``: a LoRA adapter saved by ``e5v train`` (a directory or hub id), merged in.
    - ``max_image_tiles``: caps the anyres tiles per image besides the base view (E5-V uses up
      to 4; ``0`` keeps only the base 336x336 view, about 5x fewer image tokens). Changes
      the vectors; off by default.
    - ``quantization``: ``"8bit"`` or ``"4bit"`` loads the language model through
      bitsandbytes (CUDA only). Changes the vectors; off by default.
    - ``cache``: a folder (or :class:`~e5v.core.cache.EmbeddingCache`) of a persistent
      embedding cache keyed by content, prompt, model and the options above that change
      vectors: an unchanged input is served from disk without running the model.
    - ``prepare_ahead``: prepare (decode, tile, tokenise) each batch on a worker thread while
      the model runs the one before, its images on up to :data:`MAX_IMAGE_THREADS` threads;
      ``None``: on for accelerators, off on a CPU, where the model already uses every core
      and a preparing thread only slows it down (2x on images on a 2-core machine).
    - ``workers``: on a CPU, run this many batches at once, each prepared and forwarded on
      its own thread with an equal share of torch's threads, so one batch's preparation and
      per-operation overhead overlap another's compute (measured in docs/performance.md); a
      call of one batch (a query) runs on the calling thread with all of torch's threads.
      Accelerators run one batch at a time.
    """

    def __init__(
        self,
        model_name_or_path: str | Path | loading.LoadedModel = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | Literal["auto"] = "auto",
        max_batch_tokens: int | Literal["auto"] | None = "auto",
        prompts: str | PromptSet | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        device_map: str | dict[str, Any] | None = None,
        allow_pickle: bool = False,
        allow_remote: bool | RemotePolicy = False,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS,
        show_progress_bar: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        adapter: str | Path | None = None,
        max_image_tiles: int | None = None,
        quantization: str | None = None,
        cache: str | Path | EmbeddingCache | None = None,
        prepare_ahead: bool | None = None,
        workers: int = 1,
    ) -> None:
        check_batch_size(batch_size)
        _check_token_budget(max_batch_tokens)
        if not isinstance(workers, int) or workers < 1:
            raise ConfigurationError(f"workers must be a number at least 1, got {workers!r}")
        runner.check_max_image_tiles(max_image_tiles)
        self.max_image_tiles = max_image_tiles
        self.prompts = get_prompts(prompts)
        self.max_text_tokens = max_text_tokens
        self.show_progress_bar = show_progress_bar
        if isinstance(model_name_or_path, loading.LoadedModel):
            self._loaded = model_name_or_path
        else:
            if quantization is not None:
                model_kwargs = _quantization_kwargs(quantization, model_kwargs, loading.resolve_device(device), dtype)
                device_map = device_map or {"": str(loading.resolve_device(device))}
            self._loaded = loading.load(
                model_name_or_path,
                device=device,
                dtype=dtype,
                revision=revision,
                cache_dir=cache_dir,
                device_map=device_map,
                allow_pickle=allow_pickle,
                model_kwargs=model_kwargs,
                adapter=adapter,
            )
        if workers > 1 and self._loaded.input_device.type != "cpu":
            raise ConfigurationError(
                f"workers={workers} runs batches side by side on CPU threads, not on {self.device}"
            )
        self.workers = workers
        self.batch_size = _batch_size(batch_size, self._loaded.input_device)
        self.max_batch_tokens = _batch_token_budget(max_batch_tokens, self._loaded.input_device, workers)
        self.prepare_ahead = self._loaded.input_device.type != "cpu" if prepare_ahead is None else prepare_ahead
        self._images = ImageLoader(max_image_pixels=max_image_pixels, allow_remote=allow_remote)
        self.cache = cache if isinstance(cache, EmbeddingCache) or cache is None else EmbeddingCache(cache)
        self._tokenizing = threading.Lock()  # prepare() may run on several threads; the tokenizer on one at a time
        self._text_cap: int | None = None
        self._identity = "|".join(
            str(part)
            for part in (
                self._loaded.name,
                path_fingerprint(self._loaded.name),
                self._loaded.revision,
                self._loaded.dtype,
                adapter,
                "" if adapter is None else path_fingerprint(adapter),
                quantization,
                max_image_tiles,
                max_text_tokens,
            )
        )

    # -- properties -----------------------------------------------------------------

    @property
    def dimension(self) -> int:
        """Vector size, from the model config (4096 for E5-V)."""
        return self._loaded.dimension

    @property
    def model_name(self) -> str:
        return self._loaded.name

    @property
    def max_image_pixels(self) -> int:
        """Images with more pixels are refused (decompression bombs)."""
        return self._images.max_image_pixels

    def peek_image_size(self, image: object) -> tuple[int, int] | None:
        """``(height, width)`` of an image-like from its header, without decoding it
        (``None`` for a URL or an unreadable input: loading it says what is wrong)."""
        return self._images.peek_size(image)

    @property
    def revision(self) -> str | None:
        return self._loaded.revision

    @property
    def device(self) -> torch.device:
        return self._loaded.input_device

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded.dtype

    @property
    def loaded(self) -> loading.LoadedModel:
        """The :class:`~e5v.model.loading.LoadedModel` it runs: model, processor, devices and the
        lock its forwards hold (one object for the embedders of one checkpoint and options)."""
        return self._loaded

    @property
    def model(self) -> Any:
        """The underlying ``LlavaNextForConditionalGeneration``."""
        return self._loaded.model

    @property
    def processor(self) -> Any:
        """The underlying ``LlavaNextProcessor``."""
        return self._loaded.processor

    def __repr__(self) -> str:
        return f"E5VEmbedder({self.model_name!r}, device={str(self.device)!r}, dtype={self.dtype})"

    # -- public embedding API ---------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], *, prompt: str | None = None, **options: Any) -> np.ndarray:
        """Embed texts with the text prompt (or ``prompt``, a BODY with ``<sent>``)."""
        requests = [text_request(text, i) for i, text in enumerate(as_list(texts, "texts"))]
        return self._run(requests, self._bodies(text=prompt), **options)

    def embed_images(self, images: Sequence[Any], *, prompt: str | None = None, **options: Any) -> np.ndarray:
        """Embed image-likes (a ``str`` is a path or URI) with the image prompt
        (or ``prompt``, a BODY with ``<image>``)."""
        requests = [image_request(image, i) for i, image in enumerate(as_list(images, "images"))]
        return self._run(requests, self._bodies(image=prompt), **options)

    def embed_composed(
        self, images: Sequence[Any], texts: Sequence[str], *, prompt: str | None = None, **options: Any
    ) -> np.ndarray:
        """Embed composed queries: ``images[i]`` modified as ``texts[i]`` says (CIRR prompt)."""
        images, texts = as_list(images, "images"), as_list(texts, "texts")
        check_lengths(images, texts)
        requests = [composed_request(image, text, i) for i, (image, text) in enumerate(zip(images, texts))]
        return self._run(requests, self._bodies(composed=prompt), **options)

    def embed_interleaved(
        self, items: Sequence[Interleaved | Sequence[Any]], *, prompt: str | None = None, **options: Any
    ) -> np.ndarray:
        """Embed interleaved items (``Interleaved`` or sequences of parts), one vector each."""
        requests = [
            interleaved_request(item if isinstance(item, Interleaved) else Interleaved(item), i)
            for i, item in enumerate(as_list(items, "items"))
        ]
        return self._run(requests, self._bodies(interleaved=prompt), **options)

    def embed(self, items: Sequence[Any], *, prompts: str | PromptSet | None = None, **options: Any) -> np.ndarray:
        """Embed a mixed list: ``str`` is text; ``Interleaved``, ``Composed``, or an image-like
        (``pathlib.Path``, PIL, bytes, numpy array, binary file)."""
        requests = [to_request(item, i) for i, item in enumerate(as_list(items, "items"))]
        prompt_set = self.prompts if prompts is None else get_prompts(prompts)
        return self._run(requests, _bodies_of(prompt_set), **options)

    def prompt_bodies(self, prompts: str | PromptSet | None = None) -> dict[str, str]:
        """The prompt bodies by input kind of a preset name or set (``None``: the embedder's)."""
        return _bodies_of(self.prompts if prompts is None else get_prompts(prompts))

    def token_counts(self, requests: Sequence[Request], bodies: dict[str, str]) -> list[int]:
        """Each request's prompt tokens as embedded (texts cut to ``max_text_tokens``,
        image features included; an image whose header gives no size counts as the grid's largest)."""
        return self._token_bounds(requests, bodies, truncate=True)

    def prepare(self, request: Request, bodies: dict[str, str]) -> Prepared:
        """Make one checked request ready for the model, off the model's thread (``e5v
        serve`` runs it on its preparing threads): text cut to ``max_text_tokens`` (first
        cheaply by characters, then by tokens), images decoded once and tiled, the prompt
        tokenised. An item the embedding cache holds comes back with its ``vector``.
        Raises :class:`~e5v.errors.InvalidInputError` naming ``request.index``."""
        cache_key, vector = self.cache_lookup(self._prompt(request, bodies), request.images)
        key = (self._prompt(request, bodies, cut=True), *(content_key(image) for image in request.images))
        if vector is not None:  # counted, never encoded
            with self._tokenizing:
                [tokens] = self._token_bounds([request], bodies, truncate=True)
            return Prepared(key, tokens, cache_key=cache_key, vector=vector)
        processed, pixels = self._pixels(request)
        with self._tokenizing:
            prompt = self._prompt(request, bodies, truncate=True)
            [encoded] = runner.tokenize(self._loaded, [prompt], [processed])
        return Prepared(key, encoded.length, encoded, pixels, cache_key)

    def embed_prepared(self, items: Sequence[Prepared]) -> np.ndarray:
        """One vector per prepared item, in order: equal keys embedded once, the rest in
        token-budgeted batches, new vectors put in the cache. Runs the model on the
        calling thread; ``e5v serve``'s scheduler calls it with each round."""
        out = np.empty((len(items), self.dimension), dtype=np.float32)
        first_of: dict[tuple[Any, ...], Prepared] = {}
        rows_of: dict[tuple[Any, ...], list[int]] = {}
        for row, item in enumerate(items):
            if item.vector is not None:
                out[row] = item.vector
                continue
            first_of.setdefault(item.key, item)
            rows_of.setdefault(item.key, []).append(row)
        unique = list(first_of.values())
        for batch in plan_batches(
            [item.tokens for item in unique], max_items=self.batch_size, max_tokens=self.max_batch_tokens
        ):
            encoded = [unique[i].encoded for i in batch]
            if any(one is None for one in encoded):
                raise ValueError("a prepared item without its encoding or vector")
            vectors = self._forward(encoded)  # type: ignore[arg-type]
            for i, vector in zip(batch, vectors):
                out[rows_of[unique[i].key]] = vector
                if self.cache is not None and unique[i].cache_key is not None:
                    self.cache.put(unique[i].cache_key, vector)  # type: ignore[arg-type]
        return out

    def cache_lookup(self, prompt: str, images: Sequence[Any]) -> tuple[str | None, np.ndarray | None]:
        """The embedding cache's key for a vector of this model and options, and the vector
        stored under it. ``prompt`` is what decides the vector besides the model and the images
        (for an ordinary item, its full prompt as the model reads it), ``images`` its image-likes
        in order. The key is ``None`` without a cache or for an uncacheable image (a remote URL),
        the vector ``None`` on a miss; store a vector computed another way with
        ``embedder.cache.put(key, vector)``."""
        if self.cache is None:
            return None, None
        digests = [image_digest(image) for image in images]
        if any(digest is None for digest in digests):
            return None, None
        key = entry_key(self._identity, prompt, [digest for digest in digests if digest is not None])
        return key, self.cache.get(key, self.dimension)

    def similarity(self, a: Any, b: Any) -> float:
        """Cosine similarity of two inputs of any kind (as in :meth:`embed`)."""
        first, second = self.embed([a, b])
        return float(first @ second)

    # -- pipeline -----------------------------------------------------------------------

    def _bodies(self, **overrides: str | None) -> dict[str, str]:
        bodies = _bodies_of(self.prompts)
        for kind, body in overrides.items():
            if body is not None:
                check_body(body, kind)
                bodies[kind] = body
        return bodies

    def _run(
        self,
        requests: list[Request],
        bodies: dict[str, str],
        *,
        batch_size: int | Literal["auto"] | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        out = np.empty((len(requests), self.dimension), dtype=np.float32)
        if not requests:
            return out
        first_of: dict[tuple[Any, ...], Request] = {}
        rows_of: dict[tuple[Any, ...], list[int]] = {}
        for request in requests:
            key = request.key()
            first_of.setdefault(key, request)
            rows_of.setdefault(key, []).append(request.index)
        unique = list(first_of.values())
        if len(unique) < len(requests):
            logger.debug("embedding %d unique of %d items", len(unique), len(requests))
        if batch_size is not None:
            check_batch_size(batch_size)
        size = self.batch_size if batch_size is None else _batch_size(batch_size, self.device)
        progress = _progress(len(requests), self.show_progress_bar if show_progress_bar is None else show_progress_bar)
        try:
            cache, cache_keys = self.cache, {}
            if cache is not None:
                unique = self._from_cache(unique, bodies, out, rows_of, cache_keys, progress)
            if unique:
                planned = plan_batches(
                    self._token_bounds(unique, bodies),
                    max_items=size,
                    max_tokens=self.max_batch_tokens,
                )
                # Exact lengths never exceed the bounds, so each planned batch fits its budget as it is.
                for keys, vectors in self._embedded_batches([[unique[i] for i in batch] for batch in planned], bodies):
                    for key, vector in zip(keys, vectors):
                        rows = rows_of[key]
                        out[rows] = vector
                        if cache is not None and key in cache_keys:
                            cache.put(cache_keys[key], vector)
                        progress(len(rows))
        finally:
            progress(None)
        return out

    def _from_cache(
        self,
        unique: list[Request],
        bodies: dict[str, str],
        out: np.ndarray,
        rows_of: dict[tuple[Any, ...], list[int]],
        cache_keys: dict[tuple[Any, ...], str],
        progress: Callable[[int | None], None],
    ) -> list[Request]:
        """Fill the rows the cache holds; return the requests still to compute, recording
        their cache keys (uncacheable ones, such as remote URLs, get none)."""
        missing = []
        for request in unique:
            key, vector = self.cache_lookup(self._prompt(request, bodies), request.images)
            if vector is None:
                if key is not None:
                    cache_keys[request.key()] = key
                missing.append(request)
            else:
                rows = rows_of[request.key()]
                out[rows] = vector
                progress(len(rows))
        logger.debug("embedding cache: %d of %d unique items found", len(unique) - len(missing), len(unique))
        return missing

    def _token_bounds(
        self, requests: Sequence[Request], bodies: dict[str, str], *, truncate: bool = False
    ) -> list[int]:
        """Each request's prompt tokens, known before decoding any image: exact for a
        text within ``max_text_tokens`` (or cut to it, with ``truncate``) and for an image
        whose size its header gives; an upper bound otherwise (an image counted at its
        grid's largest feature count)."""
        tokenizer = self._loaded.processor.tokenizer
        grid = runner.image_grid(self._loaded, self.max_image_tiles)
        largest = runner.max_image_token_count(self._loaded, grid)
        bounds = []
        for chunk in chunked(requests, _TOKENIZE_CHUNK):
            prompts = [self._prompt(request, bodies, truncate=truncate, cut=True, warn=False) for request in chunk]
            for request, ids in zip(chunk, tokenizer(prompts)["input_ids"]):
                count = len(ids)
                for image in request.images:
                    size = self._images.peek_size(image)
                    features = largest if size is None else runner.image_token_count(self._loaded, *size, grid)
                    count += features - 1  # the <image> slot becomes its features
                bounds.append(count)
        return bounds

    def _embedded_batches(
        self, batches: list[list[Request]], bodies: dict[str, str]
    ) -> Iterator[tuple[list[tuple[Any, ...]], np.ndarray]]:
        """Each batch's request keys and vectors, in order."""
        if self.workers > 1 and len(batches) > 1:
            yield from self._parallel_batches(batches, bodies)
            return
        for prepared in self._prepared_batches(batches, bodies):
            yield prepared.keys, self._forward(prepared.encoded)

    def _parallel_batches(
        self, batches: list[list[Request]], bodies: dict[str, str]
    ) -> Iterator[tuple[list[tuple[Any, ...]], np.ndarray]]:
        """``workers`` batches at once on a CPU, each on a thread of its own with an equal
        share of torch's threads. Preparations take turns (a fast tokenizer must not be
        called from two threads at once); forwards run side by side, under the model's
        lock held for the whole call."""
        threads = torch.get_num_threads()
        preparing = threading.Lock()

        def embed(batch: list[Request]) -> tuple[list[tuple[Any, ...]], np.ndarray]:
            with preparing:
                prepared = self._prepare(batch, bodies)
            with torch.inference_mode():
                return prepared.keys, _checked(runner.forward(self._loaded, prepared.encoded))

        pending: deque[Future[tuple[list[tuple[Any, ...]], np.ndarray]]] = deque()
        try:
            with (
                self._loaded.lock,
                ThreadPoolExecutor(
                    self.workers,
                    thread_name_prefix="e5v-worker",
                    initializer=torch.set_num_threads,
                    initargs=(max(1, threads // self.workers),),
                ) as pool,
            ):
                try:
                    for batch in batches:
                        pending.append(pool.submit(embed, batch))
                        if len(pending) > self.workers:  # every worker busy, one batch queued
                            yield pending.popleft().result()
                    while pending:
                        yield pending.popleft().result()
                finally:
                    for future in pending:
                        future.cancel()
        finally:
            torch.set_num_threads(threads)  # the workers' setting is also what new threads start with

    def _prepared_batches(self, batches: list[list[Request]], bodies: dict[str, str]) -> Iterator[_Prepared]:
        """Prepare batches in turn, or with ``prepare_ahead`` on a worker thread, one batch
        ahead of the model and with a batch's images processed on several threads (on an
        accelerator the host's preparation, not the model, can be what limits the rate)."""
        if not self.prepare_ahead:
            yield from (self._prepare(batch, bodies) for batch in batches)
            return
        with (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="e5v-prepare") as pool,
            ThreadPoolExecutor(_image_threads(), thread_name_prefix="e5v-images") as image_pool,
        ):
            pending: Future[_Prepared] = pool.submit(self._prepare, batches[0], bodies, image_pool)
            for following in batches[1:]:
                current = pending.result()
                pending = pool.submit(self._prepare, following, bodies, image_pool)
                yield current
            yield pending.result()

    def _prepare(
        self, requests: Sequence[Request], bodies: dict[str, str], image_pool: Executor | None = None
    ) -> _Prepared:
        """Encode a batch: images decoded in turn (two prompts may share one source) and
        processed on ``image_pool``'s threads if given, the prompts tokenised in one call."""
        decoding = threading.Lock()

        def pixels_of(request: Request) -> runner.Pixels | None:
            return self._pixels(request, decoding)[0]

        if image_pool is not None:
            pixels = list(image_pool.map(pixels_of, requests))
        else:
            pixels = [pixels_of(request) for request in requests]
        prompts = [self._prompt(request, bodies, truncate=True) for request in requests]
        return _Prepared([request.key() for request in requests], runner.tokenize(self._loaded, prompts, pixels))

    def _pixels(self, request: Request, decoding: threading.Lock | None = None) -> tuple[runner.Pixels | None, int]:
        """The request's images decoded (under ``decoding``, if given) and processed, and
        their decoded pixel count."""
        with decoding or contextlib.nullcontext():
            images = [self._images.load(image, request.index) for image in request.images]
        pixels = sum(image.width * image.height for image in images)
        return runner.process_images(self._loaded, images, max_image_tiles=self.max_image_tiles), pixels

    def _prompt(
        self, request: Request, bodies: dict[str, str], *, truncate: bool = False, cut: bool = False, warn: bool = True
    ) -> str:
        """The request's full prompt (an image's text is empty); with ``truncate`` its text
        cut to ``max_text_tokens``, as embedded; with ``cut`` only cheaply, by characters
        (:meth:`_cut`: what planning and keys need); cache keys use it whole."""
        if truncate:
            text = self._truncate(request.text, request.index, warn)
        else:
            text = self._cut(request.text) if cut else request.text
        return self.prompts.wrap(fill(bodies[request.kind], text))

    @property
    def max_text_chars(self) -> int:
        """Characters of a text (between image slots) that can hold ``max_text_tokens``
        tokens at most: ``max_text_tokens`` times the longest token of the vocabulary."""
        if self._text_cap is None:
            vocabulary = self._loaded.processor.tokenizer.get_vocab()
            self._text_cap = self.max_text_tokens * max((len(token) for token in vocabulary), default=1)
        return self._text_cap

    def _cut(self, text: str) -> str:
        """``text`` with each piece between image slots cut to :attr:`max_text_chars`: a
        longer piece has more than ``max_text_tokens`` tokens (no token covers more
        characters than its own length), so the cut never shortens a text the model takes
        whole, and bounds what the tokenizer is given."""
        if len(text) <= self.max_text_chars:
            return text
        return IMAGE_TOKEN.join(piece[: self.max_text_chars] for piece in text.split(IMAGE_TOKEN))

    def _truncate(self, text: str, index: int, warn: bool = True) -> str:
        """Cut text longer than ``max_text_tokens`` tokens (image slots excepted), after
        the cheap cut by characters (:meth:`_cut`), so the tokenizer never sees more than
        :attr:`max_text_chars` characters a piece."""
        if len(text.encode("utf-8")) <= self.max_text_tokens:
            return text  # a byte-level token covers at least one byte
        tokenizer = self._loaded.processor.tokenizer
        whole = len(text)
        pieces = self._cut(text).split(IMAGE_TOKEN)
        ids = [tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in pieces]
        counts = [len(piece_ids) for piece_ids in ids]
        if sum(counts) <= self.max_text_tokens:
            return text
        if warn:
            more = (
                f"more than {sum(counts)}"
                if sum(len(piece) for piece in pieces) + len(pieces) - 1 < whole
                else sum(counts)
            )
            logger.warning("item %d: text of %s tokens cut to max_text_tokens=%d", index, more, self.max_text_tokens)
        budget = self.max_text_tokens
        kept = []
        for piece, piece_ids in zip(pieces, ids):
            kept.append(tokenizer.decode(piece_ids[:budget]) if len(piece_ids) > budget else piece)
            budget -= min(len(piece_ids), budget)
        return IMAGE_TOKEN.join(kept)

    def _forward(self, batch: list[runner.Encoded]) -> np.ndarray:
        """Forward one batch; on CUDA out-of-memory, halve it and retry down to one item."""
        try:
            with self._loaded.lock, torch.inference_mode():
                vectors = runner.forward(self._loaded, batch)
        except torch.cuda.OutOfMemoryError as exc:
            if len(batch) == 1:
                raise EmbeddingError(
                    f"out of GPU memory on a single item of {batch[0].length} tokens; use a smaller dtype, "
                    "device_map='auto', or a lower image resolution"
                ) from exc
            torch.cuda.empty_cache()
            half = len(batch) // 2
            logger.warning("out of GPU memory on a batch of %d; retrying in halves", len(batch))
            return np.concatenate([self._forward(batch[:half]), self._forward(batch[half:])])
        return _checked(vectors)


def _image_threads() -> int:
    """Threads for the image processor: the CPUs this process may use, at most
    :data:`MAX_IMAGE_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_IMAGE_THREADS, cpus))


def _checked(vectors: torch.Tensor) -> np.ndarray:
    """The batch's vectors as numpy, refused if any value is not finite."""
    result = vectors.cpu().numpy()
    if not np.isfinite(result).all():
        raise EmbeddingError(
            "the model produced non-finite values (overflow in float16?); use dtype='bfloat16' or 'float32'"
        )
    return result


def _quantization_kwargs(
    quantization: str, model_kwargs: dict[str, Any] | None, device: torch.device, dtype: str | torch.dtype | None
) -> dict[str, Any]:
    """``model_kwargs`` with a bitsandbytes config; the vision tower and projector stay unquantised."""
    if quantization not in ("8bit", "4bit"):
        raise ConfigurationError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")
    require("bitsandbytes", "quantization")
    if device.type != "cuda":
        raise ConfigurationError(f"quantization={quantization!r} runs on CUDA only, not on {device}; use dtype instead")
    bits = 8 if quantization == "8bit" else 4
    config = loading.bitsandbytes_config(bits, loading.resolve_dtype(dtype, device))
    return {**(model_kwargs or {}), "quantization_config": config}


def _batch_size(option: int | str, device: torch.device) -> int:
    """``"auto"``: the device's most items a batch; a number as it is."""
    return AUTO_BATCH_SIZE.get(device.type, GPU_BATCH_SIZE) if option == "auto" else int(option)


def _batch_token_budget(option: int | str | None, device: torch.device, workers: int) -> int | None:
    """``"auto"``: the device's tokens in flight, an equal share for each worker's batch."""
    if option == "auto":
        return max(1, AUTO_MAX_BATCH_TOKENS.get(device.type, GPU_MAX_BATCH_TOKENS) // workers)
    _check_token_budget(option)
    return option  # type: ignore[return-value]


def _check_token_budget(option: object) -> None:
    if option not in ("auto", None) and (isinstance(option, bool) or not isinstance(option, int) or option < 1):
        raise ConfigurationError(f"max_batch_tokens must be 'auto', None or at least 1, got {option!r}")


def _bodies_of(prompt_set: PromptSet) -> dict[str, str]:
    return {
        "text": prompt_set.text,
        "image": prompt_set.image,
        "composed": prompt_set.composed,
        "interleaved": prompt_set.interleaved,
    }


def _progress(total: int, enabled: bool) -> Callable[[int | None], None]:
    """A progress callback: ``n`` items done, ``None`` to close."""
    if not enabled:
        return lambda _n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="Embedding", unit="item")

    def update(n: int | None) -> None:
        if n is None:
            bar.close()
        else:
            bar.update(n)

    return update
