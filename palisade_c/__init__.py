"""palisade-c: a compiled implementation of the PALISADE v1.2 post-quantum tunnel protocol.

The low-level record layer is importable directly::

    from palisade_c import RecordLayer

The asyncio tunnel API is too (``connect``, ``serve``, ``Tunnel``, ``Server``); see
:mod:`palisade_c.aio`. It is imported on first use, so code that only needs the record layer
does not pay for asyncio and the handshake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from palisade_c.record import Record, RecordLayer

if TYPE_CHECKING:
    from palisade_c.aio import HandshakeTimeoutError, Server, Tunnel, connect, serve

__version__ = "0.1.0"

__all__ = [
    "HandshakeTimeoutError",
    "Record",
    "RecordLayer",
    "Server",
    "Tunnel",
    "__version__",
    "connect",
    "serve",
]

# Names served lazily by __getattr__ below (PEP 562), and the module that defines them.
_LAZY = {
    "HandshakeTimeoutError": "palisade_c.aio",
    "Server": "palisade_c.aio",
    "Tunnel": "palisade_c.aio",
    "connect": "palisade_c.aio",
    "serve": "palisade_c.aio",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'palisade_c' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value
