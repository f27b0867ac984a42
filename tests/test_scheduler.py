"""The scheduler in front of one embedder: jobs of many callers merged, each kept to itself."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from e5v import Composed
from e5v.core.inputs import image_request, text_request
from e5v.errors import InvalidInputError, QueueFullError
from e5v.server.scheduler import RoundStats, Scheduler


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
        assert sum(stats.items for stats in rounds) == 64 and len(rounds) < 32  # merged
        assert all(stats.seconds > 0 and stats.tokens > 0 for stats in rounds)
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


def test_a_large_job_is_spread_over_rounds_and_a_one_item_job_waits_one_round(embedder) -> None:
    """The fairness promised: a one-item job that arrives while a large one is being
    embedded is in the next round, not after the large job."""
    rounds: list[RoundStats] = []
    started = threading.Event()
    gate = threading.Event()

    def hold_first(stats: RoundStats) -> None:
        rounds.append(stats)
        started.set()
        gate.wait(30)  # the first round's end waits until the small job is queued and prepared

    scheduler = Scheduler(embedder, max_round_items=4, on_round=hold_first)
    bodies = embedder.prompt_bodies()
    try:
        large = scheduler.submit(texts(*(f"passage number {n}" for n in range(40))), bodies)
        assert started.wait(60)
        small = scheduler.submit(texts("one word"), bodies)
        time.sleep(0.5)  # its item is prepared meanwhile (milliseconds), off the model's thread
        gate.set()
        small.result(timeout=60)
        rounds_when_small_done = len(rounds)
        assert not large.done()  # the large job's items are still going
        assert rounds_when_small_done <= 2, rounds  # the round running, then the next one
        np.testing.assert_allclose(small.result().vectors, embedder.embed_texts(["one word"]), atol=1e-5)
        result = large.result(timeout=120)
        np.testing.assert_allclose(
            result.vectors, embedder.embed_texts([f"passage number {n}" for n in range(40)]), atol=1e-5
        )
        assert all(stats.items <= 4 for stats in rounds)
        assert len(rounds) >= 10  # 41 items, 4 a round
    finally:
        scheduler.close()


def test_a_job_over_the_pixel_budget_is_refused(embedder) -> None:
    from e5v.errors import RequestTooLargeError

    image = Image.new("1", (3000, 2000))  # 6 M pixels, a few hundred bytes as PNG
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = buffer.getvalue()
    scheduler = Scheduler(embedder, max_request_pixels=10_000_000)
    try:
        with pytest.raises(RequestTooLargeError, match=r"^item 1: .*12000000 pixels .* limit of 10000000"):
            scheduler.submit([image_request(png, 0), image_request(png, 1)], embedder.prompt_bodies())
        one = scheduler.submit([image_request(png, 0)], embedder.prompt_bodies()).result(timeout=120)
        np.testing.assert_allclose(one.vectors, embedder.embed_images([png]), atol=1e-5)
    finally:
        scheduler.close()


def test_prepared_items_embed_as_the_embedder_does(embedder, photo_dir) -> None:
    """prepare + embed_prepared (the server's path) give the in-process vectors, prompt
    presets mixed in one round, and each item's token count as embedded."""
    from e5v.core.inputs import Interleaved, composed_request, interleaved_request

    cat = (photo_dir / "cat.png").read_bytes()
    default, cirr = embedder.prompt_bodies(), embedder.prompt_bodies("cirr")
    requests = [
        (text_request("a cat", 0), default),
        (image_request(cat, 1), default),
        (image_request(cat, 2), cirr),
        (composed_request(cat, "make it a dog", 3), default),
        (interleaved_request(Interleaved([cat, "a caption"]), 4), default),
        (text_request("a cat", 5), default),
    ]
    prepared = [embedder.prepare(request, bodies) for request, bodies in requests]
    got = embedder.embed_prepared(prepared)
    expected = np.concatenate(
        [
            embedder.embed(["a cat", cat]),
            embedder.embed([cat], prompts="cirr"),
            embedder.embed([Composed(cat, "make it a dog"), Interleaved([cat, "a caption"]), "a cat"]),
        ]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    for (request, bodies), item in zip(requests, prepared):
        assert item.tokens == embedder.token_counts([request], bodies)[0]
    assert prepared[1].pixels == Image.open(photo_dir / "cat.png").width * Image.open(photo_dir / "cat.png").height


def test_a_served_item_is_tokenised_once_and_its_tokens_come_back_with_its_vector(
    embedder, photo_dir, monkeypatch
) -> None:
    """From submit to the job's result, each item meets the tokenizer once (preparing it); its
    token count travels with it to the result, never counted again."""
    from e5v.core.inputs import Interleaved, composed_request, interleaved_request

    cat = (photo_dir / "cat.png").read_bytes()
    requests = [
        text_request("a served text", 0),
        image_request(cat, 1),
        composed_request(cat, "make it a dog", 2),
        interleaved_request(Interleaved([cat, "a caption"]), 3),
    ]
    bodies = embedder.prompt_bodies()
    tokenizer = type(embedder.processor.tokenizer)
    calls: list[object] = []
    real = tokenizer.__call__

    def counted(self, text, *args, **kwargs):  # the real tokenizer, counted
        calls.extend(text if isinstance(text, list) else [text])
        return real(self, text, *args, **kwargs)

    scheduler = Scheduler(embedder)
    try:
        monkeypatch.setattr(tokenizer, "__call__", counted)
        result = scheduler.submit(requests, bodies).result(timeout=120)
        monkeypatch.undo()
    finally:
        scheduler.close()
    assert len(calls) == len(requests)
    assert result.tokens == [embedder.token_counts([request], bodies)[0] for request in requests]


def test_a_huge_text_is_cut_by_characters_before_tokenising(embedder) -> None:
    """A text far over max_text_tokens reaches the tokenizer cut to max_text_chars, and
    embeds as the same text cut there by hand; a text within the limit is never cut."""
    huge = "word " * 400_000  # 2 MB
    cap = embedder.max_text_chars
    assert cap < len(huge)
    request = text_request(huge, 0)
    item = embedder.prepare(request, embedder.prompt_bodies())
    assert item.tokens <= embedder.max_text_tokens + 64
    np.testing.assert_allclose(embedder.embed_prepared([item]), embedder.embed_texts([huge[:cap]]), atol=1e-5)
    within = "word " * 10
    assert embedder._cut(within) == within
