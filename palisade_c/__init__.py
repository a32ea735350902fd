"""palisade-c: a compiled implementation of the PALISADE v1.2 post-quantum tunnel protocol.

The low-level record layer is importable directly::

    from palisade_c import RecordLayer
"""

from __future__ import annotations

from palisade_c.record import Record, RecordLayer

__version__ = "0.1.0"

__all__ = ["Record", "RecordLayer", "__version__"]
