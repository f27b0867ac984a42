"""Deprecated: :mod:`e5v.core.prompts` (this alias goes in the next release); import from there."""

import sys
import warnings

from e5v.core import prompts as _moved

warnings.warn("e5v.prompts moved to e5v.core.prompts; import from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
