"""Datagram transports for the asyncio shell: the shared interface, URL parsing and UDP.

Each transport moves whole datagrams between the event loop and a link; see
:mod:`palisade_c.transport.base` for the contract, :mod:`palisade_c.transport.udp` for UDP and
:mod:`palisade_c.transport.serial` for serial links (imported on demand: it starts threads
and needs pyserial), with :mod:`palisade_c.transport.pty` as a virtual serial line.
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
