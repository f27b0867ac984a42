"""The scheduler in front of one embedder: jobs of many callers merged, each kept to itself."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

from e5v.errors import InvalidInputError
from e5v.inputs import image_request, text_request
from e5v.scheduler import QueueFullError, RoundStats, Scheduler


def texts(*values: str) -> list:
    return [text_request(value, index) for index, value in enumerate(values)]


def test_jobs_from_many_threads_get_their_own_vectors(embedder) -> None:
    rounds: list[RoundStats] = []
    scheduler = Scheduler(embedder, on_round=rounds.append)
    bodies = embedder.prompt_bodies()
    try:
        with ThreadPoolExecutor(16) as pool:
            futures = list(pool.map(lambda n: scheduler.submit(texts(f"job {n}", "shared"), bodies), range(32)))
            results = [future.result(timeout=120) for future in futures]
        for n, result in enumerate(results):
            np.testing.assert_allclose(result.vectors, embedder.embed_texts([f"job {n}", "shared"]), atol=1e-5)
            assert len(result.tokens) == 2 and all(count > 0 for count in result.tokens)
        assert sum(stats.jobs for stats in rounds) == 32 and len(rounds) < 32  # merged
        assert all(stats.seconds > 0 for stats in rounds)
    finally:
        scheduler.close()


def test_a_bad_item_fails_only_its_job_with_its_own_index(embedder, photo_dir) -> None:
    gate = threading.Event()
    scheduler = Scheduler(embedder, on_round=lambda _stats: gate.wait(30))  # the first round waits for the rest
    bodies = embedder.prompt_bodies()
    try:
        first = scheduler.submit(texts("held"), bodies)
        good = scheduler.submit(texts("a", "b"), bodies)
        bad = scheduler.submit([image_request(photo_dir / "cat.png", 0), image_request(b"not an image", 1)], bodies)
        after = scheduler.submit(texts("c"), bodies)
        gate.set()
        first.result(timeout=60)
        with pytest.raises(InvalidInputError, match=r"^item 1: ") as raised:
            bad.result(timeout=60)
        assert raised.value.index == 1
        np.testing.assert_allclose(good.result(timeout=60).vectors, embedder.embed_texts(["a", "b"]), atol=1e-5)
        np.testing.assert_allclose(after.result(timeout=60).vectors, embedder.embed_texts(["c"]), atol=1e-5)
    finally:
        scheduler.close()


def test_a_cancelled_job_is_dropped_and_a_full_queue_refuses(embedder) -> None:
    gate = threading.Event()
    rounds: list[RoundStats] = []

    def hold(stats: RoundStats) -> None:
        rounds.append(stats)
        gate.wait(30)

    scheduler = Scheduler(embedder, max_queued_items=3, on_round=hold)
    bodies = embedder.prompt_bodies()
    try:
        running = scheduler.submit(texts("running"), bodies)
        while not rounds:  # the first job is taken: the queue is empty again
            threading.Event().wait(0.01)
        dropped = scheduler.submit(texts("dropped", "too"), bodies)
        kept = scheduler.submit(texts("kept"), bodies)
        with pytest.raises(QueueFullError, match="holds 3 items and takes at most 3"):
            scheduler.submit(texts("one more"), bodies)
        assert dropped.cancel()
        gate.set()
        running.result(timeout=60)
        kept.result(timeout=60)
        with pytest.raises(CancelledError):
            dropped.result()
        assert [stats.jobs for stats in rounds] == [1, 1]  # the cancelled job never reached the model
    finally:
        scheduler.close()
