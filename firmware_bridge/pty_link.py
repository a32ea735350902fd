"""Moved to :mod:`palisade_c.transport.pty`.

palisade_c never imports firmware_bridge (this package builds on it, never the reverse).
The old name stays importable, as the very same module object, so that existing imports
and monkeypatches keep working.
"""

from __future__ import annotations

import sys

import palisade_c.transport.pty as _real

sys.modules[__name__] = _real
