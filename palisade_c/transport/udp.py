"""UDP transport on asyncio's datagram endpoints.

The transport drives a non-blocking socket from the event loop itself (``add_reader`` /
``add_writer``) rather than through asyncio's datagram endpoint, for two reasons: it reads
every datagram that is waiting at each wake-up (up to a bound) instead of one, and it reads
with ``recvmsg``, whose ancillary data carries Linux's count of datagrams the kernel dropped
because the socket's receive buffer was full (``SO_RXQ_OVFL``). That count is
:attr:`UdpTransport.kernel_drops`; without it, a server under a burst of clients loses
datagrams where no counter of ours can see. The socket's buffers are sized on request
(``buffer_bytes``; the kernel caps the value at ``net.core.rmem_max`` / ``wmem_max``).

Writes are eager: :meth:`UdpTransport.send` hands the datagram to the kernel at once, and only
if the socket is not writable queues it, up to :data:`MAX_SEND_QUEUE_BYTES`, flushed when it
is. Because PALISADE recovers from loss (handshake flights are retransmitted; data is
datagram-like), a datagram beyond that is dropped and counted rather than queued, so a socket
that cannot keep up never makes us grow memory without bound.

Sockets are never ``connect()``-ed, even on the client. A connected UDP socket would filter
datagrams by source address, but PALISADE finds a session by its RID, not by address, and
authenticates every packet; filtering would add nothing but a way to break when an address is
spelled differently (an IPv4-mapped IPv6 address, say).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import sys

from palisade_c.errors import ConfigError
from palisade_c.transport.base import Addr, Transport

__all__ = ["DEFAULT_MAX_DATAGRAM_SIZE", "DEFAULT_SOCKET_BUFFER_BYTES", "UdpTransport", "resolve"]

log = logging.getLogger("palisade_c.transport.udp")

#: PALISADE's default datagram budget on UDP (fits the IPv6 minimum MTU with headers).
DEFAULT_MAX_DATAGRAM_SIZE = 1200
#: Receive/send buffer size a server socket asks of the kernel unless told otherwise (the
#: kernel's own default, ~200 KiB on Linux, overflows under a burst of clients).
DEFAULT_SOCKET_BUFFER_BYTES = 4 << 20
#: Bytes of datagrams held while the socket is not writable; beyond that, sends are dropped.
MAX_SEND_QUEUE_BYTES = 256 * 1024
#: Datagrams read per wake-up at most, so that one busy socket cannot starve the loop.
MAX_READS_PER_WAKEUP = 256
#: Largest UDP payload: the read buffer, so no datagram is ever truncated.
_RECV_SIZE = 65535

# Linux: ask for the socket's drop counter as ancillary data on every read (socket(7)).
# Python does not export the constant; its value is fixed in the kernel's ABI.
_SO_RXQ_OVFL: int | None = getattr(socket, "SO_RXQ_OVFL", 40 if sys.platform == "linux" else None)
_CMSG_SPACE = socket.CMSG_SPACE(4)


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


class UdpTransport(Transport):
    """One UDP socket bound to a local address. Create it with :meth:`bind`."""

    def __init__(self, sock: socket.socket, max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE
                 ) -> None:
        super().__init__()
        self._max_datagram_size = max_datagram_size
        self._sock: socket.socket | None = sock
        self._loop = asyncio.get_running_loop()
        self._local: Addr = sock.getsockname()
        self._queue: collections.deque[tuple[bytes, Addr]] = collections.deque()
        self._queued_bytes = 0
        self._writing = False
        #: Datagrams dropped because the send queue was full.
        self.dropped_sends = 0
        #: Datagrams the kernel dropped because the receive buffer was full (Linux
        #: SO_RXQ_OVFL: the socket's running count, as of the last datagram read). None where
        #: the platform does not report it.
        self.kernel_drops: int | None = None
        #: The buffer sizes the kernel granted (it may cap, and Linux doubles, what was asked).
        self.receive_buffer_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.send_buffer_bytes = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self._closed = self._loop.create_future()
        if _SO_RXQ_OVFL is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
                self.kernel_drops = 0
            except OSError:
                pass  # not Linux after all, or an old kernel: no counter to offer
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        *,
        family: int = socket.AF_UNSPEC,
        max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE,
        buffer_bytes: int | None = None,
        sock: socket.socket | None = None,
    ) -> UdpTransport:
        """Open a socket bound to ``host:port`` (port 0: any free port), or adopt ``sock``,
        already bound (a worker's member of a reuseport group; ``host`` and ``port`` unused).
        Receive and send buffers get ``buffer_bytes`` when given (the kernel's defaults
        otherwise).

        Raises :class:`OSError` if the address cannot be bound (for example it is in use).
        """
        loop = asyncio.get_running_loop()
        adopted = sock is not None
        if sock is None:
            try:
                infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM,
                                               proto=socket.IPPROTO_UDP, flags=socket.AI_PASSIVE)
            except socket.gaierror as exc:
                raise ConfigError(f"cannot resolve {host!r}: {exc.strerror}") from None
            if not infos:
                raise ConfigError(f"cannot resolve {host!r}: no addresses")
            fam, _type, _proto, _canon, sockaddr = infos[0]
            sock = socket.socket(fam, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        try:
            sock.setblocking(False)
            if buffer_bytes is not None:
                _size_buffers(sock, buffer_bytes)
            if not adopted:
                sock.bind(sockaddr)
            self = cls(sock, max_datagram_size)
        except BaseException:
            sock.close()
            raise
        log.debug("udp bound to %s (receive buffer %d bytes)", self._local,
                  self.receive_buffer_bytes)
        return self

    @classmethod
    async def for_peer(
        cls, host: str, port: int, *, max_datagram_size: int = DEFAULT_MAX_DATAGRAM_SIZE,
        buffer_bytes: int | None = None,
    ) -> tuple[UdpTransport, Addr]:
        """A client socket on an ephemeral port that can reach ``host:port``.

        Returns the transport and the peer's resolved socket address (pass that to the core:
        it is what :meth:`send` needs and what replies come from).
        """
        family, peer = await resolve(host, port)
        any_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
        self = await cls.bind(any_host, 0, family=family, max_datagram_size=max_datagram_size,
                              buffer_bytes=buffer_bytes)
        return self, peer

    # -- Transport ------------------------------------------------------------------------------

    @property
    def max_datagram_size(self) -> int:
        return self._max_datagram_size

    @property
    def local_address(self) -> Addr:
        return self._local

    @property
    def counters(self) -> dict[str, int | None]:
        """Socket-level losses: kernel receive-buffer drops (None: not reported here) and
        sends dropped for a full queue."""
        return {"kernel_drops": self.kernel_drops, "dropped_sends": self.dropped_sends}

    def send(self, data: bytes, addr: Addr) -> None:
        sock = self._sock
        if sock is None or self._closing:
            return  # sending on a closed link is a drop, like any other lost datagram
        if not self._queue:
            try:
                sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                pass  # the kernel's send buffer is full: queue it below
            except OSError as exc:
                # ICMP errors reported on send, an unreachable address: UDP promises nothing
                # and the core retransmits what matters.
                log.debug("udp send from %s to %s failed: %s", self._local, addr, exc)
                return
        if self._queued_bytes + len(data) > MAX_SEND_QUEUE_BYTES:
            self.dropped_sends += 1
            return
        self._queue.append((data, addr))
        self._queued_bytes += len(data)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(sock.fileno(), self._on_writable)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        sock = self._sock
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())
        self._on_writable()  # one last best-effort flush of what is queued
        if self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False
        self._queue.clear()
        self._queued_bytes = 0
        self._sock = None
        sock.close()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    # -- event loop callbacks --------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        for _ in range(MAX_READS_PER_WAKEUP):
            if sock is None or self._closing:
                return
            try:
                data, ancdata, _flags, addr = sock.recvmsg(_RECV_SIZE, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp receive on %s failed: %s", self._local, exc)
                return
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(payload) >= 4:
                    # The socket's running count of drops when this datagram was queued.
                    drops = int.from_bytes(payload[:4], sys.byteorder)
                    if self.kernel_drops is None or drops > self.kernel_drops:
                        if drops:
                            log.debug("udp %s: the kernel dropped %d datagrams so far (receive"
                                      " buffer full)", self._local, drops)
                        self.kernel_drops = drops
            self.deliver(data, addr)

    def _on_writable(self) -> None:
        sock = self._sock
        queue = self._queue
        while queue and sock is not None:
            data, addr = queue[0]
            try:
                sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp send from %s to %s failed: %s", self._local, addr, exc)
            queue.popleft()
            self._queued_bytes -= len(data)
        if self._writing and sock is not None:
            self._loop.remove_writer(sock.fileno())
            self._writing = False

    def __repr__(self) -> str:
        return f"UdpTransport(local={self._local!r})"


# Linux: the same requests past net.core.rmem_max / wmem_max, for a privileged process
# (CAP_NET_ADMIN). Python does not export them; their values are fixed in the kernel's ABI.
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform == "linux" else {}


def _size_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte receive and send buffers. An unprivileged request is capped by
    the kernel (net.core.rmem_max / wmem_max on Linux) without failing; a privileged process
    gets the size it asked for. The granted sizes are what :class:`UdpTransport` reports."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        force = _FORCE.get(opt)
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
                continue
            except OSError:
                pass  # not privileged: the capped request below
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError as exc:
            log.debug("cannot size the udp socket buffer to %d bytes: %s", size, exc)
