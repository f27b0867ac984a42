"""Deprecated: :mod:`e5v.core.cache` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.core import cache as _moved

warnings.warn("e5v.cache moved to e5v.core.cache; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
