"""The wire's two sides agree: what :mod:`e5v.wire.encode` writes for an input, the schema of
:mod:`e5v.wire.schema` parses back into the core requests the in-process embedder builds from
that input (texts, images, composed, interleaved and mixed lists), images carried as their bytes."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from e5v import Composed, Interleaved, InvalidInputError
from e5v.core.inputs import (
    ImageLoader,
    Request,
    composed_request,
    image_request,
    interleaved_request,
    text_request,
    to_request,
)
from e5v.wire import encode
from e5v.wire.schema import embedding_request

LOADER = ImageLoader()


def parsed(items: list[encode.WireItem]) -> list[Request]:
    """The items sent as the client sends them (as JSON text), parsed as the server parses them."""
    body = json.loads(json.dumps({"input": [item.json for item in items], "encoding_format": "base64"}))
    return embedding_request(body).requests(allow_remote=False)


def pixels(image: object) -> np.ndarray:
    return np.asarray(LOADER.load(image, 0))


def assert_same(got: list[Request], expected: list[Request]) -> None:
    """Equal requests: kind, position and text equal, each image of equal pixels (and, where the
    input was encoded bytes already, of equal bytes)."""
    assert [(r.kind, r.index, r.text, len(r.images)) for r in got] == [
        (r.kind, r.index, r.text, len(r.images)) for r in expected
    ]
    for mine, theirs in zip(got, expected):
        for sent, original in zip(mine.images, theirs.images):
            assert isinstance(sent, bytes)  # a data: URI, decoded: the server never reads a path
            if isinstance(original, bytes):
                assert sent == original
            elif isinstance(original, Path):
                assert sent == original.read_bytes()
            np.testing.assert_array_equal(pixels(sent), pixels(original))


@pytest.fixture(scope="module")
def images(photo_dir: Path, photos: dict[str, Image.Image]) -> list[Any]:
    """One image of each kind the client takes: a path, a str path, encoded bytes, a PIL image, an array."""
    jpeg = io.BytesIO()
    photos["coffee"].save(jpeg, format="JPEG")
    return [
        photo_dir / "cat.png",
        str(photo_dir / "camera.png"),
        jpeg.getvalue(),
        photos["logo"],
        np.asarray(photos["astronaut"]),
    ]


def test_texts_read_back_as_the_same_requests() -> None:
    texts = ["a photo of a cat", "naïve café ☕ <sent> {braces}", "x" * 5000]
    assert parsed(encode.text_items(texts)) == [text_request(text, i) for i, text in enumerate(texts)]


def test_images_read_back_as_the_same_requests(images: list[Any]) -> None:
    sent = encode.image_items(images)
    assert_same(parsed(sent), [image_request(image, i) for i, image in enumerate(images)])
    assert [item.pixels for item in sent] == [
        451 * 300,
        512 * 512,
        600 * 400,
        500 * 500,
        512 * 512,
    ]  # from the headers, as the server counts them


def test_composed_read_back_as_the_same_requests(images: list[Any]) -> None:
    texts = [f"make it {n} times bluer" for n in range(len(images))]
    expected = [composed_request(image, text, i) for i, (image, text) in enumerate(zip(images, texts))]
    assert_same(parsed(encode.composed_items(images, texts)), expected)


def test_interleaved_read_back_as_the_same_requests(images: list[Any]) -> None:
    items: list[Interleaved | list[Any]] = [
        Interleaved(["first", images[0], "then", images[3]]),
        [images[2], "a caption after the image"],
        Interleaved([images[4]]),
        ["text only, in parts", "two of them"],
    ]
    expected = [
        interleaved_request(item if isinstance(item, Interleaved) else Interleaved(item), i)
        for i, item in enumerate(items)
    ]
    assert_same(parsed(encode.interleaved_items(items)), expected)


def test_a_mixed_list_reads_back_as_the_same_requests(images: list[Any]) -> None:
    items = ["a text", images[0], Composed(images[3], "as a sketch"), Interleaved(["see", images[1]]), images[4]]
    assert_same(parsed(encode.mixed_items(items)), [to_request(item, i) for i, item in enumerate(items)])


def test_a_data_uri_goes_as_it_is_and_arrives_as_its_bytes(images: list[Any]) -> None:
    [item] = encode.image_items([images[2]])
    uri = item.json["image_url"]["url"]
    assert uri.startswith("data:image/jpeg;base64,")
    [again] = encode.image_items([uri])
    assert again == item
    assert_same(parsed([again]), [image_request(images[2], 0)])


def test_remote_urls_go_as_they_are() -> None:
    url = "https://example.org/cat.png"
    [item] = encode.image_items([url])
    assert item.json == {"type": "image_url", "image_url": {"url": url}} and item.pixels == 0
    assert embedding_request({"input": [item.json]}).requests(allow_remote=True) == [image_request(url, 0)]


@pytest.mark.parametrize(
    "encoder",
    [
        lambda: encode.text_items(["ok", 5]),
        lambda: encode.image_items([b"not read here", Path("/nonexistent/e5v.png")]),
        lambda: encode.mixed_items(["ok", object()]),
    ],
)
def test_a_bad_input_is_refused_naming_its_index(encoder: Callable[[], object]) -> None:
    with pytest.raises(InvalidInputError) as caught:
        encoder()
    assert caught.value.index == 1
