"""Deprecated: :mod:`e5v.collection.records` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.collection import records as _moved

warnings.warn("e5v.indexing moved to e5v.collection.records; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
