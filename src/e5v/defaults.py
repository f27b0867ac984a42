"""Defaults shared by the library and the command line (importing this loads no model code)."""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_REQUEST_PIXELS", "DEFAULT_MODEL"]

#: The published E5-V checkpoint on the Hugging Face hub.
DEFAULT_MODEL = "royokong/e5-v"
#: Decoded pixels of one request's images that ``e5v serve`` takes, at most (about sixteen
#: images at the default pixel cap of an image).
DEFAULT_MAX_REQUEST_PIXELS = 1 << 30
