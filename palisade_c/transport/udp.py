"""UDP transport on asyncio's datagram endpoints.

Writes are eager: :meth:`UdpTransport.send` calls ``transport.sendto`` at once, which hands the
datagram to the kernel right away when the socket is writable and otherwise queues it inside
asyncio. The event loop never blocks on a send. Because PALISADE recovers from loss (handshake
flights are retransmitted; data is datagram-like), a datagram is dropped rather than queued
while asyncio reports its buffer full (``pause_writing``, past its high-water mark), so a
socket that cannot keep up never makes us grow memory without bound.

Sockets are never ``connect()``-ed, even on the client. A connected UDP socket would filter
datagrams by source address, but PALISADE finds a session by its RID, not by address, and
authenticates every packet; filtering would add nothing but a way to break when an address is
spelled differently (an IPv4-mapped IPv6 address, say).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from palisade_c.errors import ConfigError
from palisade_c.transport.base import Addr, Transport

__all__ = ["DEFAULT_MAX_DATAGRAM_SIZE", "UdpTransport", "resolve"]

log = logging.getLogger("palisade_c.transport.udp")

#: PALISADE's default datagram budget on UDP (fits the IPv6 minimum MTU with headers).
DEFAULT_MAX_DATAGRAM_SIZE = 1200


async def resolve(host: str, port: int, *, passive: bool = False) -> tuple[int, Addr]:
    """``(family, sockaddr)`` for ``host:port``; the first address the resolver prefers.

    ``passive`` asks for an address to bind to. Raises :class:`ConfigError` when the name
    does not resolve, so a CLI can report it in one line.
    """
    loop = asyncio.get_running_loop()
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = await loop.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP, flags=flags
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc.strerror}") from None
    if not infos:
        raise ConfigError(f"cannot resolve {host!r}: no addresses")
    family, _type, _proto, _canon, sockaddr = infos[0]
    return int(family), sockaddr


class _Protocol(asyncio.DatagramProtocol):
    """Forwards asyncio's callbacks to the owning :class:`UdpTransport`."""

    def __init__(self, owner: UdpTransport) -> None:
        self._owner = owner

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self._owner.deliver(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors and failed sends land here. UDP gives no delivery promise and the core
        # retransmits what matters, so this is worth a debug line, not a failure.
        log.debug("udp error on %s: %s", self._owner.local_address, exc)

    def pause_writing(self) -> None:
        self._owner._paused = True

    def resume_writing(self) -> None:
        self._owner._paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._on_lost(exc)


class UdpTransport(Transport):
    """One UDP socket bound to a local address. Create it with :meth:`bind`."""

    def __init__(self, max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE) -> None:
        super().__init__()
        self._max_datagram_size = max_datagram_size
        self._transport: asyncio.DatagramTransport | None = None
        self._local: Addr = None
        self._paused = False
        #: Datagrams dropped because asyncio's send buffer was full.
        self.dropped_sends = 0

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        *,
        family: int = socket.AF_UNSPEC,
        max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE,
        sock: socket.socket | None = None,
    ) -> UdpTransport:
        """Open a socket bound to ``host:port`` (port 0: any free port), or adopt ``sock``,
        already bound (a worker's member of a reuseport group; ``host`` and ``port`` unused).

        Raises :class:`OSError` if the address cannot be bound (for example it is in use).
        """
        loop = asyncio.get_running_loop()
        if family == socket.AF_UNSPEC and sock is None:
            family, _addr = await resolve(host, port, passive=True)
        self = cls(max_datagram_size)
        self._closed = loop.create_future()
        if sock is not None:
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), sock=sock)
        else:
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(host, port), family=family
            )
        self._transport = transport
        self._local = self._transport.get_extra_info("sockname")
        log.debug("udp bound to %s", self._local)
        return self

    @classmethod
    async def for_peer(
        cls, host: str, port: int, *, max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE
    ) -> tuple[UdpTransport, Addr]:
        """A client socket on an ephemeral port that can reach ``host:port``.

        Returns the transport and the peer's resolved socket address (pass that to the core:
        it is what :meth:`send` needs and what replies come from).
        """
        family, peer = await resolve(host, port)
        any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        self = await cls.bind(any_host, 0, family=family, max_datagram_size=max_datagram_size)
        return self, peer

    # -- Transport ------------------------------------------------------------------------------

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def local_address(self) -> Addr:
        return self._local

    def send(self, data: bytes, addr: Addr) -> None:
        transport = self._transport
        if transport is None or self._closing or transport.is_closing():
            return  # sending on a closed link is a drop, like any other lost datagram
        if self._paused:
            self.dropped_sends += 1
            return
        transport.sendto(data, addr)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            # asyncio flushes what it buffered, then calls connection_lost.
            self._transport.close()
        elif self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def _on_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.debug("udp socket %s lost: %s", self._local, exc)
        self._closing = True
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def __repr__(self) -> str:
        return f"UdpTransport(local={self._local!r})"
