"""Datagram transports for the asyncio shell: the shared interface, URL parsing and UDP.

Each transport moves whole datagrams between the event loop and a link; see
:mod:`palisade_c.transport.base` for the contract and :mod:`palisade_c.transport.udp` for UDP.
"""

from __future__ import annotations

from palisade_c.transport.base import (
    SCHEMES,
    Addr,
    DatagramHandler,
    ParsedUrl,
    Transport,
    parse_url,
)
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
