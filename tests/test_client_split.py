"""``RemoteEmbedder`` splits a call into requests within the server's ``max_request_pixels``
(and ``max_client_batch_size``), against the real ``e5v serve``: a batch of photos holding five
times the budget embeds as each photo alone does, and an image over the budget alone is refused,
naming it, before any request is sent."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import KEY, start_server, stop

from e5v import Composed, Interleaved, InvalidInputError, RemoteEmbedder
from e5v.wire.encode import WireItem, chunks

#: Pixels a request: every fixture photo is under it (the largest, rocket, has 640x427 = 273,280).
BUDGET = 300_000
#: Items a request, so that both limits cut the calls below.
ITEMS = 3


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path, "--max-request-pixels", str(BUDGET), "--max-client-batch-size", str(ITEMS))
    yield url
    stop(process)


def answered(url: str) -> float:
    """The server's ``e5v_requests_total``, summed over statuses."""
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    return sum(
        sample.value
        for family in families
        if family.name == "e5v_requests"
        for sample in family.samples
        if sample.name == "e5v_requests_total"
    )


def test_the_server_reports_its_pixel_budget(server: str) -> None:
    with RemoteEmbedder(server, api_key=KEY) as remote:
        assert remote.info["max_request_pixels"] == BUDGET


def test_photos_over_the_budget_together_embed_as_each_alone(server: str, photos: dict, photo_dir: Path) -> None:
    paths = sorted(photo_dir.glob("*.png"))
    total = sum(photos[path.stem].width * photos[path.stem].height for path in paths)
    assert total > 4 * BUDGET and all(photos[path.stem].width * photos[path.stem].height < BUDGET for path in paths)
    with RemoteEmbedder(server, api_key=KEY) as remote:
        alone = np.concatenate([remote.embed_images([path]) for path in paths])
        before = answered(server)
        together = remote.embed_images(paths)
        sent = answered(server) - before
        in_async = asyncio.run(remote.aembed_images(paths))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(in_async, alone, rtol=0, atol=1e-5)
    assert math.ceil(total / BUDGET) <= sent <= len(paths)  # more than the ceil(7 / 3) = 3 that ITEMS alone makes


def test_mixed_items_over_the_budget_together_embed_as_each_alone(server: str, photos: dict, photo_dir: Path) -> None:
    mixed = [
        "a cat",
        photos["rocket"],  # 273,280 pixels
        Interleaved([photos["cat"], "on a sofa", photo_dir / "text.png"]),  # 135,300 + 77,056
        Composed(photos["coffee"], "in a red cup"),  # 240,000
        (photo_dir / "astronaut.png").read_bytes(),  # 262,144
        "espresso",
    ]
    with RemoteEmbedder(server, api_key=KEY) as remote:
        alone = np.concatenate([remote.embed([item]) for item in mixed])
        together = remote.embed(mixed)
        in_async = asyncio.run(remote.aembed(mixed))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(in_async, alone, rtol=0, atol=1e-5)


def test_an_item_over_the_budget_alone_is_refused_before_anything_is_sent(
    server: str, photo_dir: Path, tmp_path: Path
) -> None:
    big = Image.new("RGB", (600, 600), "white")  # 360,000 pixels
    big_file = tmp_path / "big.png"
    big.save(big_file)
    fits = [photo_dir / name for name in ("cat.png", "text.png", "coffee.png", "rocket.png")]
    with RemoteEmbedder(server, api_key=KEY) as remote:
        remote.info  # noqa: B018 - fetched before counting
        before = answered(server)
        over = rf"its images hold {{}} pixels, over the server's limit of {BUDGET} a request"
        with pytest.raises(InvalidInputError, match=rf"^item 4: {over.format(360000)}") as raised:
            remote.embed_images([*fits, big])  # after three requests' worth of photos that fit
        assert raised.value.index == 4
        with pytest.raises(InvalidInputError, match=rf"^item 4: {over.format(360000)}"):
            asyncio.run(remote.aembed_images([*fits, big_file]))
        with pytest.raises(InvalidInputError, match=rf"^item 1: {over.format(262144 + 262144)}"):
            remote.embed_interleaved([["a cat", fits[0]], [photo_dir / "camera.png", photo_dir / "astronaut.png"]])
        assert answered(server) == before


def test_chunks_close_before_either_limit_would_be_passed() -> None:
    def cut(pixels: list[int], most: int, budget: int | None) -> list[list[int]]:
        return [list(chunk) for chunk in chunks([WireItem("x", n) for n in pixels], most, budget)]

    assert cut([], 3, 10) == []
    assert cut([4, 6, 1, 0, 0, 9, 2], 3, 10) == [[0, 1], [2, 3, 4], [5], [6]]  # a chunk may hold exactly the budget
    assert cut([0] * 7, 3, 10) == [[0, 1, 2], [3, 4, 5], [6]]  # unpeekable images count 0
    assert cut([10**12] * 4, 3, None) == [[0, 1, 2], [3]]  # a server without max_request_pixels
    with pytest.raises(InvalidInputError, match=r"^item 2: its images hold 11 pixels, over the server's limit of 10"):
        cut([1, 2, 11], 3, 10)
