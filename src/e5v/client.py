"""``RemoteEmbedder``: the :class:`~e5v.embedder.E5VEmbedder` methods, answered by an ``e5v serve``.

Items are sent as ``POST /v1/embeddings`` items (see :mod:`e5v.server.schemas`); images
travel as their encoded bytes in ``data:`` URIs (files are read here, PIL images and
arrays are encoded as PNG), and the server decodes them. Lists longer than the server's
``max_client_batch_size`` go in several requests; errors name the item by its index in
the caller's list. Connection failures, 429 and 503 are retried with backoff.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from e5v.errors import ConfigurationError, E5VError, EmbeddingError, InvalidInputError
from e5v.inputs import Composed, ImageLoader, Interleaved, as_list, check_lengths, describe

__all__ = ["API_KEY_ENV_VAR", "Embedder", "RemoteEmbedder"]

logger = logging.getLogger(__name__)

_ITEM_PREFIX = re.compile(r"^item (\d+): ", re.DOTALL)
#: The environment variable read for the API key when none is given (``e5v serve`` reads it too).
API_KEY_ENV_VAR = "E5V_API_KEY"


@runtime_checkable
class Embedder(Protocol):
    """What both :class:`~e5v.embedder.E5VEmbedder` and :class:`RemoteEmbedder` do; each
    method also takes ``batch_size`` and ``show_progress_bar`` (``None``: the default)."""

    @property
    def dimension(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    @property
    def batch_size(self) -> int: ...

    def embed_texts(self, texts: Sequence[str], **options: Any) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Any], **options: Any) -> np.ndarray: ...

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> np.ndarray: ...

    def embed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]], **options: Any) -> np.ndarray: ...

    def embed(self, items: Sequence[Any], **options: Any) -> np.ndarray: ...


class RemoteEmbedder:
    """Embeddings from an ``e5v serve`` at ``base_url`` (``http://host:port``).

    ``api_key`` (else the value of the variable ``api_key_env_var``, if set) is sent as
    ``Authorization: Bearer``. ``prompts`` names the server's prompt preset for every
    request (``None``: the server's default). Each request may take ``timeout``
    seconds; a refused connection, 429 or 503 is retried ``retries`` times (waiting as
    ``Retry-After`` says, else 0.5 s, 1 s, 2 s ...). Vectors are float32, one row per item.
    Each method's ``batch_size`` is the most items a request (never more than the
    server takes); the server batches the items of all its clients for the model.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        api_key_env_var: str = API_KEY_ENV_VAR,
        prompts: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"base_url must look like http://host:port, got {base_url!r}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env_var)
        self.prompts = prompts
        self.timeout = timeout
        self.retries = retries
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"RemoteEmbedder({self.base_url!r})"

    @property
    def info(self) -> dict[str, Any]:
        """The server's ``/info``: model, dimension, limits (fetched once)."""
        if self._info is None:
            self._info = self._call("GET", "/info")
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

    def embed_texts(self, texts: Sequence[str], **options: Any) -> np.ndarray:
        return self._embed([_text(text, i) for i, text in enumerate(as_list(texts, "texts"))], **options)

    def embed_images(self, images: Sequence[Any], **options: Any) -> np.ndarray:
        return self._embed([_image_part(image, i) for i, image in enumerate(as_list(images, "images"))], **options)

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> np.ndarray:
        images, texts = as_list(images, "images"), as_list(texts, "texts")
        check_lengths(images, texts)
        pairs = enumerate(zip(images, texts))
        return self._embed([_item(Composed(image, text), i) for i, (image, text) in pairs], **options)

    def embed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]], **options: Any) -> np.ndarray:
        return self._embed(
            [
                _item(item if isinstance(item, Interleaved) else Interleaved(item), i)
                for i, item in enumerate(as_list(items, "items"))
            ],
            **options,
        )

    def embed(self, items: Sequence[Any], *, prompts: str | None = None, **options: Any) -> np.ndarray:
        """A mixed list, as :meth:`E5VEmbedder.embed <e5v.embedder.E5VEmbedder.embed>` takes it;
        ``prompts``: a preset name the server knows."""
        return self._embed([_item(item, i) for i, item in enumerate(as_list(items, "items"))], prompts, **options)

    def _embed(
        self,
        items: list[Any],
        prompts: str | None = None,
        *,
        batch_size: int | str | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        if not items:
            return np.empty((0, self.dimension), dtype=np.float32)
        out = np.empty((len(items), self.dimension), dtype=np.float32)
        step = int(self.info.get("max_client_batch_size") or len(items))
        if isinstance(batch_size, int) and not isinstance(batch_size, bool):
            step = max(1, min(step, batch_size))
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc="Embedding", unit="item", disable=not show_progress_bar) as bar:
            for start in range(0, len(items), step):
                body: dict[str, Any] = {"input": items[start : start + step], "encoding_format": "base64"}
                if (prompts or self.prompts) is not None:
                    body["prompts"] = prompts or self.prompts
                try:
                    answer = self._call("POST", "/v1/embeddings", body)
                except InvalidInputError as exc:
                    raise exc.shifted(start) from None
                for row in answer["data"]:
                    out[start + row["index"]] = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
                bar.update(len(answer["data"]))
        return out

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        url = self.base_url + path
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                retry_after = exc.headers.get("Retry-After")
                if exc.code in (429, 503) and attempt < self.retries:
                    time.sleep(float(retry_after) if retry_after and retry_after.isdigit() else 0.5 * 2**attempt)
                    continue
                raise _error(url, exc.code, exc.read()) from None
            except (urllib.error.URLError, OSError) as exc:
                if attempt < self.retries:
                    time.sleep(0.5 * 2**attempt)
                    continue
                reason = getattr(exc, "reason", exc)
                raise EmbeddingError(
                    f"cannot reach the e5v server at {self.base_url} ({reason}) after {self.retries + 1} tries; "
                    "is `e5v serve` running there?"
                ) from None
        raise AssertionError("unreachable")


