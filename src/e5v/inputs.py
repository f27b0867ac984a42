"""Deprecated: :mod:`e5v.core.inputs` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.core import inputs as _moved

warnings.warn("e5v.inputs moved to e5v.core.inputs; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
