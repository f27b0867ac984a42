"""The input layer: every image-like becomes RGB; every bad input is an InvalidInputError naming its index."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e5v import Composed, Interleaved, InvalidInputError
from e5v.core.inputs import ImageLoader, to_request


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (invalid) body: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def loader() -> ImageLoader:
    return ImageLoader()


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return photos["cat"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_every_image_like_gives_the_same_rgb_pixels(loader, cat, tmp_path):
    png = encode(cat, "PNG")
    (tmp_path / "cat.png").write_bytes(png)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    forms = [
        cat,
        str(tmp_path / "cat.png"),
        tmp_path / "cat.png",
        png,
        bytearray(png),
        memoryview(png),
        io.BytesIO(png),
        np.asarray(cat),
        np.asarray(cat).astype(np.float32) / 255.0,
        uri,
    ]
    for form in forms:
        image = loader.load(form, 0)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(pixels(image), np.asarray(cat), err_msg=type(form).__name__)


def test_grey_rgba_palette_16bit_and_cmyk_become_rgb(loader, photos):
    grey = loader.load(np.asarray(photos["camera"]), 0)
    assert grey.mode == "RGB" and grey.size == photos["camera"].size
    np.testing.assert_array_equal(np.asarray(grey)[..., 0], np.asarray(photos["camera"]))
    # RGBA: transparency composited on white, as transformers' processors do.
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert loader.load(rgba, 0).getpixel((0, 0)) == (255, 255, 255)
    assert loader.load(np.asarray(photos["logo"]), 0).mode == "RGB"
    palette = photos["cat"].convert("P")
    assert loader.load(encode(palette, "PNG"), 0).mode == "RGB"
    deep = Image.fromarray(np.asarray(photos["camera"]).astype(np.uint16) * 257)
    loaded = loader.load(encode(deep, "PNG"), 0)
    np.testing.assert_array_equal(np.asarray(loaded)[..., 0], np.asarray(photos["camera"]))
    cmyk = loader.load(encode(photos["cat"].convert("CMYK"), "JPEG"), 0)
    assert cmyk.mode == "RGB" and cmyk.size == photos["cat"].size


def test_exif_orientation_is_applied(loader):
    image = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    loaded = loader.load(encode(image, "JPEG", exif=exif), 0)
    assert loaded.size == (20, 40)


def test_animated_gif_gives_its_first_frame(loader):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    first = loader.load(buffer.getvalue(), 0)
    assert first.getpixel((0, 0))[0] > 200 and first.getpixel((0, 0))[2] < 50


def test_tiny_and_thin_images_are_valid(loader):
    for shape in [(1, 1, 3), (1, 700, 3), (700, 1), (2, 2)]:
        assert loader.load(np.full(shape, 127, dtype=np.uint8), 0).mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_corrupt_and_truncated_images_are_refused(loader, cat, fmt):
    data = encode(cat.convert("RGB"), fmt)
    corrupt = data[:16] + bytes(reversed(data[16:64])) + b"\x00" * (len(data) - 64)
    for bad in (data[: len(data) // 2], corrupt):
        with pytest.raises(InvalidInputError, match=r"^item 3: .*not a readable image"):
            loader.load(bad, 3)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda d: d / "missing.png", "does not exist"),
        (lambda d: d, "not a regular file"),
        (lambda d: _write(d / "empty.png", b""), "not a readable image"),
        (lambda d: _write(d / "notes.png", b"just some text, not pixels\n" * 20), "not a readable image"),
        (lambda d: str(_write(d / "notes.txt", b"hello")), "not a readable image"),
    ],
)
def test_bad_files_are_refused(loader, tmp_path, make, pattern):
    with pytest.raises(InvalidInputError, match=rf"^item 5: .*{pattern}"):
        loader.load(make(tmp_path), 5)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (None, "unsupported image type"),
        (42, "unsupported image type"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
        (np.full((4, 4, 3), np.nan, dtype=np.float32), "NaN or infinity"),
        (np.full((4, 4), np.inf), "NaN or infinity"),
        (np.full((4, 4, 3), 3.0), r"must lie in \[0, 1\]"),
        (np.zeros((4, 4, 5), dtype=np.uint8), "not an image array"),
        (np.zeros((4, 4, 3), dtype=np.int64), "unsupported dtype"),
        ("data:text/plain;base64,aGVsbG8=", "not a data:image"),
        ("data:image/png;base64,@@@", "invalid base64"),
        ("https://example.com/cat.png", "refused: remote images are off by default"),
        ("ftp://example.com/cat.png", "unsupported scheme"),
    ],
)
def test_bad_values_are_refused(loader, value, pattern):
    with pytest.raises(InvalidInputError, match=rf"^item 2: .*{pattern}"):
        loader.load(value, 2)


def test_decompression_bomb_is_refused_before_decoding(loader):
    # Pillow refuses this one itself while opening it: the message still quotes e5v's cap
    with pytest.raises(InvalidInputError, match=r"^item 0: .*claims more pixels than the cap of 64000000 "):
        loader.load(png_header_claiming(50_000, 50_000), 0)
    with pytest.raises(InvalidInputError, match=r"raise max_image_pixels \(and Pillow's PIL.Image.MAX_IMAGE_PIXELS"):
        ImageLoader(max_image_pixels=10**10).load(png_header_claiming(50_000, 50_000), 0)
    with pytest.raises(InvalidInputError, match=r"^item 1: .*claims 9000x9000 pixels, over the cap"):
        loader.load(png_header_claiming(9000, 9000), 1)
    with pytest.raises(InvalidInputError, match="over the cap of 1000"):
        ImageLoader(max_image_pixels=1000).load(np.zeros((40, 40, 3), dtype=np.uint8), 0)


def test_requests_classify_mixed_items(cat):
    assert to_request("a cat", 0).kind == "text"
    assert to_request(Path("cat.png"), 1).kind == "image"
    assert to_request(Composed(cat, "red"), 2).kind == "composed"
    interleaved = to_request(Interleaved(["Photo:", cat, "caption", cat]), 3)
    assert interleaved.kind == "interleaved" and len(interleaved.images) == 2
    assert interleaved.text == "Photo:\n<image>\ncaption\n<image>"
    with pytest.raises(InvalidInputError, match=r"^item 4: unsupported item builtins.NoneType"):
        to_request(None, 4)
    with pytest.raises(InvalidInputError, match=r"^item 5: .*reserved image placeholder"):
        to_request("look: <image>", 5)
    with pytest.raises(InvalidInputError, match=r"^item 6: Interleaved has no parts"):
        to_request(Interleaved([]), 6)


def test_identical_content_has_equal_keys(cat, tmp_path):
    png = encode(cat, "PNG")
    assert to_request(png, 0).key() == to_request(bytes(png), 1).key()
    assert to_request(cat, 0).key() == to_request(cat.copy(), 1).key()
    assert to_request(cat, 0).key() != to_request(cat.rotate(90), 1).key()
    assert to_request("a", 0).key() != to_request(Interleaved(["a"]), 0).key()
    rotated = Image.open(io.BytesIO(encode(cat, "JPEG", exif=_orientation(6))))
    upright = Image.open(io.BytesIO(encode(cat, "JPEG")))
    assert to_request(rotated, 0).key() != to_request(upright, 1).key()  # same pixels, shown rotated


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif
