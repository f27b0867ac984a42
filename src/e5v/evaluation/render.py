"""Captions drawn as images for I2I-Flickr30K, as the official ``create_text_image`` draws them.

The official code draws with ``arial.ttf`` (shipped in its repository, not redistributable
here); by default e5v draws with Pillow's bundled font (Aileron Regular at the same size),
so the images, and the scores, differ slightly. Pass ``font=PATH`` (``--font``) to draw
with Arial, or any TrueType font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from e5v.errors import ConfigurationError

__all__ = ["RenderedCaptions", "load_font", "render_text"]

WIDTH, HEIGHT, FONT_SIZE, MARGIN = 800, 400, 40, 20


def load_font(path: str | Path | None = None, size: int = FONT_SIZE) -> Any:
    """A TrueType font at ``size`` (``None``: Pillow's bundled one)."""
    if path is None:
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as exc:
        raise ConfigurationError(f"`font` {str(path)!r} is not a readable TrueType font: {exc}") from None


def render_text(text: str, font: Any) -> Image.Image:
    """``text`` in black on an 800x400 white canvas, wrapped to 760 px, vertically centred:
    the official ``create_text_image`` step for step."""
    image = Image.new("RGB", (WIDTH, HEIGHT), color=(255, 255, 255))
    draw = ImageDraw.Draw(image)
    lines = []
    words = text.split()
    while words:
        line = ""
        while words and draw.textlength(line + words[0], font=font) <= WIDTH - 2 * MARGIN:
            line += words.pop(0) + " "
        lines.append(line)  # as the official code, a word wider than the canvas loops forever:
        if not line:  # e5v puts it on a line of its own instead
            lines[-1] = words.pop(0)

    def height(line: str) -> int:
        box = draw.textbbox((0, 0), line, font=font)
        return int(box[3] - box[1])

    y = (HEIGHT - sum(height(line) for line in lines)) // 2
    for line in lines:
        draw.text((MARGIN, y), line, font=font, fill=(0, 0, 0))
        y += height(line)
    return image


class RenderedCaptions:
    """Captions as images, drawn when a slice is read."""

    def __init__(self, captions: Sequence[str], font: Any) -> None:
        self.captions = list(captions)
        self.font = font

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: slice) -> list[Image.Image]:
        return [render_text(text, self.font) for text in self.captions[index]]
