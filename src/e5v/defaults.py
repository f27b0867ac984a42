"""Defaults shared by the library and the command line (importing this loads no model code)."""

from __future__ import annotations

__all__ = ["DEFAULT_MODEL"]

#: The published E5-V checkpoint on the Hugging Face hub.
DEFAULT_MODEL = "royokong/e5-v"
