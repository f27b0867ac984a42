"""No request holds the model for others: huge texts and images beside a one-word request,
against a real ``e5v serve`` subprocess."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import KEY, start_server, stop

ATOL = 1e-5
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


def blank_png(width: int, height: int) -> str:
    """A one-bit PNG: a few kilobytes to send, ``width * height`` pixels to decode."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: object, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=HEADERS, timeout=timeout)


def test_a_one_word_request_is_not_held_by_huge_texts_and_images(server: str, embedder) -> None:
    huge_text = "lorem ipsum dolor sit amet " * 500_000  # 13.5 MB, under the 16 MiB payload limit
    bombs = [{"type": "image_url", "image_url": {"url": blank_png(7900, 7900)}} for _ in range(8)]  # 62 M pixels each
    with ThreadPoolExecutor(2) as pool:
        text_answer = pool.submit(post, server, {"input": [huge_text]})
        images_answer = pool.submit(post, server, {"input": bombs})
        time.sleep(1.0)  # both are being prepared (the old server tokenised the text on the model's thread: 80 s)
        start = time.perf_counter()
        small = post(server, {"input": "word"})
        waited = time.perf_counter() - start
        assert small.status_code == 200, small.text
        np.testing.assert_allclose(small.json()["data"][0]["embedding"], embedder.embed_texts(["word"])[0], atol=ATOL)
        assert waited < 8, f"a one-word request waited {waited:.1f} s beside the huge ones"
        text_result, images_result = text_answer.result(), images_answer.result()
    assert text_result.status_code == 200, text_result.text
    expected = embedder.embed_texts([huge_text[: embedder.max_text_chars]])[0]
    np.testing.assert_allclose(text_result.json()["data"][0]["embedding"], expected, atol=ATOL)
    assert text_result.json()["usage"]["prompt_tokens"] <= embedder.max_text_tokens + 64
    assert images_result.status_code == 200, images_result.text
    assert len(images_result.json()["data"]) == 8


def test_a_request_over_the_pixel_budget_is_413_before_decoding(server: str) -> None:
    info = httpx.get(f"{server}/info").json()
    budget = info["max_request_pixels"]
    side = 7900
    count = budget // (side * side) + 1
    start = time.perf_counter()
    answer = post(server, {"input": [{"type": "image_url", "image_url": {"url": blank_png(side, side)}}] * count})
    assert answer.status_code == 413, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith(f"item {count - 1}: ") and f"limit of {budget} a request" in message
    assert time.perf_counter() - start < 5  # refused from the headers: nothing decoded
    assert post(server, {"input": "still serving"}).status_code == 200
