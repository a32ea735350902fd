"""palisade-c: a compiled implementation of the PALISADE v1.2 post-quantum tunnel protocol.

Layers, from the bottom (see docs/architecture.md):

* ``RecordLayer`` (compiled): seal and open packets for one session.
* ``Connection`` / ``ServerEndpoint``: the sans-IO protocol core; datagrams and time in,
  datagrams and events out.
* ``connect`` / ``serve`` / ``Tunnel``: the asyncio shell over UDP or serial links. They are
  loaded on first use, so code that only needs the core does not import asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, PLUS_SHAPING, Config
from palisade_c.connection import Connection
from palisade_c.endpoint import EndpointEvent, ServerEndpoint
from palisade_c.identity import Identity, TrustStore
from palisade_c.record import Record, RecordLayer
from palisade_c.shaping import Shaping
from palisade_c.tickets import ClientTicket, ClientTicketCache, SqliteTicketStore, TicketService

if TYPE_CHECKING:
    from palisade_c.aio import HandshakeTimeoutError, Server, Tunnel, connect, serve

__version__ = "0.1.0"

__all__ = [
    "PLUS_MIGRATION",
    "PLUS_RESUMPTION",
    "PLUS_SHAPING",
    "ClientTicket",
    "ClientTicketCache",
    "Config",
    "Connection",
    "EndpointEvent",
    "HandshakeTimeoutError",
    "Identity",
    "Record",
    "RecordLayer",
    "Server",
    "ServerEndpoint",
    "Shaping",
    "SqliteTicketStore",
    "TicketService",
    "TrustStore",
    "Tunnel",
    "__version__",
    "connect",
    "serve",
]

# Served lazily by __getattr__ below (PEP 562): the asyncio shell and what it needs.
_LAZY = frozenset({"HandshakeTimeoutError", "Server", "Tunnel", "connect", "serve"})


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'palisade_c' has no attribute {name!r}")
    from palisade_c import aio

    value = getattr(aio, name)
    globals()[name] = value  # later lookups skip this function
    return value
