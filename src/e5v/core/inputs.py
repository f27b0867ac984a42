"""Input normalisation and validation: texts, image-likes, interleaved and composed items.

Every image-like becomes an RGB :class:`PIL.Image.Image` with its EXIF orientation
applied. Errors are :class:`~e5v.errors.InvalidInputError` naming the item's index.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from e5v.core.prompts import IMAGE_TOKEN
from e5v.core.remote import RemotePolicy, fetch
from e5v.errors import InvalidInputError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "Composed",
    "ImageLike",
    "InputItem",
    "Interleaved",
    "ImageLoader",
    "Request",
    "composed_request",
    "describe",
    "image_request",
    "interleaved_request",
    "query_item",
    "text_request",
    "to_request",
]

#: Images whose header claims more pixels are refused before decoding (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

ImageLike = Image.Image | str | Path | bytes | bytearray | memoryview | BinaryIO | np.ndarray


@dataclass(frozen=True, init=False)
class Interleaved:
    """Text and image parts, in order, embedded as ONE vector.

    A ``str`` part is text; any other part is an image-like. Parts are joined by
    newlines (each image becomes one ``<image>`` slot) and followed by the interleaved
    instruction of the prompt set (default ``"Summary above content in one word: "``).
    """

    parts: tuple[Any, ...]

    def __init__(self, parts: Iterable[Any]) -> None:
        object.__setattr__(self, "parts", tuple(parts))


@dataclass(frozen=True)
class Composed:
    """A composed-retrieval query: a reference image and the edit to apply to it."""

    image: Any
    text: str


def describe(obj: object) -> str:
    """A short, safe description of an input for error messages."""
    if isinstance(obj, str):
        shown = obj if len(obj) <= 60 else obj[:57] + "..."
        return f"str {shown!r}"
    if isinstance(obj, Path):
        return f"path {str(obj)!r}"
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"{type(obj).__name__} of length {len(obj)}"
    if isinstance(obj, np.ndarray):
        return f"numpy array of shape {obj.shape} and dtype {obj.dtype}"
    if isinstance(obj, Image.Image):
        return f"PIL image {obj.mode} {obj.size[0]}x{obj.size[1]}"
    if hasattr(obj, "read"):
        name = getattr(obj, "name", None)
        return f"file {str(name)!r}" if isinstance(name, (str, Path)) else "binary file object"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


InputItem = str | Interleaved | Composed | ImageLike

_FIX = (
    "pass a PIL image, a local path (str or pathlib.Path), encoded image bytes, a binary file object, "
    "a data:image/...;base64 URI, or a numpy array HxW, HxWx3 or HxWx4 (uint8, or float in [0, 1])"
)


class ImageLoader:
    """Turns image-likes into RGB PIL images, with a pixel cap and an opt-in for URLs.

    ``allow_remote``: ``True`` fetches ``http(s)`` URLs under the default
    :class:`~e5v.core.remote.RemotePolicy`, or pass a policy; ``False`` refuses them.
    """

    def __init__(
        self,
        *,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        allow_remote: bool | RemotePolicy = False,
    ) -> None:
        self.max_image_pixels = max_image_pixels
        self.remote: RemotePolicy | None = (
            allow_remote if isinstance(allow_remote, RemotePolicy) else RemotePolicy() if allow_remote else None
        )

    def load(self, obj: object, index: int) -> Image.Image:
        """Load one image-like as RGB, or raise :class:`InvalidInputError` naming ``index``."""
        if isinstance(obj, Image.Image):
            return self._to_rgb(obj, index, obj)
        if isinstance(obj, np.ndarray):
            return self._to_rgb(_from_array(obj, index), index, obj)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return self._decode(io.BytesIO(bytes(obj)), index, obj)
        if isinstance(obj, Path):
            return self._open_path(obj, index)
        if isinstance(obj, str):
            return self._from_string(obj, index)
        if hasattr(obj, "read") and callable(obj.read):
            return self._decode(obj, index, obj)  # type: ignore[arg-type]
        raise InvalidInputError(f"unsupported image type {describe(obj)}; {_FIX}", index=index)

    def peek_size(self, obj: object) -> tuple[int, int] | None:
        """``(height, width)`` of the image :meth:`load` would return, read without
        decoding pixels (a file's header, EXIF orientation applied); ``None`` when that
        takes more than a header (URIs) or the input is not a readable image."""
        if isinstance(obj, Image.Image):
            return _oriented_size(obj)
        if isinstance(obj, np.ndarray):
            return (int(obj.shape[0]), int(obj.shape[1])) if obj.ndim in (2, 3) and obj.size else None
        if isinstance(obj, (bytes, bytearray, memoryview)):
            source: Any = io.BytesIO(bytes(obj))
        elif isinstance(obj, Path) or (isinstance(obj, str) and not _is_uri(obj)):
            source = obj
        else:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(source) as image:
                    return _oriented_size(image)
        except Exception:  # the loader will say what is wrong with it
            return None

    def _from_string(self, value: str, index: int) -> Image.Image:
        lowered = value[:16].lower()
        if lowered.startswith("data:"):
            return self._decode(io.BytesIO(decode_data_uri(value, index)), index, value)
        if lowered.startswith(("http://", "https://")):
            if self.remote is None:
                raise InvalidInputError(
                    f"remote URL {describe(value)} refused: remote images are off by default; "
                    "download it yourself, or opt in with allow_remote=True",
                    index=index,
                )
            try:
                data = fetch(value, self.remote)
            except InvalidInputError as exc:
                raise InvalidInputError(str(exc), index=index) from None
            return self._decode(io.BytesIO(data), index, value)
        if "://" in value[:16]:
            raise InvalidInputError(f"{describe(value)} is a URL with an unsupported scheme; {_FIX}", index=index)
        return self._open_path(Path(value), index)

    def _open_path(self, path: Path, index: int) -> Image.Image:
        try:
            exists, is_file = path.exists(), path.is_file()
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{describe(path)} is not a usable path ({exc})", index=index) from None
        if not exists:
            raise InvalidInputError(
                f"image file {str(path)!r} does not exist; check the path (relative paths are resolved "
                f"from {os.getcwd()!r})",
                index=index,
            )
        if not is_file:
            raise InvalidInputError(f"{str(path)!r} is not a regular file; pass an image file", index=index)
        with path.open("rb") as handle:
            return self._decode(handle, index, path)

    def _decode(self, stream: BinaryIO, index: int, original: object) -> Image.Image:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
                width, height = image.size
                if width * height > self.max_image_pixels:
                    raise InvalidInputError(
                        f"{describe(original)} claims {width}x{height} pixels, over the cap of "
                        f"{self.max_image_pixels}; downscale it, or raise max_image_pixels if you trust it",
                        index=index,
                    )
                image.seek(0)  # animated images: the first frame
                image.load()
        except InvalidInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            pillow = Image.MAX_IMAGE_PIXELS or 0
            also = f" (and Pillow's PIL.Image.MAX_IMAGE_PIXELS, {pillow})" if self.max_image_pixels >= pillow else ""
            raise InvalidInputError(
                f"{describe(original)} claims more pixels than the cap of {self.max_image_pixels} (a possible "
                f"decompression bomb); downscale it, or raise max_image_pixels{also} if you trust it",
                index=index,
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            # Pillow's UnidentifiedImageError names the stream by its repr: say it in words instead
            why = "Pillow cannot identify its format" if isinstance(exc, UnidentifiedImageError) else f"{exc}"
            raise InvalidInputError(
                f"{describe(original)} is not a readable image ({why}); "
                "check that the file is a complete PNG, JPEG, GIF, WebP, BMP or TIFF",
                index=index,
            ) from None
        return self._to_rgb(image, index, original)

    def _to_rgb(self, image: Image.Image, index: int, original: object) -> Image.Image:
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidInputError(f"{describe(original)} has no pixels; pass a non-empty image", index=index)
        if width * height > self.max_image_pixels:
            raise InvalidInputError(
                f"{describe(original)} has {width}x{height} pixels, over the cap of {self.max_image_pixels}; "
                "downscale it, or raise max_image_pixels",
                index=index,
            )
        try:
            image = ImageOps.exif_transpose(image)
            return _convert_rgb(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise InvalidInputError(
                f"{describe(original)} cannot be converted to RGB ({exc}); re-save it as PNG or JPEG",
                index=index,
            ) from None


def _is_uri(value: str) -> bool:
    """A URL or data URI, as opposed to a local path."""
    return "://" in value[:16] or value[:5].lower() == "data:"


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(height, width)`` after ``ImageOps.exif_transpose``."""
    width, height = image.size
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
        width, height = height, width
    return height, width


def _convert_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (as transformers' processors do)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        data = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or data.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(data / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        data = np.nan_to_num(np.asarray(image, dtype=np.float64))
        image = Image.fromarray(np.clip(data, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    if array.size == 0:
        raise InvalidInputError(f"{describe(array)} is empty; pass an image with at least one pixel", index=index)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise InvalidInputError(
            f"{describe(array)} is not an image array; pass HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA)",
            index=index,
        )
    if array.dtype == np.uint8:
        data = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{describe(array)} contains NaN or infinity; pass finite values", index=index)
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidInputError(
                f"{describe(array)} has values in [{low:g}, {high:g}]; float images must lie in [0, 1] "
                "(or pass uint8 in [0, 255])",
                index=index,
            )
        data = np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        data = array.astype(np.uint8) * 255
    else:
        raise InvalidInputError(
            f"{describe(array)} has an unsupported dtype; pass uint8 in [0, 255] or float in [0, 1]",
            index=index,
        )
    return Image.fromarray(np.ascontiguousarray(data))  # L, RGB or RGBA by shape


def decode_data_uri(uri: str, index: int) -> bytes:
    """The bytes of a ``data:image/...;base64,`` URI, or :class:`InvalidInputError` naming ``index``."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise InvalidInputError(
            f"{describe(uri)} is not a data:image/...;base64, URI; encode the image as base64", index=index
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{describe(uri)} has invalid base64 data ({exc})", index=index) from None


def check_text(value: object, index: int) -> str:
    """Validate one text item: a ``str`` with no ``<image>`` placeholder."""
    if not isinstance(value, str):
        raise InvalidInputError(f"expected text (str), got {describe(value)}", index=index)
    if IMAGE_TOKEN in value:
        raise InvalidInputError(
            f"text {describe(value)} contains the reserved image placeholder {IMAGE_TOKEN!r}; "
            "remove it, or pass images as image items or Interleaved parts",
            index=index,
        )
    return value


def as_list(items: Sequence[Any], name: str) -> list[Any]:
    """``items`` as a list, or :class:`InvalidInputError` when one item was passed where a list was meant."""
    if isinstance(items, (str, bytes, Image.Image, np.ndarray, Interleaved)) or not hasattr(items, "__iter__"):
        raise InvalidInputError(f"{name} must be a list of items, got a single {type(items).__name__}; wrap it in [ ]")
    return list(items)


def check_lengths(images: Sequence[object], texts: Sequence[object]) -> None:
    """Raise unless composed ``images`` and ``texts`` pair up one to one."""
    if len(images) != len(texts):
        raise InvalidInputError(
            f"embed_composed needs one text per image: got {len(images)} images and {len(texts)} texts"
        )


Kind = str  # "text" | "image" | "composed" | "interleaved"


@dataclass(frozen=True)
class Request:
    """One item to embed, checked: its kind, its text (with ``<image>`` slots for
    interleaved items) and its raw image-likes, in slot order."""

    kind: Kind
    index: int
    text: str
    images: tuple[Any, ...]

    def key(self) -> tuple[Any, ...]:
        """Identity of the content: equal keys embed to equal vectors (computed once)."""
        return self._key

    @cached_property
    def _key(self) -> tuple[Any, ...]:
        return (self.kind, self.text, *(content_key(image) for image in self.images))


def content_key(obj: object) -> Any:
    """A hashable identity for an image-like (path, size and mtime for files; digests otherwise)."""
    if isinstance(obj, str) and _is_uri(obj):
        return ("uri", hashlib.blake2b(obj.encode(), digest_size=16).digest())
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        try:
            stat = path.stat()
            return ("path", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        except (OSError, ValueError):  # missing, or not a valid path at all: the loader says which
            return ("path", str(path))
    digest = hashlib.blake2b(digest_size=16)
    if not update_digest(digest, obj):
        return ("object", id(obj))
    return ("digest", digest.digest())


def update_digest(digest: Any, obj: object) -> bool:
    """Feed an in-memory image-like's content (what decides its pixels) into a hashlib
    ``digest``; ``False`` when ``obj`` is not bytes, an array or a PIL image."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        digest.update(bytes(obj))
    elif isinstance(obj, np.ndarray):
        digest.update(f"array{obj.shape}{obj.dtype}".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, Image.Image):
        orientation = obj.getexif().get(0x0112, 1)  # applied by the loader
        digest.update(f"pil{obj.mode}{obj.size}{orientation}".encode())
        digest.update(obj.tobytes())
    else:
        return False
    return True


def _image_part(obj: object, index: int) -> object:
    """Validate an image-like's type; file objects are read once into bytes."""
    if isinstance(obj, (Image.Image, np.ndarray, str, Path, bytes, bytearray, memoryview)):
        return obj
    if hasattr(obj, "read") and callable(obj.read):
        data = obj.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidInputError(f"{describe(obj)} is not a binary file object; open it in 'rb' mode", index=index)
        return bytes(data)
    raise InvalidInputError(f"unsupported image type {describe(obj)}; {_FIX}", index=index)


def text_request(item: object, index: int) -> Request:
    return Request("text", index, check_text(item, index), ())


def image_request(item: object, index: int) -> Request:
    if isinstance(item, (Interleaved, Composed)) or item is None:
        raise InvalidInputError(f"expected an image, got {describe(item)}; {_FIX}", index=index)
    return Request("image", index, "", (_image_part(item, index),))


def composed_request(image: object, text: object, index: int) -> Request:
    return Request("composed", index, check_text(text, index), (_image_part(image, index),))


def interleaved_request(item: Interleaved, index: int) -> Request:
    if not item.parts:
        raise InvalidInputError("Interleaved has no parts; give at least one text or image", index=index)
    pieces: list[str] = []
    images: list[object] = []
    for part in item.parts:
        if isinstance(part, str):
            pieces.append(check_text(part, index))
        else:
            images.append(_image_part(part, index))
            pieces.append(IMAGE_TOKEN)
    return Request("interleaved", index, "\n".join(pieces), tuple(images))


def query_item(text: str | None, image: object | None) -> Any:
    """A search query as one item of ``embed``: the text, the image, or both as
    :class:`Composed` (the image edited as the text says). Raises
    :class:`~e5v.errors.InvalidInputError` when both are ``None``."""
    if image is None:
        if text is None:
            raise InvalidInputError("the query is empty: give a text, an image, or both")
        return text
    return image if text is None else Composed(image, text)


def to_request(item: object, index: int) -> Request:
    """Classify one item of a mixed list: ``str`` is text, ``Interleaved`` and ``Composed``
    are themselves, anything else must be an image-like."""
    if isinstance(item, str):
        return text_request(item, index)
    if isinstance(item, Interleaved):
        return interleaved_request(item, index)
    if isinstance(item, Composed):
        return composed_request(item.image, item.text, index)
    if item is None or isinstance(item, (int, float, bool, list, tuple, dict, set)):
        raise InvalidInputError(
            f"unsupported item {describe(item)}; pass text (str), an image (pathlib.Path, PIL image, bytes, "
            "numpy array, binary file), Interleaved([...]) or Composed(image, text)",
            index=index,
        )
    return image_request(item, index)
