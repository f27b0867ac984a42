"""Deprecated: :mod:`e5v.core.embedder` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.core import embedder as _moved

warnings.warn("e5v.embedder moved to e5v.core.embedder; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
