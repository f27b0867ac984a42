"""Deprecated: :mod:`e5v.model.loading` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.model import loading as _moved

warnings.warn("e5v.loading moved to e5v.model.loading; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
