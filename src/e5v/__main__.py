"""``python -m e5v``: the ``e5v`` command line."""

from __future__ import annotations

import sys

from e5v.cli import main

if __name__ == "__main__":
    sys.exit(main())
