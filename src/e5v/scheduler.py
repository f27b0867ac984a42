"""Embedding the items of many callers together: one queue in front of one embedder.

Callers :meth:`Scheduler.submit` jobs (a list of checked requests and their prompt
bodies) from any thread and get a future of the job's vectors. One thread takes the
jobs waiting, oldest first, merges those with the same prompts into one call of the
embedder's own pipeline (dedup, cache, token-budgeted batch planning, prepare-ahead,
forward and pooling), and splits the vectors back. A job's vectors are those the
embedder returns for it alone. A bad item fails only its own job: the others of the
round are embedded again without it.
"""

from __future__ import annotations

import dataclasses
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

from e5v.errors import E5VError, InvalidInputError
from e5v.inputs import Request

if TYPE_CHECKING:
    from e5v.embedder import E5VEmbedder

__all__ = ["Embedded", "Job", "QueueFullError", "RoundStats", "Scheduler"]

logger = logging.getLogger(__name__)

#: Items merged into one round, at most (a single larger job still goes alone).
DEFAULT_MAX_ROUND_ITEMS = 512
#: Items waiting in the queue, at most; beyond it :meth:`Scheduler.submit` refuses jobs.
DEFAULT_MAX_QUEUED_ITEMS = 4096


class QueueFullError(E5VError):
    """The queue holds as many items as it may; retry later."""


@dataclass(frozen=True)
class Embedded:
    """A job's vectors (one row per request, in order) and each request's prompt tokens."""

    vectors: np.ndarray
    tokens: list[int]


@dataclass(eq=False)
class Job:
    """One caller's items: their :class:`Embedded`, or an error, arrive on ``future``."""

    requests: list[Request]
    bodies: dict[str, str]
    future: Future[Embedded] = field(default_factory=Future)

    @property
    def prompts_key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.bodies.items()))


@dataclass
class RoundStats:
    """What one round embedded: its jobs, items and the seconds the embedder took."""

    jobs: int
    items: int
    seconds: float


class Scheduler:
    """A queue of jobs in front of an embedder's pipeline
    (:meth:`~e5v.embedder.E5VEmbedder.embed_requests`), run on one thread, which also
    counts each job's tokens (the tokenizer is never called from two threads at once).

    ``batching=False`` embeds one job per round (the baseline a benchmark compares with).
    ``on_round`` is called after each round with its :class:`RoundStats`. With
    ``thread=False`` no thread is started: the caller runs :meth:`serve` on the thread
    that loaded the model (torch on a CPU runs slower, up to 1.7x measured, when a
    second thread's OpenMP pool competes with the first's for the cores).
    """

    def __init__(
        self,
        embedder: E5VEmbedder,
        *,
        batching: bool = True,
        max_round_items: int = DEFAULT_MAX_ROUND_ITEMS,
        max_queued_items: int = DEFAULT_MAX_QUEUED_ITEMS,
        on_round: Callable[[RoundStats], None] = lambda _stats: None,
        thread: bool = True,
    ) -> None:
        self.embedder = embedder
        self.batching = batching
        self.max_round_items = max_round_items
        self.max_queued_items = max_queued_items
        self._on_round = on_round
        self._queue: deque[Job] = deque()
        self._queued_items = 0
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self.serve, name="e5v-scheduler", daemon=True)
            self._thread.start()

    @property
    def queued_items(self) -> int:
        return self._queued_items

    def submit(self, requests: list[Request], bodies: dict[str, str]) -> Future[Embedded]:
        """Queue a job (at least one request); its future gets its :class:`Embedded`.
        Cancel the future to drop the job if it has not started. Raises
        :class:`QueueFullError`."""
        job = Job(list(requests), dict(bodies))
        with self._wake:
            if self._closed:
                raise E5VError("the scheduler is closed")
            if self._queued_items + len(job.requests) > self.max_queued_items and self._queue:
                raise QueueFullError(
                    f"the queue holds {self._queued_items} items and takes at most {self.max_queued_items}; retry later"
                )
            self._queue.append(job)
            self._queued_items += len(job.requests)
            self._wake.notify()
        return job.future

    def close(self) -> None:
        """Stop taking jobs; the ones queued fail, the round running finishes (and, on
        the scheduler's own thread, is waited for)."""
        with self._wake:
            self._closed = True
            pending, self._queue = list(self._queue), deque()
            self._queued_items = 0
            self._wake.notify()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(E5VError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()

    def _next_round(self) -> list[Job] | None:
        """The oldest job and, when batching, the later ones with the same prompts that fit."""
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            taken, items, kept = [first], len(first.requests), deque()
            while self.batching and self._queue:
                job = self._queue.popleft()
                if job.prompts_key == first.prompts_key and items + len(job.requests) <= self.max_round_items:
                    taken.append(job)
                    items += len(job.requests)
                else:
                    kept.append(job)
            self._queue = kept + self._queue
            self._queued_items -= items
        return [job for job in taken if job.future.set_running_or_notify_cancel()]  # drops cancelled jobs

    def serve(self) -> None:
        """Run rounds on this thread until :meth:`close`."""
        # A thread started while another (e.g. uvicorn's event loop) holds the main one ran
        # torch's CPU kernels on one core although get_num_threads() said 2; setting the count
        # again on this thread gives its parallel regions their full pool.
        torch.set_num_threads(torch.get_num_threads())
        while (jobs := self._next_round()) is not None:
            if jobs:
                start = time.perf_counter()
                items = sum(len(job.requests) for job in jobs)
                self._run(jobs)
                self._on_round(RoundStats(len(jobs), items, time.perf_counter() - start))

    def _run(self, jobs: list[Job]) -> None:
        """Embed the jobs as one call; a job with a bad item fails alone, the rest go again."""
        while jobs:
            merged: list[Request] = []
            offsets = []
            for job in jobs:
                offset = len(merged)
                offsets.append(offset)
                merged.extend(dataclasses.replace(request, index=offset + i) for i, request in enumerate(job.requests))
            try:
                vectors = self.embedder.embed_requests(merged, jobs[0].bodies)
                tokens = self.embedder.token_counts(merged, jobs[0].bodies)
            except InvalidInputError as exc:
                if exc.index is None:
                    self._fail(jobs, exc)
                    return
                bad = max(number for number, offset in enumerate(offsets) if offset <= exc.index)
                jobs[bad].future.set_exception(exc.shifted(-offsets[bad]))
                jobs = jobs[:bad] + jobs[bad + 1 :]
                continue
            except Exception as exc:  # the model failed: every job of the round gets the error
                logger.exception("a round of %d jobs failed", len(jobs))
                self._fail(jobs, exc)
                return
            for job, offset in zip(jobs, offsets):
                end = offset + len(job.requests)
                job.future.set_result(Embedded(vectors[offset:end], tokens[offset:end]))
            return

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            job.future.set_exception(error)
