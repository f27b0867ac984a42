"""``RemoteEmbedder(max_in_flight=N)`` against a real ``e5v serve``, seen through a counting proxy:
a call's requests go side by side, at most N at once, their vectors come back in the caller's
order, an item error names the item by its place in the caller's list (the first, as one request
at a time would), a request that fails stops the others, and no worker thread or task outlives the call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from scaling import CountingProxy
from serving import KEY, start_server, stop

from e5v import EmbeddingError, InvalidInputError, RemoteEmbedder
from e5v.errors import ConfigurationError

TEXTS = [f"note {n}: a {['cat', 'rocket', 'camera', 'coffee'][n % 4]} seen on day {n}" for n in range(40)]
PER_REQUEST = 2  # items a request: 20 requests for TEXTS
IN_FLIGHT = 4


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


@pytest.fixture()
def proxy(server: str) -> Iterator[CountingProxy]:
    with CountingProxy(server, fail_marker="BREAK") as counting:
        yield counting


@pytest.fixture(scope="module")
def one_at_a_time(server: str) -> np.ndarray:
    """TEXTS embedded a request at a time, as before ``max_in_flight``."""
    with RemoteEmbedder(server, api_key=KEY) as remote:
        return remote.embed_texts(TEXTS, batch_size=PER_REQUEST)


def workers() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("e5v-remote")]


def test_requests_go_side_by_side_and_come_back_in_order(proxy: CountingProxy, one_at_a_time: np.ndarray) -> None:
    with RemoteEmbedder(proxy.url, api_key=KEY, max_in_flight=IN_FLIGHT) as remote:
        vectors = remote.embed_texts(TEXTS, batch_size=PER_REQUEST)
        assert not workers()
    assert proxy.embeddings == len(TEXTS) // PER_REQUEST
    assert 1 < proxy.peak <= IN_FLIGHT
    np.testing.assert_allclose(vectors, one_at_a_time, rtol=0, atol=1e-5)  # the server batches them otherwise


def test_one_in_flight_is_one_request_at_a_time(proxy: CountingProxy, one_at_a_time: np.ndarray) -> None:
    with RemoteEmbedder(proxy.url, api_key=KEY) as remote:
        assert remote.max_in_flight == 1
        np.testing.assert_allclose(remote.embed_texts(TEXTS, batch_size=PER_REQUEST), one_at_a_time, rtol=0, atol=1e-5)
    assert proxy.embeddings == len(TEXTS) // PER_REQUEST and proxy.peak == 1


def test_async_requests_go_side_by_side_and_come_back_in_order(proxy: CountingProxy, one_at_a_time: np.ndarray) -> None:
    async def embed() -> tuple[np.ndarray, int]:
        async with RemoteEmbedder(proxy.url, api_key=KEY, max_in_flight=IN_FLIGHT) as remote:
            vectors = await remote.aembed_texts(TEXTS, batch_size=PER_REQUEST)
        return vectors, len(asyncio.all_tasks()) - 1  # all but this one

    vectors, left = asyncio.run(embed())
    assert left == 0
    assert proxy.embeddings == len(TEXTS) // PER_REQUEST and 1 < proxy.peak <= IN_FLIGHT
    np.testing.assert_allclose(vectors, one_at_a_time, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [[13], [29, 5]])
def test_an_item_error_names_the_first_bad_item_in_the_callers_list(proxy: CountingProxy, bad: list[int]) -> None:
    texts = [f"an <image> in {n}" if n in bad else text for n, text in enumerate(TEXTS)]
    with RemoteEmbedder(proxy.url, api_key=KEY, max_in_flight=IN_FLIGHT) as remote:
        with pytest.raises(InvalidInputError, match=rf"^item {min(bad)}: .*reserved") as raised:
            remote.embed_texts(texts, batch_size=PER_REQUEST)
        assert raised.value.index == min(bad)
        assert not workers()

        async def embed() -> None:
            await remote.aembed_texts(texts, batch_size=PER_REQUEST)

        with pytest.raises(InvalidInputError, match=rf"^item {min(bad)}: ") as raised:
            asyncio.run(embed())
        assert raised.value.index == min(bad)


def test_a_failing_request_fails_the_call_and_stops_the_rest(proxy: CountingProxy) -> None:
    texts = [*TEXTS[:2], "BREAK", *TEXTS[2:]]  # in the second request of 21: the proxy answers 500 at once
    with RemoteEmbedder(proxy.url, api_key=KEY, max_in_flight=IN_FLIGHT, retries=0) as remote:
        with pytest.raises(EmbeddingError, match=r"answered 500 to .*/v1/embeddings"):
            remote.embed_texts(texts, batch_size=PER_REQUEST)
        assert not workers()
    sent = proxy.embeddings
    assert sent < len(texts) // PER_REQUEST  # the requests after it were not all sent


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2"])
def test_max_in_flight_must_be_a_whole_number_of_at_least_one(value: object) -> None:
    with pytest.raises(ConfigurationError, match="max_in_flight must be a whole number >= 1"):
        RemoteEmbedder("http://127.0.0.1:9", max_in_flight=value)  # type: ignore[arg-type]
