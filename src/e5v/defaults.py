"""Defaults shared by the library and the command line (importing this loads no model code)."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_REQUEST_PIXELS", "DEFAULT_MODEL", "DEFAULT_REBIND_SAMPLE", "DEFAULT_REBIND_TOLERANCE"]

#: The published E5-V checkpoint on the Hugging Face hub.
DEFAULT_MODEL = "royokong/e5-v"
#: Decoded pixels of one request's images that ``e5v serve`` takes, at most (about sixteen
#: images at the default pixel cap of an image).
DEFAULT_MAX_REQUEST_PIXELS = 1 << 30
#: Records ``e5v collections rebind`` embeds again to compare with the stored vectors.
DEFAULT_REBIND_SAMPLE = 8
#: The largest cosine distance (1 - cosine similarity) between a re-embedded and a stored
#: vector that ``e5v collections rebind`` accepts: room for another device or dtype.
DEFAULT_REBIND_TOLERANCE = 0.01
