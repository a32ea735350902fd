"""Test-suite setup: make the shared test helpers (simlink.py) importable.

The suite runs with ``--import-mode=importlib`` so that ``palisade_c`` always resolves to the
installed, compiled package rather than the source tree; that mode does not put ``tests/`` on
``sys.path`` by itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
