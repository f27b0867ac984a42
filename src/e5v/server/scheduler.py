"""Embedding the items of many callers together: fair rounds in front of one embedder.

Callers :meth:`Scheduler.submit` jobs (a list of checked requests and their prompt
bodies) from any thread and get a future of the job's vectors. A job goes through two
stages, each served in turn across the jobs waiting:

1. **Preparing**, on the scheduler's preparing threads, never the model's: each item is
   bounded and made ready by :meth:`~e5v.core.embedder.E5VEmbedder.prepare` (text cut to what
   the model takes, images decoded once and tiled, the prompt tokenised), one chunk of
   each job in turn: its next items, ending after an item with images or once the chunk's
   text reaches ``max_text_chars`` characters (so a chunk costs at most about one image
   or one longest text, and a request of short texts is one chunk). A job's decoded pixels count against
   ``max_request_pixels``. Chunks are prepared at most ``max_prepared_tokens`` ahead of the
   model, except that a job with nothing prepared or being prepared may always prepare one
   (so a new job never waits behind a full look-ahead).
2. **Rounds**, on the model's thread: a round is dealt from the jobs with prepared items
   in turn, one item each (a job's longest prepared item first, so that a large job's
   rounds are of like lengths, as one call's batches are), oldest job first, again and
   again until the round holds
   ``max_round_tokens`` tokens or ``max_round_items`` items (an item that does not fit
   is left for a later round while smaller ones still may); the jobs served go to the back
   of the turn. The round is one call of :meth:`~e5v.core.embedder.E5VEmbedder.embed_prepared`.

The fairness promised: a job's items are spread over rounds, so no job holds the model
for more than one round at a time, and a one-item job that arrives while other jobs are
being embedded is embedded in the next round, unless more jobs wait ahead of it than a
round holds items (then in the next rounds, one per round-full of jobs ahead of it).
A job's vectors equal those the embedder returns for it alone (batches are invariant).
A bad item fails its own job only, before it reaches the model.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from e5v.core.inputs import Request
from e5v.defaults import DEFAULT_MAX_REQUEST_PIXELS
from e5v.errors import E5VError, InvalidInputError, QueueFullError, RequestTooLargeError

if TYPE_CHECKING:
    from e5v.core.embedder import E5VEmbedder, Prepared

__all__ = [
    "DEFAULT_MAX_QUEUED_ITEMS",
    "DEFAULT_MAX_REQUEST_PIXELS",
    "Embedded",
    "RoundStats",
    "Scheduler",
]

logger = logging.getLogger(__name__)

#: Items waiting (submitted, not yet embedded), at most; beyond it :meth:`Scheduler.submit` refuses jobs.
DEFAULT_MAX_QUEUED_ITEMS = 4096
#: Preparing threads (image decoding and tiling, tokenising), at most.
DEFAULT_PREPARE_THREADS = 2
#: Rounds' worth of tokens prepared ahead of the model, at most.
PREPARED_ROUNDS_AHEAD = 4


@dataclass(frozen=True)
class Embedded:
    """A job's vectors (one row per request, in order) and each request's prompt tokens;
    ``queue_seconds``: from submitting the job to its first round (preparing included),
    ``inference_seconds``: from then to its last vector (0 when all came from the cache)."""

    vectors: np.ndarray
    tokens: list[int]
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0


@dataclass
class RoundStats:
    """What one round embedded: its jobs, items and tokens, and the seconds the model took."""

    jobs: int
    items: int
    seconds: float
    tokens: int = 0


@dataclass(eq=False)
class _Job:
    """One caller's items on their way: prepared ones wait in ``ready`` for a round."""

    requests: list[Request]
    bodies: dict[str, str]
    vectors: np.ndarray
    future: Future[Embedded] = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)
    next_item: int = 0  # the next request to prepare
    preparing: int = 0  # items being prepared now
    ready: list[tuple[int, Prepared]] = field(default_factory=list)  # longest first
    done: int = 0
    pixels: int = 0
    ended: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_round: float | None = None  # when a round first embedded its items

    @property
    def unprepared(self) -> bool:
        return self.next_item < len(self.requests)


