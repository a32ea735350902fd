"""``python -m palisade_c``: the same command line as the ``palisade`` console script."""

from __future__ import annotations

import sys

from palisade_c.cli import main

if __name__ == "__main__":
    sys.exit(main())