def _error(url: str, status: int, raw: bytes) -> E5VError:
    """The server's refusal as the error the in-process embedder would raise."""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")[:500]
    if status == 400:
        match = _ITEM_PREFIX.match(message)
        if match:
            return InvalidInputError(message[match.end() :], index=int(match.group(1)))
        return InvalidInputError(message)
    if status == 401:
        return ConfigurationError(f"the e5v server at {url} refused the API key: {message}")
    return EmbeddingError(f"the e5v server answered {status} to {url}: {message}")


def _text(value: object, index: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"texts must be strings, got {describe(value)}", index=index)
    return value


def _item(item: object, index: int) -> Any:
    """One item as the server's JSON: a ``str`` is text, anything else as ``E5VEmbedder.embed`` reads it."""
    if isinstance(item, str):
        return item
    if isinstance(item, Composed):
        return {"type": "composed", "image_url": _image_part(item.image, index)["image_url"], "text": item.text}
    if isinstance(item, Interleaved):
        return [
            {"type": "text", "text": part} if isinstance(part, str) else _image_part(part, index) for part in item.parts
        ]
    return _image_part(item, index)


def _image_part(image: object, index: int) -> dict[str, Any]:
    """An image-like as a content part: a URL as it is, anything else as its encoded bytes."""
    if isinstance(image, str) and image[:8].lower().startswith(("http://", "https://", "data:")):
        return {"type": "image_url", "image_url": {"url": image}}
    return {"type": "image_url", "image_url": {"url": _data_uri(_encoded(image, index))}}


def _encoded(image: object, index: int) -> bytes:
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise InvalidInputError(
                f"image file {str(image)!r} cannot be read ({exc.strerror or exc}); check the path", index=index
            ) from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        image = ImageLoader(max_image_pixels=image.size + 1).load(image, index)  # checked, as the embedder would
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if hasattr(image, "read") and callable(image.read):
        data = image.read()
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
    raise InvalidInputError(f"unsupported image type {describe(image)}; pass a path, bytes or a PIL image", index=index)


def _data_uri(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            kind = (opened.format or "png").lower()
    except Exception:  # the server says what is wrong with it
        kind = "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