class Scheduler:
    """Fair rounds of prepared items in front of an embedder (module docstring).

    ``max_round_items`` and ``max_round_tokens`` default to one forward pass of the
    embedder (its ``batch_size`` and ``max_batch_tokens``, times its CPU ``workers``).
    ``batching=False`` deals each round from one job only (the baseline a benchmark
    compares with). ``on_round`` is called after each round with its :class:`RoundStats`.
    With ``thread=False`` no model thread is started: the caller runs :meth:`serve` on the
    thread that loaded the model (torch on a CPU runs slower, up to 1.7x measured, when a
    second thread's OpenMP pool competes with the first's for the cores).
    """

    def __init__(
        self,
        embedder: E5VEmbedder,
        *,
        batching: bool = True,
        max_round_items: int | None = None,
        max_round_tokens: int | None = None,
        max_queued_items: int = DEFAULT_MAX_QUEUED_ITEMS,
        max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
        prepare_threads: int = DEFAULT_PREPARE_THREADS,
        on_round: Callable[[RoundStats], None] = lambda _stats: None,
        thread: bool = True,
    ) -> None:
        self.embedder = embedder
        self.batching = batching
        share = max(1, embedder.workers)
        self.max_round_items = max_round_items or embedder.batch_size * share
        budget = embedder.max_batch_tokens
        self.max_round_tokens = max_round_tokens or (None if budget is None else budget * share)
        self.max_queued_items = max_queued_items
        self.max_request_pixels = max_request_pixels
        self.max_prepared_tokens = (
            None if self.max_round_tokens is None else self.max_round_tokens * PREPARED_ROUNDS_AHEAD
        )
        self._on_round = on_round
        self._lock = threading.Condition()
        self._to_prepare: deque[_Job] = deque()  # jobs with items to prepare, in turn
        self._to_embed: deque[_Job] = deque()  # jobs with prepared items, in turn
        self._queued_items = 0
        self._prepared_tokens = 0
        self._closed = False
        self._preparers = [
            threading.Thread(target=self._prepare_loop, name=f"e5v-prepare-{n}", daemon=True)
            for n in range(max(1, prepare_threads))
        ]
        for preparer in self._preparers:
            preparer.start()
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self.serve, name="e5v-scheduler", daemon=True)
            self._thread.start()

    @property
    def queued_items(self) -> int:
        """Items submitted and not yet embedded."""
        return self._queued_items

    def submit(self, requests: list[Request], bodies: dict[str, str]) -> Future[Embedded]:
        """Queue a job (at least one request); its future gets its :class:`Embedded`.
        Cancel the future to drop the job. Raises :class:`QueueFullError`, and
        :class:`RequestTooLargeError` when its images' headers already claim more pixels
        than ``max_request_pixels``."""
        if not requests:
            raise ValueError("a job needs at least one request")
        self._check_pixels(requests)
        job = _Job(list(requests), dict(bodies), np.empty((len(requests), self.embedder.dimension), np.float32))
        job.tokens = [0] * len(requests)
        with self._lock:
            if self._closed:
                raise E5VError("the scheduler is closed")
            if self._queued_items + len(requests) > self.max_queued_items and self._queued_items:
                raise QueueFullError(
                    f"the queue holds {self._queued_items} items and takes at most {self.max_queued_items}; retry later"
                )
            self._queued_items += len(requests)
            self._to_prepare.append(job)
            self._lock.notify_all()
        job.future.add_done_callback(lambda future: future.cancelled() and self._cancelled(job))
        return job.future

    def close(self) -> None:
        """Stop taking jobs; the ones waiting fail, the round running finishes (and, on
        the scheduler's own thread, is waited for)."""
        with self._lock:
            self._closed = True
            jobs = {*self._to_prepare, *self._to_embed}
            self._lock.notify_all()
        for job in jobs:
            self._end(job, E5VError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()

    def serve(self) -> None:
        """Run rounds on this thread until :meth:`close`."""
        # A thread started while another (e.g. uvicorn's event loop) holds the main one ran
        # torch's CPU kernels on one core although get_num_threads() said 2; setting the count
        # again on this thread gives its parallel regions their full pool.
        torch.set_num_threads(torch.get_num_threads())
        while (dealt := self._next_round()) is not None:
            start = time.perf_counter()
            for job, _, _ in dealt:
                if job.first_round is None:
                    job.first_round = start
            self._run(dealt)
            stats = RoundStats(
                len({id(job) for job, _, _ in dealt}),
                len(dealt),
                time.perf_counter() - start,
                sum(item.tokens for _, _, item in dealt),
            )
            self._on_round(stats)

    # -- preparing --------------------------------------------------------------------

    def _check_pixels(self, requests: list[Request]) -> None:
        """Refuse a job whose images' headers claim more than ``max_request_pixels``."""
        peek = self.embedder.peek_image_size
        total = 0
        for request in requests:
            for image in request.images:
                size = peek(image)
                total += 0 if size is None else size[0] * size[1]
                if total > self.max_request_pixels:
                    raise RequestTooLargeError(self._too_many_pixels(request.index, total))

    def _too_many_pixels(self, index: int, total: int) -> str:
        return (
            f"item {index}: the request's images hold {total} pixels by then, over the server's limit of "
            f"{self.max_request_pixels} a request; send fewer or smaller images a request"
        )

    def _next_to_prepare(self) -> tuple[_Job, list[int]] | None:
        """The next chunk to prepare, in turn across jobs; ``None`` once closed."""
        with self._lock:
            while True:
                if self._closed:
                    return None
                for job in self._to_prepare:
                    ahead = job.ready or job.preparing
                    limit = self.max_prepared_tokens
                    if not ahead or limit is None or self._prepared_tokens < limit:
                        break
                else:
                    self._lock.wait()
                    continue
                self._to_prepare.remove(job)
                chunk = self._chunk(job)
                job.preparing += 1
                if job.unprepared:
                    self._to_prepare.append(job)  # to the back of the turn
                return job, chunk

    def _chunk(self, job: _Job) -> list[int]:
        """Take the job's next items to prepare together (module docstring)."""
        chunk: list[int] = []
        characters = 0
        while job.unprepared:
            request = job.requests[job.next_item]
            chunk.append(job.next_item)
            job.next_item += 1
            characters += len(request.text)
            if request.images or characters >= self.embedder.max_text_chars:
                break
        return chunk

    def _prepare_loop(self) -> None:
        while (taken := self._next_to_prepare()) is not None:
            job, chunk = taken
            try:
                prepared = self._prepared(job, chunk)
            except (InvalidInputError, RequestTooLargeError) as exc:
                self._end(job, exc)
                continue
            except Exception as exc:  # a fault of the preparation itself: the job fails, the rest go on
                logger.exception("preparing items %s of a job failed", chunk)
                self._end(job, exc)
                continue
            with self._lock:
                job.preparing -= 1
                if job.ended:
                    continue
                for index, item in zip(chunk, prepared):
                    if item.vector is not None:  # found in the cache: no round needed
                        job.vectors[index], job.tokens[index] = item.vector, item.tokens
                        job.done += 1
                        self._queued_items -= 1
                    else:
                        bisect.insort(job.ready, (index, item), key=lambda pair: (-pair[1].tokens, pair[0]))
                        self._prepared_tokens += item.tokens
                if job.ready and job not in self._to_embed:
                    self._to_embed.append(job)
                self._lock.notify_all()
            if job.done == len(job.requests):
                self._finish(job)

    def _prepared(self, job: _Job, chunk: list[int]) -> list[Prepared]:
        """The chunk's items prepared, each image's pixels counted against the job's budget."""
        prepared = []
        for index in chunk:
            if job.ended:
                break
            item = self.embedder.prepare(job.requests[index], job.bodies)
            with self._lock:  # two chunks of a job may be prepared at once
                job.pixels += item.pixels
                pixels = job.pixels
            if pixels > self.max_request_pixels:
                raise RequestTooLargeError(self._too_many_pixels(index, pixels))
            prepared.append(item)
        return prepared

    # -- rounds -----------------------------------------------------------------------

    def _next_round(self) -> list[tuple[_Job, int, Prepared]] | None:
        """Deal the next round from the jobs with prepared items, in turn; ``None`` once closed."""
        with self._lock:
            while not self._to_embed and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            dealt: list[tuple[_Job, int, Prepared]] = []
            tokens = 0
            served: list[_Job] = []
            turn = list(self._to_embed) if self.batching else [self._to_embed[0]]
            dealing = True
            while dealing:
                dealing = False
                for job in turn:
                    if not job.ready or len(dealt) >= self.max_round_items:
                        continue
                    index, item = job.ready[0]
                    if dealt and self.max_round_tokens is not None and tokens + item.tokens > self.max_round_tokens:
                        continue  # left for a later round; a smaller item of another job may still fit
                    job.ready.pop(0)
                    dealt.append((job, index, item))
                    tokens += item.tokens
                    dealing = True
                    if job not in served:
                        served.append(job)
            for job in served:  # served jobs go to the back of the turn, in order
                self._to_embed.remove(job)
                if job.ready:
                    self._to_embed.append(job)
            self._prepared_tokens -= tokens
            self._lock.notify_all()  # the look-ahead has room again
        return dealt

    def _run(self, dealt: list[tuple[_Job, int, Prepared]]) -> None:
        """Embed a round; a model failure fails every job of the round."""
        try:
            vectors = self.embedder.embed_prepared([item for _, _, item in dealt])
        except Exception as exc:
            logger.exception("a round of %d items failed", len(dealt))
            for job in {id(job): job for job, _, _ in dealt}.values():
                self._end(job, exc)
            return
        finished = []
        with self._lock:
            for (job, index, item), vector in zip(dealt, vectors):
                if job.ended:
                    continue
                job.vectors[index], job.tokens[index] = vector, item.tokens
                job.done += 1
                self._queued_items -= 1
                if job.done == len(job.requests):
                    finished.append(job)
        for job in finished:
            self._finish(job)

    # -- ending jobs ------------------------------------------------------------------

    def _finish(self, job: _Job) -> None:
        with self._lock:
            if job.ended:
                return
            job.ended = True
        if job.future.set_running_or_notify_cancel():
            now = time.perf_counter()
            began = now if job.first_round is None else job.first_round
            job.future.set_result(Embedded(job.vectors, job.tokens, began - job.submitted, now - began))

    def _end(self, job: _Job, error: BaseException) -> None:
        """Drop a job's items still waiting and give it ``error``."""
        if self._drop(job) and job.future.set_running_or_notify_cancel():
            job.future.set_exception(error)

    def _cancelled(self, job: _Job) -> None:
        self._drop(job)

    def _drop(self, job: _Job) -> bool:
        """Take a job out of both turns; ``False`` if it had already ended."""
        with self._lock:
            if job.ended:
                return False
            job.ended = True
            if job in self._to_prepare:
                self._to_prepare.remove(job)
            if job in self._to_embed:
                self._to_embed.remove(job)
            self._prepared_tokens -= sum(item.tokens for _, item in job.ready)
            job.ready.clear()
            self._queued_items -= len(job.requests) - job.done
            self._lock.notify_all()
            return True
