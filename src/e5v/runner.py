"""Deprecated: :mod:`e5v.model.runner` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.model import runner as _moved

warnings.warn("e5v.runner moved to e5v.model.runner; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
