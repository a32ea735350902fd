"""Datagram transports for the asyncio shell: the shared interface, URL parsing and UDP.

Each transport moves whole datagrams between the event loop and a link; see
:mod:`palisade_c.transport.base` for the contract, :mod:`palisade_c.transport.udp` for UDP and
:mod:`palisade_c.transport.serial` for serial links (imported on demand: it starts threads
and needs pyserial), with :mod:`palisade_c.transport.pty` as a virtual serial line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from palisade_c.transport.base import (
    SCHEMES,
    Addr,
    DatagramHandler,
    ParsedUrl,
    Transport,
    parse_url,
)

if TYPE_CHECKING:
    from palisade_c.transport.udp import UdpTransport

__all__ = [
    "SCHEMES",
    "Addr",
    "DatagramHandler",
    "ParsedUrl",
    "Transport",
    "UdpTransport",
    "parse_url",
]


def __getattr__(name: str) -> object:
    # UdpTransport is loaded on first use: it needs asyncio, and the sans-IO core (which
    # imports this package for the shared definitions) must not pull asyncio in.
    if name == "UdpTransport":
        from palisade_c.transport.udp import UdpTransport

        return UdpTransport
    raise AttributeError(f"module 'palisade_c.transport' has no attribute {name!r}")
