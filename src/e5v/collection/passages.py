"""Texts cut into passages.

Passages are contiguous, non-overlapping spans of at most ``max_chars`` characters, cut
at paragraph breaks (blank lines) where the paragraphs fit, else at sentence ends, else
at whitespace, and only as a last resort inside a word. Whitespace between passages
belongs to none. Overlap is left out: every passage is embedded as a whole by E5-V, and
each character is then found in exactly one result.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from e5v.errors import ConfigurationError

__all__ = ["DEFAULT_MAX_CHARS", "Passage", "split_passages"]

#: Default passage size in characters (about 200 tokens of English).
DEFAULT_MAX_CHARS = 800

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_CLOSERS = "\"')]\u00bb\u201d\u2019"  # quotes and brackets that may follow a sentence's end
_SENTENCE_END = re.compile(rf"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][{re.escape(_CLOSERS)}]))\s+")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Passage:
    """``text == source[start:end]``; ``number`` counts from 0 within its file."""

    number: int
    start: int
    end: int
    text: str


def split_passages(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[Passage]:
    """Cut ``text`` into passages of at most ``max_chars`` characters (see the module doc)."""
    if max_chars < 1:
        raise ConfigurationError(f"max_chars must be at least 1, got {max_chars}")
    pieces: list[tuple[int, int]] = []
    for start, end in _spans(text, 0, len(text), _PARAGRAPH_BREAK):
        pieces.extend(_fit(text, start, end, max_chars))
    passages: list[Passage] = []
    current: tuple[int, int] | None = None
    for start, end in pieces:
        if current is not None and end - current[0] <= max_chars:
            current = (current[0], end)
            continue
        if current is not None:
            passages.append(Passage(len(passages), current[0], current[1], text[current[0] : current[1]]))
        current = (start, end)
    if current is not None:
        passages.append(Passage(len(passages), current[0], current[1], text[current[0] : current[1]]))
    return passages


def _spans(text: str, start: int, end: int, separator: re.Pattern[str]) -> Iterator[tuple[int, int]]:
    """Non-blank spans of ``text[start:end]`` between matches of ``separator``, stripped."""
    position = start
    for match in separator.finditer(text, start, end):
        yield from _stripped(text, position, match.start())
        position = match.end()
    yield from _stripped(text, position, end)


def _stripped(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        yield (start, end)


def _fit(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """Spans of at most ``max_chars``: the whole, else sentences, else words, else cuts."""
    if end - start <= max_chars:
        yield (start, end)
        return
    for separator in (_SENTENCE_END, _WHITESPACE):
        spans = list(_spans(text, start, end, separator))
        if len(spans) > 1:
            for span_start, span_end in spans:
                yield from _fit(text, span_start, span_end, max_chars)
            return
    for cut in range(start, end, max_chars):
        yield (cut, min(cut + max_chars, end))
