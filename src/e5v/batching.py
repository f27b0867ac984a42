"""Deprecated: :mod:`e5v.core.batching` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.core import batching as _moved

warnings.warn("e5v.batching moved to e5v.core.batching; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
