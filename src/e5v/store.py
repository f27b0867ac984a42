"""Deprecated: :mod:`e5v.collection.repository` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.collection import repository as _moved

warnings.warn("e5v.store moved to e5v.collection.repository; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
