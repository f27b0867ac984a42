"""``RemoteEmbedder``: the :class:`~e5v.core.embedder.E5VEmbedder` methods, answered by an ``e5v serve``.

Items are sent as ``POST /v1/embeddings`` items, encoded by :mod:`e5v.wire.encode` as
:mod:`e5v.wire.schema` parses them: images travel as their encoded bytes in ``data:`` URIs
(files are read here, PIL images and arrays are encoded as PNG), and the server decodes
them. A list goes in as many requests as
keep each within the server's ``max_client_batch_size`` items and ``max_request_pixels``
(counted from the image headers, as the server counts them); errors name the item by its
index in the caller's list. Every answer is parsed and checked before a vector is returned.

One pooled :class:`httpx.Client` carries the requests of an embedder (and one
:class:`httpx.AsyncClient` its ``aembed_*`` calls). Its sockets never wait past the
deadline of the call they serve, so ``timeout`` bounds a whole call, however slowly the
server answers. ``max_in_flight`` requests of one call are sent at once (worker threads
on the one client; tasks on the async one), so that a server with several replicas
embeds a large call's requests side by side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any

import httpcore
import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from e5v.core.inputs import Interleaved
from e5v.core.protocol import Embedder
from e5v.errors import ConfigurationError, E5VError, EmbeddingError, InvalidInputError
from e5v.wire.encode import (
    WireItem,
    chunks,
    composed_items,
    image_items,
    interleaved_items,
    mixed_items,
    text_items,
)
from e5v.wire.schema import EmbeddingResponse, ErrorResponse

__all__ = [
    "API_KEY_ENV_VAR",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_TIMEOUT",
    "MAX_RETRY_AFTER",
    "Embedder",
    "RemoteEmbedder",
]

logger = logging.getLogger(__name__)

_ITEM_PREFIX = re.compile(r"^item (\d+): ", re.DOTALL)
#: The environment variable read for the API key when none is given (``e5v serve`` reads it too).
API_KEY_ENV_VAR = "E5V_API_KEY"
#: Seconds one call (all its requests, retries and waits) may take, by default.
DEFAULT_TIMEOUT = 120.0
#: The longest ``Retry-After`` (seconds) obeyed by default; a server asking for longer fails the call at once.
MAX_RETRY_AFTER = 10.0
#: Requests of one call in flight at once, by default: one after the other, as a single server takes them best.
DEFAULT_MAX_IN_FLIGHT = 1
#: Characters of a server's answer quoted in an error.
_EXCERPT = 200
#: Bytes read of an answer that carries no vectors (``/info``, an error page).
_SMALL_ANSWER = 1 << 20
#: The monotonic time the running call must end by (``None``: no call is running).
_DEADLINE: ContextVar[float | None] = ContextVar("e5v_remote_deadline", default=None)


class _ServerInfo(BaseModel):
    """The part of ``GET /info`` the client relies on (the rest is kept as sent)."""

    model_config = ConfigDict(extra="allow")

    model: str
    dimension: int | None = Field(gt=0)
    max_batch_size: int | None = Field(gt=0)
    max_client_batch_size: int | None = Field(default=None, gt=0)
    max_request_pixels: int | None = Field(default=None, gt=0)  # absent from servers before it


class RemoteEmbedder:
    """Embeddings from an ``e5v serve`` at ``base_url`` (``http://host:port``).

    ``api_key`` (else the value of the variable ``api_key_env_var``, if set) is sent as
    ``Authorization: Bearer``. ``prompts`` names the server's prompt preset for every
    request (``None``: the server's default). One method call may take ``timeout``
    seconds in all, its requests, retries and waits included (files are read and images
    encoded before it starts). A refused connection, 429 or 503 is retried ``retries``
    times, waiting as ``Retry-After`` says (at most ``max_retry_after`` seconds, and only
    while the call's time lasts; a longer wait fails the call at once), else 0.5 s, 1 s,
    2 s ... Vectors are float32, one row per item, from answers checked in full (shape,
    rows, indices, dimension, finite values); anything else is an :class:`EmbeddingError`
    quoting what the server sent. Each method's ``batch_size`` is the most items a request
    (never more than the server takes); the server batches the items of all its clients. A
    request's images never hold more pixels than the server's ``max_request_pixels``: an
    item whose images alone do is an :class:`InvalidInputError` before anything is sent.

    ``max_in_flight`` (default :data:`DEFAULT_MAX_IN_FLIGHT`) is how many of a call's
    requests are sent at once: more keep the replicas of a scaled-out server busy side by
    side. Vectors come back in the caller's order either way. When a request fails, the
    requests after it are not sent (a retry's wait ends), those before it finish, and the
    call raises the error of the first failing request, as one request at a time would.

    The ``aembed_*`` methods are the same calls for asyncio. Requests share one pooled
    connection; :meth:`close` (or ``with``) ends it, :meth:`aclose` (or ``async with``)
    ends the async one too.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        api_key_env_var: str = API_KEY_ENV_VAR,
        prompts: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        max_retry_after: float = MAX_RETRY_AFTER,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"base_url must look like http://host:port, got {base_url!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be a whole number >= 0, got {retries!r}")
        if not max_retry_after >= 0:
            raise ConfigurationError(f"max_retry_after must be a number of seconds >= 0, got {max_retry_after!r}")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be a whole number >= 1, got {max_in_flight!r}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env_var)
        self.api_key_env_var = api_key_env_var
        self._key_source = "given as `api_key`" if api_key is not None else f"from ${api_key_env_var}"
        self.prompts = prompts
        self.timeout = float(timeout)
        self.retries = retries
        self.max_retry_after = float(max_retry_after)
        self.max_in_flight = max_in_flight
        self._info: dict[str, Any] | None = None
        self._client = httpx.Client(transport=_DeadlineTransport())
        self._aclient: httpx.AsyncClient | None = None
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RemoteEmbedder({self.base_url!r})"

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the pooled connection; later calls raise :class:`ConfigurationError`.
        After async calls use :meth:`aclose`, which also closes the async client."""
        self._closed = True
        self._client.close()

    async def aclose(self) -> None:
        """Close both clients (the async one if it belongs to the running event loop)."""
        self.close()
        client, loop = self._aclient, self._aclient_loop
        self._aclient = self._aclient_loop = None
        if client is not None and loop is asyncio.get_running_loop():
            await client.aclose()

    def __enter__(self) -> RemoteEmbedder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> RemoteEmbedder:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- the server -----------------------------------------------------------------------

    @property
    def info(self) -> dict[str, Any]:
        """The server's ``/info``: model, dimension, limits (fetched once the model is loaded)."""
        if self._info is None:
            with self._deadline():
                self._info = self._checked_info(self._exchange("GET", "/info", None, _SMALL_ANSWER))
        return self._info

    async def ainfo(self) -> dict[str, Any]:
        """:attr:`info`, fetched without blocking the event loop."""
        with self._deadline() as deadline:
            received = bytearray()
            return await self._awithin(deadline, "/info", received, self._afetch_info(received))

    async def _afetch_info(self, received: bytearray) -> dict[str, Any]:
        if self._info is None:
            self._info = self._checked_info(await self._aexchange("GET", "/info", None, _SMALL_ANSWER, received))
        return self._info

    @property
    def dimension(self) -> int:
        return int(self.info["dimension"])

    @property
    def model_name(self) -> str:
        return str(self.info["model"])

    @property
    def batch_size(self) -> int:
        """The most items the server's model takes a forward pass."""
        return int(self.info["max_batch_size"])

    # -- embedding ------------------------------------------------------------------------

    def embed_texts(self, texts: Sequence[str], **options: Any) -> np.ndarray:
        return self._embed(text_items(texts), **options)

    def embed_images(self, images: Sequence[Any], **options: Any) -> np.ndarray:
        return self._embed(image_items(images), **options)

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> np.ndarray:
        return self._embed(composed_items(images, texts), **options)

    def embed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]], **options: Any) -> np.ndarray:
        return self._embed(interleaved_items(items), **options)

    def embed(self, items: Sequence[Any], *, prompts: str | None = None, **options: Any) -> np.ndarray:
        """A mixed list, as :meth:`E5VEmbedder.embed <e5v.core.embedder.E5VEmbedder.embed>` takes it;
        ``prompts``: a preset name the server knows."""
        return self._embed(mixed_items(items), prompts, **options)

    async def aembed_texts(self, texts: Sequence[str], **options: Any) -> np.ndarray:
        """:meth:`embed_texts` for asyncio."""
        return await self._aembed(text_items(texts), **options)

    async def aembed_images(self, images: Sequence[Any], **options: Any) -> np.ndarray:
        """:meth:`embed_images` for asyncio (files are read and images encoded on a worker thread)."""
        return await self._aembed(await asyncio.to_thread(image_items, images), **options)

    async def aembed_composed(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> np.ndarray:
        """:meth:`embed_composed` for asyncio."""
        return await self._aembed(await asyncio.to_thread(composed_items, images, texts), **options)

    async def aembed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]], **options: Any) -> np.ndarray:
        """:meth:`embed_interleaved` for asyncio."""
        return await self._aembed(await asyncio.to_thread(interleaved_items, items), **options)

    async def aembed(self, items: Sequence[Any], *, prompts: str | None = None, **options: Any) -> np.ndarray:
        """:meth:`embed` for asyncio."""
        return await self._aembed(await asyncio.to_thread(mixed_items, items), prompts, **options)

    def _embed(
        self,
        items: list[WireItem],
        prompts: str | None = None,
        *,
        batch_size: int | str | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        with self._deadline():
            info = self.info
            requests = self._requests(items, prompts, batch_size, info)
            with _progress(len(items), show_progress_bar) as bar:
                if self.max_in_flight == 1 or len(requests) == 1:
                    parts = []
                    for start, body in requests:
                        parts.append(self._embedded(start, body, info))
                        bar.update(len(body["input"]))
                else:
                    parts = self._embedded_side_by_side(requests, info, bar)
        return _stacked(parts, info["dimension"])

    def _embedded(
        self, start: int, body: dict[str, Any], info: dict[str, Any], stop: threading.Event | None = None
    ) -> np.ndarray:
        """One request's vectors; its item errors name the item by its place in the caller's list."""
        count = len(body["input"])
        try:
            content = self._exchange("POST", "/v1/embeddings", body, _answer_limit(count, info), stop)
        except InvalidInputError as exc:
            raise exc.shifted(start) from None
        return _vectors(self._url("/v1/embeddings"), content, count, info["dimension"])

    def _embedded_side_by_side(
        self, requests: list[tuple[int, dict[str, Any]]], info: dict[str, Any], bar: Any
    ) -> list[np.ndarray]:
        """The requests' vectors, in order, ``max_in_flight`` requests at once on worker threads.

        A failure stops the requests after it (not sent, or their retry's wait ended) and
        is raised once the requests before it are done (one of those failing is raised
        instead): the error one request at a time would raise. No worker outlives the call.
        """
        stops = [threading.Event() for _ in requests]
        failures: dict[int, BaseException] = {}
        workers = min(self.max_in_flight, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="e5v-remote") as pool:
            # each worker runs in a copy of this context, so the call's deadline bounds its sockets too
            futures: dict[Future[np.ndarray], int] = {
                pool.submit(contextvars.copy_context().run, self._embedded, start, body, info, stops[number]): number
                for number, (start, body) in enumerate(requests)
            }
            done: dict[int, np.ndarray] = {}
            try:
                for future in as_completed(futures):
                    number = futures[future]
                    try:
                        done[number] = future.result()
                    except (CancelledError, _Stopped):
                        continue
                    except Exception as exc:
                        failures[number] = exc
                        _stop_after(number, futures, stops)
                        continue
                    bar.update(len(requests[number][1]["input"]))
            except BaseException:  # the caller's thread interrupted (Ctrl-C): stop every request, then wait
                _stop_after(-1, futures, stops)
                raise
        if failures:
            raise failures[min(failures)]
        return [done[number] for number in range(len(requests))]

    async def _aembed(
        self,
        items: list[WireItem],
        prompts: str | None = None,
        *,
        batch_size: int | str | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        with self._deadline() as deadline:
            received = bytearray()
            work = self._aembed_all(items, prompts, batch_size, show_progress_bar, received)
            return await self._awithin(deadline, "/v1/embeddings", received, work)

    async def _aembed_all(
        self,
        items: list[WireItem],
        prompts: str | None,
        batch_size: int | str | None,
        show_progress_bar: bool | None,
        received: bytearray,
    ) -> np.ndarray:
        info = await self._afetch_info(received)
        requests = self._requests(items, prompts, batch_size, info)
        with _progress(len(items), show_progress_bar) as bar:
            if self.max_in_flight == 1 or len(requests) == 1:
                parts = []
                for start, body in requests:
                    parts.append(await self._aembedded(start, body, info, received))
                    bar.update(len(body["input"]))
            else:
                parts = await self._aembedded_side_by_side(requests, info, bar)
        return _stacked(parts, info["dimension"])

    async def _aembedded(
        self, start: int, body: dict[str, Any], info: dict[str, Any], received: bytearray
    ) -> np.ndarray:
        """:meth:`_embedded` on the async client."""
        count = len(body["input"])
        try:
            content = await self._aexchange("POST", "/v1/embeddings", body, _answer_limit(count, info), received)
        except InvalidInputError as exc:
            raise exc.shifted(start) from None
        return _vectors(self._url("/v1/embeddings"), content, count, info["dimension"])

    async def _aembedded_side_by_side(
        self, requests: list[tuple[int, dict[str, Any]]], info: dict[str, Any], bar: Any
    ) -> list[np.ndarray]:
        """:meth:`_embedded_side_by_side` as tasks: a failure cancels the requests after it; no task
        outlives the call (cancelled, or timed out, it cancels them all)."""
        gate = asyncio.Semaphore(self.max_in_flight)  # wakes its waiters in order: requests start in order

        async def one(start: int, body: dict[str, Any]) -> np.ndarray:
            async with gate:
                vectors = await self._aembedded(start, body, info, bytearray())
            bar.update(len(body["input"]))
            return vectors

        tasks = [asyncio.ensure_future(one(start, body)) for start, body in requests]
        first: int | None = None  # the first request (in order) that failed
        try:
            pending: set[asyncio.Future[np.ndarray]] = set(tasks)
            while pending:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for number, task in enumerate(tasks):
                    failed = task in finished and not task.cancelled() and task.exception() is not None
                    if failed and (first is None or number < first):
                        first = number
                        for later in tasks[number + 1 :]:
                            later.cancel()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if first is not None:
            raise tasks[first].exception()  # type: ignore[misc]
        return [task.result() for task in tasks]

    def _requests(
        self, items: list[WireItem], prompts: str | None, batch_size: int | str | None, info: dict[str, Any]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Each request's first item's position and its body, all planned before the first is sent."""
        most = int(info.get("max_client_batch_size") or len(items) or 1)
        if isinstance(batch_size, int) and not isinstance(batch_size, bool):
            most = max(1, min(most, batch_size))
        preset = prompts or self.prompts
        planned = []
        for chunk in chunks(items, most, info.get("max_request_pixels")):
            body: dict[str, Any] = {"input": [items[i].json for i in chunk], "encoding_format": "base64"}
            if preset is not None:
                body["prompts"] = preset
            planned.append((chunk.start, body))
        return planned

    # -- one request, retried within the call's deadline ---------------------------------------

    def _exchange(
        self, method: str, path: str, body: dict[str, Any] | None, limit: int, stop: threading.Event | None = None
    ) -> bytes:
        """The bytes of the server's 2xx answer, after retries; else the e5v error. Once ``stop`` is
        set, no try starts and a wait ends: :class:`_Stopped`."""
        client = self._open(self._client)
        for attempt in itertools.count():
            if stop is not None and stop.is_set():
                raise _Stopped
            request = client.build_request(
                method, self._url(path), json=body, headers=self._headers(), timeout=self._left()
            )
            try:
                response = client.send(request, stream=True)
            except httpx.TimeoutException:
                raise self._timed_out(path, b"") from None
            except httpx.TransportError as exc:
                _wait(self._pause(attempt, _lost(self.base_url, exc, attempt), None), stop)
                continue
            try:
                content = self._read(path, response, response.iter_bytes(), limit)
            finally:
                response.close()
            wait = self._judge(path, response, content, attempt)
            if wait is None:
                return content
            _wait(wait, stop)
        raise AssertionError("unreachable")

    async def _aexchange(
        self, method: str, path: str, body: dict[str, Any] | None, limit: int, received: bytearray
    ) -> bytes:
        """:meth:`_exchange` on the async client; ``received`` holds what has come of the answer being read."""
        client = self._open(self._async_client())
        for attempt in itertools.count():
            request = client.build_request(
                method, self._url(path), json=body, headers=self._headers(), timeout=self._left()
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise self._timed_out(path, b"") from None
            except httpx.TransportError as exc:
                await asyncio.sleep(self._pause(attempt, _lost(self.base_url, exc, attempt), None))
                continue
            try:
                del received[:]
                try:
                    async for chunk in response.aiter_bytes():
                        received += chunk
                        if len(received) > limit:
                            break
                except httpx.TimeoutException:
                    raise self._timed_out(path, bytes(received)) from None
                except httpx.RequestError as exc:
                    raise _bad_answer(self._url(path), _broke_off(received, exc), bytes(received)) from None
                content = self._limited(path, response, bytes(received), limit)
            finally:
                await response.aclose()
            wait = self._judge(path, response, content, attempt)
            if wait is None:
                return content
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _awithin(self, deadline: float, path: str, received: bytearray, work: Any) -> Any:
        """``work`` awaited, cancelled at ``deadline``; ``received``: what came of the answer it was reading."""
        try:
            return await asyncio.wait_for(work, timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise self._timed_out(path, bytes(received)) from None

    def _read(self, path: str, response: httpx.Response, chunks: Iterable[bytes], limit: int) -> bytes:
        """The answer's body, up to ``limit`` bytes; a cut-off or stalled body is an e5v error."""
        received = bytearray()
        try:
            for chunk in chunks:
                received += chunk
                if len(received) > limit:
                    break
        except httpx.TimeoutException:
            raise self._timed_out(path, bytes(received)) from None
        except httpx.RequestError as exc:
            raise _bad_answer(self._url(path), _broke_off(received, exc), bytes(received)) from None
        return self._limited(path, response, bytes(received), limit)

    def _limited(self, path: str, response: httpx.Response, content: bytes, limit: int) -> bytes:
        if len(content) > limit and response.is_success:
            raise _bad_answer(self._url(path), f"an answer of more than {limit} bytes, more than it can hold", content)
        return content[:limit]

    def _judge(self, path: str, response: httpx.Response, content: bytes, attempt: int) -> float | None:
        """``None`` for a 2xx answer, the seconds to wait before retrying a 429 or 503, else the e5v error."""
        if response.is_success:
            return None
        if response.status_code == 401:
            raise self._key_refused(self._url(path), response, content)
        failure = _refusal(self._url(path), response, content)
        if response.status_code in (429, 503):
            return self._pause(attempt, failure, _retry_after(response.headers.get("Retry-After")))
        raise failure

    def _key_refused(self, url: str, response: httpx.Response, content: bytes) -> ConfigurationError:
        """A 401: no key was sent (none given, ``$VARIABLE`` unset), or the one sent is wrong."""
        if not self.api_key:
            return ConfigurationError(
                f"the e5v server at {url} needs an API key and none was sent; set ${self.api_key_env_var} to one "
                "of its keys (or pass one: `RemoteEmbedder(api_key=...)`)"
            )
        return ConfigurationError(
            f"the e5v server at {url} refused the API key {self._key_source}: {_server_message(response, content)}"
        )

    def _pause(self, attempt: int, failure: E5VError, asked: float | None) -> float:
        """Seconds to wait before the next try; ``failure`` (or why not to wait) when there is none."""
        if attempt >= self.retries:
            raise failure
        if asked is not None and asked > self.max_retry_after:
            raise EmbeddingError(
                f"{failure}; the server asked to wait {asked:g} s (Retry-After), more than max_retry_after="
                f"{self.max_retry_after:g} s, so e5v did not wait: try again later, or raise max_retry_after"
            )
        wait = 0.5 * 2**attempt if asked is None else asked
        left = self._deadline_left()
        if wait >= left:
            raise EmbeddingError(
                f"{failure}; the next try would have to wait {wait:g} s, past the call's timeout="
                f"{self.timeout:g} s ({max(left, 0.0):.1f} s left): raise timeout, or try again later"
            )
        logger.info("%s; retrying in %g s (try %d of %d)", failure, wait, attempt + 2, self.retries + 1)
        return wait

    # -- helpers ------------------------------------------------------------------------------

    @contextmanager
    def _deadline(self) -> Iterator[float]:
        """The running call's deadline: ``timeout`` from now, or the enclosing call's if sooner."""
        now, enclosing = time.monotonic(), _DEADLINE.get()
        deadline = now + self.timeout if enclosing is None else min(enclosing, now + self.timeout)
        token = _DEADLINE.set(deadline)
        try:
            yield deadline
        finally:
            _DEADLINE.reset(token)

    def _deadline_left(self) -> float:
        deadline = _DEADLINE.get()
        return self.timeout if deadline is None else deadline - time.monotonic()

    def _left(self) -> httpx.Timeout:
        """httpx's timeouts for the next request: what is left of the call."""
        return httpx.Timeout(max(self._deadline_left(), 1e-3))

    def _timed_out(self, path: str, received: bytes) -> EmbeddingError:
        sent = f"; it had sent {len(received)} bytes: {_excerpt(received)!r}" if received else ""
        return EmbeddingError(
            f"the e5v server at {self._url(path)} did not answer within the call's timeout={self.timeout:g} s "
            f"(all requests, retries and waits){sent}; raise timeout, or check the server"
        )

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _open(self, client: httpx.Client | httpx.AsyncClient) -> Any:
        if self._closed:
            raise ConfigurationError(f"{self!r} is closed; create a new RemoteEmbedder to embed again")
        return client

    def _async_client(self) -> httpx.AsyncClient:
        """The async client of the running event loop (a client's connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        if self._aclient is None or self._aclient_loop is not loop:
            if self._aclient is not None:
                logger.debug("%r: a new event loop, so a new async client", self)
            self._aclient, self._aclient_loop = httpx.AsyncClient(), loop
        return self._aclient

    def _checked_info(self, content: bytes) -> dict[str, Any]:
        url = self._url("/info")
        try:
            info = _ServerInfo.model_validate_json(content)
        except ValidationError as exc:
            raise _bad_answer(url, _first_problem(exc), content) from None
        if info.dimension is None or info.max_batch_size is None:
            raise EmbeddingError(
                f"the e5v server at {self.base_url} is still loading its model; retry once /ready is 200"
            )
        return info.model_dump()


class _Stopped(Exception):
    """A request of a call given up because a request before it failed."""


def _wait(seconds: float, stop: threading.Event | None) -> None:
    """Sleep ``seconds``; :class:`_Stopped` as soon as ``stop`` is set."""
    if stop is None:
        time.sleep(seconds)
    elif stop.wait(seconds):
        raise _Stopped


def _stop_after(number: int, futures: dict[Future[np.ndarray], int], stops: list[threading.Event]) -> None:
    """Stop the requests after request ``number``: those not started never start, the others end at their next try."""
    for future, later in futures.items():
        if later > number:
            stops[later].set()
            future.cancel()


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sockets, each connect, read and write given no more than what is left of the running call."""

    def __init__(self) -> None:
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._sockets.connect_tcp(host, port, bounded, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._sockets.connect_unix_socket(path, bounded, socket_options))

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, bounded))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _bounded(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the running call; ``expired`` once nothing is."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)


#: httpcore's errors as httpx raises them (the transport below is httpx's, over a pool of deadline-bound sockets).
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except tuple(core for core, _ in _HTTPX_ERRORS) as exc:
        mapped = next(ours for core, ours in _HTTPX_ERRORS if isinstance(exc, core))
        raise mapped(str(exc) or type(exc).__name__, request=request) from exc


class _DeadlineTransport(httpx.BaseTransport):
    """httpx's HTTP/1.1 transport (httpx has no option for httpcore's network backend) on :class:`_DeadlineBackend`."""

    def __init__(self) -> None:
        limits = httpx.Limits()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )
        with _as_httpx_errors(request):
            answer = self._pool.handle_request(core_request)
        return httpx.Response(
            answer.status, headers=answer.headers, stream=_Body(answer, request), extensions=answer.extensions
        )

    def close(self) -> None:
        self._pool.close()


class _Body(httpx.SyncByteStream):
    def __init__(self, answer: httpcore.Response, request: httpx.Request) -> None:
        self._answer, self._request = answer, request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors(self._request):
            yield from self._answer.iter_stream()

    def close(self) -> None:
        with _as_httpx_errors(self._request):
            self._answer.close()


# -- answers --------------------------------------------------------------------------------


def _vectors(url: str, content: bytes, count: int, dimension: int) -> np.ndarray:
    """The ``count`` vectors of an embeddings answer, or :class:`EmbeddingError` saying what is wrong with it."""
    try:
        answer = EmbeddingResponse.model_validate_json(content)
    except ValidationError as exc:
        raise _bad_answer(url, _first_problem(exc), content) from None
    indices = sorted(row.index for row in answer.data)
    if len(indices) != count:
        raise _bad_answer(url, f"{len(indices)} vectors for the {count} items sent", content)
    if indices != list(range(count)):
        raise _bad_answer(url, f"indices {_short(indices)}, not 0 to {count - 1} once each", content)
    vectors = np.empty((count, dimension), dtype=np.float32)
    for row in answer.data:
        if isinstance(row.embedding, str):
            try:
                raw = base64.b64decode(row.embedding, validate=True)
            except (binascii.Error, ValueError):
                raise _bad_answer(url, f"row {row.index}'s embedding is not base64", content) from None
            if len(raw) != 4 * dimension:
                problem = f"row {row.index} has {len(raw)} bytes, not 4 x the server's dimension {dimension}"
                raise _bad_answer(url, problem, content)
            vectors[row.index] = np.frombuffer(raw, dtype="<f4")
        elif len(row.embedding) == dimension:
            vectors[row.index] = row.embedding
        else:
            problem = f"row {row.index} has {len(row.embedding)} values, not the server's dimension {dimension}"
            raise _bad_answer(url, problem, content)
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise _bad_answer(url, f"row {bad} holds NaN or infinite values", content)
    return vectors


def _stacked(parts: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty((0, dimension), dtype=np.float32)


def _answer_limit(count: int, info: dict[str, Any]) -> int:
    """The most bytes an answer of ``count`` vectors can take (as floats in JSON text, with room to spare)."""
    return _SMALL_ANSWER + count * (24 * int(info["dimension"]) + 1024)


def _server_message(response: httpx.Response, content: bytes) -> str:
    """The message of the server's error answer, else what it sent."""
    try:
        return ErrorResponse.model_validate_json(content).error.message
    except ValidationError:
        kind = response.headers.get("Content-Type", "no Content-Type")
        return f"{kind}: {_excerpt(content)!r}"


def _refusal(url: str, response: httpx.Response, content: bytes) -> E5VError:
    """The server's refusal as the error the in-process embedder would raise (not a 401: see ``_key_refused``)."""
    message = _server_message(response, content)
    status = response.status_code
    if status == 400:
        match = _ITEM_PREFIX.match(message)
        if match:
            return InvalidInputError(message[match.end() :], index=int(match.group(1)))
        return InvalidInputError(message)
    return EmbeddingError(f"the e5v server answered {status} to {url}: {message}")


def _bad_answer(url: str, problem: str, content: bytes) -> EmbeddingError:
    return EmbeddingError(
        f"the e5v server at {url} sent an answer e5v cannot use ({problem}); it began {_excerpt(content)!r}. "
        "Is base_url an e5v server, and is nothing between (a proxy) changing its answers?"
    )


def _lost(base_url: str, error: httpx.TransportError, attempt: int) -> EmbeddingError:
    tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
    if isinstance(error, httpx.ConnectError):
        return EmbeddingError(
            f"cannot reach the e5v server at {base_url} ({error}) after {tries}; is `e5v serve` running there?"
        )
    return EmbeddingError(f"the connection to the e5v server at {base_url} failed ({error}) after {tries}")


def _broke_off(received: bytearray, error: httpx.RequestError) -> str:
    return f"the answer broke off after {len(received)} bytes: {error}"


def _first_problem(error: ValidationError) -> str:
    problem = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}" if where else problem["msg"]


def _excerpt(content: bytes) -> str:
    text = content[: _EXCERPT * 4].decode("utf-8", "replace")
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number of seconds or an HTTP date); ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@contextmanager
def _progress(total: int, show: bool | None) -> Iterator[Any]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="Embedding", unit="item", disable=not show) as bar:
        yield bar
