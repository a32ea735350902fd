"""asyncio shell around the sans-IO core: :func:`connect`, :func:`serve` and :class:`Tunnel`.

Theory of operation
-------------------
The core (:class:`~palisade_c.connection.Connection` for a client,
:class:`~palisade_c.endpoint.ServerEndpoint` for a server) never does I/O and never reads a
clock. An :class:`_Engine` drives one core on the event loop with three rules:

* every received datagram goes to ``receive_datagram(data, addr, loop.time())``;
* after *every* operation that can produce output (a datagram in, a timer, ``send``,
  ``close``) the engine runs :meth:`_Engine.update`: it sends everything from
  ``datagrams_to_send`` at once through the transport, hands out the new events, and re-arms
  the timer;
* there is exactly one timer per core, a ``loop.call_at`` handle set to ``get_timer()``.
  When it fires the engine calls ``handle_timer(loop.time())`` and updates. A handle (rather
  than a task sleeping in a loop) is cancelled and replaced in O(1) whenever the deadline
  moves and cannot outlive the loop.

Sends are eager and synchronous: :meth:`Tunnel.send` seals the packet and hands it to the
socket before returning. Nothing is queued in the shell on the way out; on the way in, a tunnel
buffers at most :data:`MAX_QUEUED_EVENTS` events for a reader that falls behind and then drops
data (counted under ``rx-queue-full`` in :attr:`Tunnel.counters`), as a datagram link would.

Closing is always bounded: the core finishes a soft close within ``close_drain_time``; the
shell waits that long plus :data:`CLOSE_GRACE` and then gives up on the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, ParamSpec, Protocol, Self

from palisade_c.config import Config
from palisade_c.connection import Connection, EventLog
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import (
    ConfigError,
    ConnectionClosedError,
    ErrorCode,
    HandshakeError,
    PalisadeError,
    StateError,
    code_name,
)
from palisade_c.events import (
    ConnectionClosed,
    DataReceived,
    Event,
    HandshakeCompleted,
    NewTicket,
)
from palisade_c.safetext import printable
from palisade_c.tickets import ClientTicket, ClientTicketCache
from palisade_c.transport.base import SERIAL_SCHEMES, Addr, Transport, link_config, parse_url
from palisade_c.transport.udp import UdpTransport

__all__ = [
    "CLOSE_GRACE",
    "MAX_QUEUED_EVENTS",
    "Connecting",
    "Handler",
    "HandshakeTimeoutError",
    "Server",
    "Tunnel",
    "connect",
    "describe_stall",
    "serve",
]

log = logging.getLogger("palisade_c.aio")
_session_log = logging.getLogger("palisade_c.sessions")

#: Events a tunnel holds for a slow reader before it drops incoming data.
MAX_QUEUED_EVENTS = 4096
#: Seconds allowed beyond ``close_drain_time`` (and beyond ``handshake_timeout`` for a
#: handshake) before the shell stops waiting for the core. The core enforces both limits by
#: itself; this only guards against a core bug turning into a hang.
CLOSE_GRACE = 1.0

#: Smallest step between two timer callbacks. If handle_timer(now) leaves a deadline at or
#: before ``now`` (it should not), re-firing at once would spin the loop; this bounds it.
MIN_TIMER_STEP = 0.001

#: What :func:`serve` runs for each established tunnel.
Handler = Callable[["Tunnel"], Awaitable[None]]


class HandshakeTimeoutError(HandshakeError, TimeoutError):
    """The handshake got no (complete) answer in time.

    It is a :class:`~palisade_c.errors.HandshakeError` with code ``ErrorHandshakeTimeout`` and
    also a :class:`TimeoutError` (which ``asyncio.TimeoutError`` is), so either ``except``
    clause catches it. ``received`` is how many handshake bytes did arrive from the server:
    0 means nothing answered, anything else a reply that started and then stalled.
    """

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(ErrorCode.ErrorHandshakeTimeout, message)
        self.received = received


def describe_stall(received: int, url: object) -> str:
    """What a handshake timeout saw: no answer at all, or part of one."""
    if not received:
        return f"no answer from {url}"
    return f"received {received} bytes from {url}, then stalled"


def _handshake_error(event: ConnectionClosed, received: int = 0) -> HandshakeError:
    """The exception for a handshake that ended in ``event``."""
    if event.error_code == ErrorCode.ErrorHandshakeTimeout:
        return HandshakeTimeoutError(event.reason or "handshake timed out", received)
    try:
        code = ErrorCode(event.error_code)
    except ValueError:
        # A code we do not know (a newer peer): keep it visible in the message.
        return HandshakeError(
            ErrorCode.ErrorInternal, f"unknown error code {code_name(event.error_code)}: "
            f"{event.reason}"
        )
    return HandshakeError(code, event.reason)


class _Core(Protocol):
    """What an engine needs from a sans-IO core (Connection and ServerEndpoint both fit)."""

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None: ...

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[bytes, Addr]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...


class _Engine:
    """Drives one sans-IO core over one transport (see the module docstring)."""

    def __init__(self, core: _Core, transport: Transport) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = core
        self.transport = transport
        self._timer: asyncio.TimerHandle | None = None
        self._last_fire = float("-inf")
        self._stopped = False
        transport.on_datagram = self._on_datagram

    # -- driving ----------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Addr) -> None:
        if self._stopped:
            return
        try:
            self._core.receive_datagram(data, addr, self._loop.time())
        except Exception:
            # The core promises never to raise for peer input; if it does, that is a bug in
            # it, and dropping the datagram is the safe reaction.
            log.exception("core raised on a received datagram; dropped")
        self.update()

    def _on_timer(self) -> None:
        self._timer = None
        if self._stopped:
            return
        self._last_fire = now = self._loop.time()
        try:
            self._core.handle_timer(now)
        except Exception:
            # A timer that raises would fire again at once and spin the loop: fail instead.
            log.exception("core raised in handle_timer; shutting this engine down")
            self._internal_error()
            return
        self.update()

    def update(self) -> None:
        """Send pending output, hand out events, re-arm the timer.

        Called after every core operation that can produce output.
        """
        # Handling an event can itself produce output (a server closing a session that
        # finished its handshake during shutdown), so repeat until the events run out.
        while not self._stopped:
            for data, addr in self._core.datagrams_to_send(self._loop.time()):
                self.transport.send(data, addr)
            if not self._dispatch_events():
                break
        self._rearm()

    def _rearm(self) -> None:
        deadline = None if self._stopped else self._core.get_timer()
        if deadline is not None and deadline <= self._last_fire:
            deadline = self._last_fire + MIN_TIMER_STEP
        timer = self._timer
        # Keep a timer that fires no later than needed: the idle and keepalive deadlines move
        # later with every datagram, and an early wake-up only finds nothing due and re-arms.
        # Replacing the loop's timer handle each time would cost more than that wake-up.
        if timer is not None and (deadline is None or timer.when() > deadline):
            timer.cancel()
            self._timer = timer = None
        if deadline is not None and timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def swap_transport(self, transport: Transport) -> None:
        """Carry on over ``transport``; the old one is closed (client migration)."""
        old = self.transport
        old.on_datagram = None
        transport.on_datagram = self._on_datagram
        self.transport = transport
        old.close()

    def stop(self) -> None:
        """Stop driving the core and release the transport (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.on_datagram = None
        self.transport.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- subclass hooks ---------------------------------------------------------------------------

    def _dispatch_events(self) -> bool:
        """Hand out the core's pending events; True if there were any."""
        raise NotImplementedError

    def _internal_error(self) -> None:
        raise NotImplementedError


class Tunnel:
    """One established PALISADE session, client or server side.

    Receive with :meth:`recv` (data only), :meth:`recv_event` (every event) or ``async for``;
    use one style per tunnel, since they read from the same queue. Send with :meth:`send`.
    """

    def __init__(self, connection: Connection, engine: _Engine, *, owns_engine: bool) -> None:
        self._conn = connection
        self._engine = engine
        # A client tunnel is the only user of its engine and socket; a server tunnel shares
        # the server's.
        self._owns_engine = owns_engine
        self._events: deque[Event] = deque()
        self._changed = asyncio.Event()
        self._closed: asyncio.Future[ConnectionClosed] = engine._loop.create_future()
        self._close_returned = False
        self._closing = False
        self._queue_drops = 0
        self._handshake: HandshakeCompleted | None = None
        #: Resumption tickets the server issued on this tunnel (PLUS), oldest first.
        self.tickets: list[ClientTicket] = []

    # -- called by the engine ---------------------------------------------------------------------

    def _on_handshake(self, event: HandshakeCompleted) -> None:
        self._handshake = event

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ConnectionClosed):
            self._finish(event)
            return
        if len(self._events) >= MAX_QUEUED_EVENTS and isinstance(event, DataReceived):
            self._queue_drops += 1
            return
        self._events.append(event)
        self._changed.set()

    def _finish(self, event: ConnectionClosed) -> None:
        if not self._closed.done():
            self._closed.set_result(event)
        self._changed.set()

    # -- properties -------------------------------------------------------------------------------

    @property
    def connection(self) -> Connection:
        """The sans-IO connection underneath (for introspection; drive it only via the tunnel)."""
        return self._conn

    @property
    def handshake(self) -> HandshakeCompleted | None:
        """The handshake's outcome (``None`` only before it completes)."""
        return self._handshake

    @property
    def peer_fingerprint(self) -> str:
        """Hex SHA3-256 fingerprint of the peer's authenticated public key."""
        return self._conn.peer_fingerprint or ""

    @property
    def peer_address(self) -> Addr:
        """Where the peer's datagrams are sent."""
        return self._conn.peer_addr

    @property
    def max_payload(self) -> int:
        """The largest payload :meth:`send` accepts: one datagram of the path (its size as
        configured, or as learned from a gateway) less the packet's headers and tag."""
        return self._conn.max_payload

    @property
    def counters(self) -> dict[str, Any]:
        """The connection's counters, plus data this tunnel dropped for a slow reader."""
        counters = self._conn.counters
        if self._queue_drops:
            drops = dict(counters.get("drops", {}))
            drops["rx-queue-full"] = drops.get("rx-queue-full", 0) + self._queue_drops
            counters["drops"] = drops
        return counters

    @property
    def closed(self) -> asyncio.Future[ConnectionClosed]:
        """Resolved with the :class:`~palisade_c.events.ConnectionClosed` event at CLOSED."""
        return self._closed

    @property
    def is_closed(self) -> bool:
        """True once the connection reached CLOSED."""
        return self._closed.done()

    # -- sending ----------------------------------------------------------------------------------

    def _closed_error(self) -> ConnectionClosedError:
        if self._closed.done():
            ev = self._closed.result()
            return ConnectionClosedError(ev.error_code, ev.reason)
        return ConnectionClosedError(0, "closing")

    def send(self, data: bytes | bytearray | memoryview, stream_id: int = 0) -> None:
        """Encrypt ``data`` as one packet on ``stream_id`` and send it now.

        Raises :class:`~palisade_c.errors.ConnectionClosedError` once the tunnel is closing or
        closed, :class:`~palisade_c.errors.PacketTooLargeError` if ``data`` is longer than
        :attr:`max_payload` (the error carries it as ``max_payload``),
        :class:`~palisade_c.errors.BackPressureError` when constant-rate shaping's send queue
        is full (nothing was queued; retry after a slot), and :class:`ValueError` for a
        stream id outside 0..253.
        """
        if self._closing or self._closed.done():
            raise self._closed_error()
        try:
            self._conn.send_data(bytes(data), stream_id, now=self._engine._loop.time())
        except StateError:
            # The peer started a close (or the session died) since our last look.
            if not self._conn.established:
                raise self._closed_error() from None
            raise
        self._engine.update()

    def request_rekey(self) -> None:
        """Start an epoch change now (a client asks; the server announces)."""
        if self._closing or self._closed.done():
            raise self._closed_error()
        self._conn.request_rekey(now=self._engine._loop.time())
        self._engine.update()

    async def migrate(self) -> None:
        """Client over UDP: move to a new local port and tell the server (soft migration,
        PLUS feature 0x02). The server validates the new path before it uses it; keys and
        epochs stay as they are."""
        if not self._owns_engine or not isinstance(self._engine.transport, UdpTransport):
            raise ConfigError("migrate() is for a client tunnel over UDP")
        if self._closing or self._closed.done():
            raise self._closed_error()
        peer = self._conn.peer_addr
        assert peer is not None  # established clients always have one
        old = self._engine.transport
        new, _ = await UdpTransport.for_peer(
            peer[0], peer[1], max_datagram_size=old.max_datagram_size,
            buffer_bytes=self._conn.config.socket_buffer_bytes)
        self._engine.swap_transport(new)
        self._conn.migrate(now=self._engine._loop.time())
        self._engine.update()

    # -- receiving --------------------------------------------------------------------------------

    async def recv_event(self) -> Event:
        """The next event (data, epoch change, ...); the :class:`ConnectionClosed` event last.

        After the close event has been returned once, raises ConnectionClosedError.
        """
        while True:
            if self._events:
                return self._events.popleft()
            if self._closed.done():
                if not self._close_returned:
                    self._close_returned = True
                    return self._closed.result()
                raise self._closed_error()
            self._changed.clear()
            await self._changed.wait()

    async def recv(self) -> bytes:
        """The next datagram's payload (any stream); other events are skipped.

        Raises :class:`~palisade_c.errors.ConnectionClosedError` once the tunnel is closed
        and every datagram received before the close has been returned.
        """
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, DataReceived):
                    return event.data
            if self._closed.done():
                raise self._closed_error()
            self._changed.clear()
            await self._changed.wait()

    def __aiter__(self) -> Tunnel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosedError:
            raise StopAsyncIteration from None

    # -- closing ----------------------------------------------------------------------------------

    async def close(self, error_code: int = 0, reason: str = "") -> ConnectionClosed:
        """Soft close: tell the peer, drain, and wait (bounded) for CLOSED.

        Returns the close event (which may be the peer's, if it closed first).
        """
        if not self._closed.done():
            # ValueError for a code outside u16. The drain counts from now, not from the
            # last datagram this side received (issue 10, item 5).
            self._conn.close(error_code, reason, now=self._engine._loop.time())
            self._closing = True
            self._engine.update()
            bound = self._conn.config.close_drain_time + CLOSE_GRACE
            try:
                async with asyncio.timeout(bound):
                    await asyncio.shield(self._closed)
            except TimeoutError:
                log.warning("%s: close did not finish within %.1f s; abandoning it",
                            self._conn.name, bound)
                self._finish(ConnectionClosed(int(ErrorCode.ErrorInternal),
                                              "close timed out", False))
        if self._owns_engine:
            self._engine.stop()
            await self._engine.transport.wait_closed()
        return self._closed.result()

    async def wait_closed(self) -> ConnectionClosed:
        """Wait until the tunnel is closed (by either side) without closing it."""
        return await asyncio.shield(self._closed)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (f"Tunnel({self._conn.name}, state={self._conn.state}, "
                f"peer={self.peer_fingerprint[:16]})")


# -- client ----------------------------------------------------------------------------------------


class _ClientEngine(_Engine):
    def __init__(self, connection: Connection, transport: Transport,
                 ticket_cache: ClientTicketCache | None = None) -> None:
        super().__init__(connection, transport)
        self.connection = connection
        self.ticket_cache = ticket_cache
        self.tunnel = Tunnel(connection, self, owns_engine=True)
        #: Resolved with HandshakeCompleted, or ConnectionClosed if the handshake failed.
        self.handshake: asyncio.Future[HandshakeCompleted | ConnectionClosed] = (
            self._loop.create_future()
        )

    def _dispatch_events(self) -> bool:
        any_event = False
        while (event := self.connection.next_event()) is not None:
            any_event = True
            if isinstance(event, HandshakeCompleted):
                self.tunnel._on_handshake(event)
                if not self.handshake.done():
                    self.handshake.set_result(event)
                continue
            if isinstance(event, NewTicket):
                self.tunnel.tickets.append(event.ticket)
                if self.ticket_cache is not None:
                    self.ticket_cache.add(event.ticket)
                continue
            if isinstance(event, ConnectionClosed):
                if not self.handshake.done():
                    self.handshake.set_result(event)
                # CLOSED: the core will never send again, so the socket can go now. Output
                # produced on the way to CLOSED was flushed before the events were read.
                self.stop()
            self.tunnel._on_event(event)
        return any_event

    def _internal_error(self) -> None:
        event = ConnectionClosed(int(ErrorCode.ErrorInternal), "internal error", False)
        if not self.handshake.done():
            self.handshake.set_result(event)
        self.tunnel._finish(event)
        self.stop()

    def link_reset(self, reason: str) -> None:
        """The link says the peer lost its session state (a serial device rebooted): end
        the session now, with ``ErrorSessionNotFound``, so the caller can connect again."""
        if self._stopped or self.connection.closed:
            return
        self.connection.close(int(ErrorCode.ErrorSessionNotFound), reason,
                              now=self._loop.time())
        self.update()


async def _open_transport(
    url: str | Transport, config: Config, *, server: bool, peer: Addr = None,
    sock: socket.socket | None = None,
) -> tuple[Transport, Addr, Config]:
    """The transport ``url`` names, the peer's address (clients) and ``config`` adjusted to
    the link: a serial link's MTU and speed (see :func:`~palisade_c.transport.base.link_config`).

    ``url`` may also be a ready :class:`Transport`; a client then talks to ``peer``, or to the
    transport's own ``peer_address`` (a serial link has one).
    """
    if isinstance(url, Transport):
        if not server and peer is None:
            peer = getattr(url, "peer_address", None)
            if peer is None:
                raise ConfigError("connect() over a Transport object needs peer=ADDRESS")
        return url, peer, link_config(config, url)
    scheme, host, port, _params = parse_url(url)
    if scheme in SERIAL_SCHEMES:
        # Imported here: pyserial and its threads are only for those who use a serial link.
        from palisade_c.transport.serial import SerialTransport

        # A device announces its node id in the link HELLO, so a gateway routes to it.
        serial = await SerialTransport.open(url, role="device" if server else "host",
                                            node_id=config.node_id if server else None)
        try:
            return serial, serial.peer_address, link_config(config, serial)
        except BaseException:
            serial.close()
            await serial.wait_closed()
            raise
    if server:
        udp = await UdpTransport.bind(host, port, max_datagram_size=config.max_datagram_size,
                                      buffer_bytes=config.socket_buffer_bytes, sock=sock)
        return udp, None, config
    if port == 0:
        raise ConfigError(f"bad URL {url!r}: a server port cannot be 0")
    udp, peer = await UdpTransport.for_peer(
        host, port, max_datagram_size=config.max_datagram_size,
        buffer_bytes=config.socket_buffer_bytes,
    )
    return udp, peer, config


class Connecting(Coroutine[Any, Any, Tunnel]):
    """What :func:`connect` returns: await it for the :class:`Tunnel`, or use it as
    ``async with connect(...) as tunnel:``, which closes the tunnel on the way out (as
    ``websockets.connect`` does). It is a coroutine, so ``asyncio.create_task`` takes it."""

    def __init__(self, coro: Coroutine[Any, Any, Tunnel]) -> None:
        self._coro = coro
        self._tunnel: Tunnel | None = None

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            # The one-argument form: the three-argument one is deprecated since 3.12.
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Tunnel]:
        return self._coro.__await__()

    async def __aenter__(self) -> Tunnel:
        self._tunnel = await self._coro
        return self._tunnel

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._tunnel is not None:
            await self._tunnel.close()


_P = ParamSpec("_P")


def _connecting(fn: Callable[_P, Coroutine[Any, Any, Tunnel]]) -> Callable[_P, Connecting]:
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Connecting:
        return Connecting(fn(*args, **kwargs))

    return wrapper


@_connecting
async def connect(
    url: str | Transport,
    config: Config,
    *,
    peer: Addr = None,
    timeout: float | None = None,
    on_connection: Callable[[Connection], None] | None = None,
    ticket: ClientTicket | None = None,
    tickets: ClientTicketCache | None = None,
    early_data: bytes | None = None,
    event_log: EventLog | None = None,
) -> Tunnel:
    """Open a tunnel to the server at ``url`` (``udp://HOST:PORT`` or a serial URL such as
    ``serial:///dev/ttyUSB0?baud=115200``, whose MTU and speed then override ``config``'s).
    ``url`` may also be a ready :class:`~palisade_c.transport.base.Transport` (the tunnel
    then owns it); give ``peer``, the server's address on it, unless the transport has a
    ``peer_address`` of its own. ``async with connect(...) as tunnel:`` closes the tunnel
    at the end of the block.

    Returns once the handshake has completed. Raises
    :class:`~palisade_c.errors.HandshakeError` carrying the spec error code when the handshake
    fails (for example ``ErrorCertificateInvalid`` when a key is not pinned), and
    :class:`HandshakeTimeoutError` (also a :class:`TimeoutError`) when no handshake completes
    within ``timeout`` seconds, or, if ``timeout`` is None, within the session's handshake
    budget (``config.handshake_timeout`` plus twice the handshake's airtime on a slow link)
    and a short grace.
    Raises :class:`~palisade_c.errors.ConfigError` for a bad URL or an unresolvable host.
    ``on_connection`` is called with the new connection before the handshake starts (to show
    progress on a slow link). On a serial link whose device reboots, the tunnel closes with
    ``ErrorSessionNotFound``; connect again to handshake anew.

    PALISADE-PLUS (``config.plus_features``): with a ``ticket``, or a ``tickets`` cache holding
    one, the client resumes (no signatures, a fresh KEM exchange) and may send ``early_data``
    as 0-RTT; a refused ticket falls back to a full handshake by itself. Tickets the server
    issues land in ``tickets`` (when given) and in :attr:`Tunnel.tickets`. Early data is
    replayable: use it only for requests that are safe to receive twice.
    """
    transport, peer, config = await _open_transport(url, config, server=False, peer=peer)
    if ticket is None and tickets is not None:
        # Only tickets from servers still pinned: another server's ticket would be wasted.
        for fp in sorted(config.trust.fingerprints):
            ticket = tickets.take(fp)
            if ticket is not None:
                break
    engine = _ClientEngine(Connection(config, is_client=True, event_log=event_log), transport,
                           tickets)
    transport.on_reset = engine.link_reset
    conn = engine.connection
    if on_connection is not None:
        on_connection(conn)
    # The core's own budget stretches with the link's airtime (a 9600-baud line needs ~17 s
    # for the handshake alone); waiting only handshake_timeout would give up before it does.
    bound = timeout if timeout is not None else conn.handshake_budget + CLOSE_GRACE
    started = engine._loop.time()
    try:
        conn.connect(peer, started, ticket=ticket, early_data=early_data)
        engine.update()
        while True:
            try:
                async with asyncio.timeout(started + bound - engine._loop.time()):
                    outcome = await asyncio.shield(engine.handshake)
                break
            except TimeoutError:
                # A gateway's PATH notice may have told the core the path is slow, and the
                # core's budget grew with it (palisade_c.pathinfo): wait as long as it does.
                grown = conn.handshake_budget + CLOSE_GRACE
                if timeout is not None or grown <= bound:
                    raise
                bound = grown
    except TimeoutError:
        with contextlib.suppress(PalisadeError):
            conn.close()  # erases the half-done handshake's secrets
        engine.stop()
        await transport.wait_closed()
        raise HandshakeTimeoutError(
            f"handshake timed out after {bound:g} s ({describe_stall(conn.hs_bytes_in, url)})",
            conn.hs_bytes_in,
        ) from None
    except BaseException:
        # Cancelled, or the core raised: never leave the socket open behind us.
        with contextlib.suppress(PalisadeError):
            conn.close()
        engine.stop()
        raise
    if isinstance(outcome, ConnectionClosed):
        await transport.wait_closed()
        raise _handshake_error(outcome, conn.hs_bytes_in)
    log.debug("connected to %s, peer %s", url, outcome.peer_fingerprint[:16])
    return engine.tunnel


# -- server ----------------------------------------------------------------------------------------


class _ServerEngine(_Engine):
    def __init__(self, endpoint: ServerEndpoint, transport: Transport, handler: Handler) -> None:
        super().__init__(endpoint, transport)
        self.endpoint = endpoint
        self.handler = handler
        self.tunnels: dict[Connection, Tunnel] = {}
        self._early: dict[Connection, list[Event]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        #: Called after an internal error stopped the engine (the Server shuts itself down).
        self.on_fatal: Callable[[], None] | None = None

    def _dispatch_events(self) -> bool:
        any_event = False
        while (item := self.endpoint.next_event()) is not None:
            any_event = True
            conn, event = item
            if isinstance(event, HandshakeCompleted):
                self._on_established(conn, event)
                continue
            tunnel = self.tunnels.get(conn)
            if tunnel is None:
                if isinstance(event, ConnectionClosed):
                    # A session that never completed its handshake: nobody to tell.
                    self._early.pop(conn, None)
                    # INFO on the sessions logger (rate-limited by the CLI): an operator
                    # wants to see refused clients, with the code and where they came from.
                    # A half-open session we drop ourselves without an error (the server
                    # shutting down) refused nobody: that is only worth a debug line.
                    if event.error_code or event.by_peer:
                        _session_log.info("%s: handshake refused from %s: %s %s", conn.name,
                                          conn.peer_addr, code_name(event.error_code),
                                          printable(event.reason))
                    else:
                        _session_log.debug("%s: handshake from %s abandoned: %s", conn.name,
                                           conn.peer_addr, printable(event.reason))
                elif isinstance(event, DataReceived):
                    # 0-RTT data arrives before the handshake completes: keep it for the
                    # tunnel (bounded by the ticket's early-data allowance in the core).
                    self._early.setdefault(conn, []).append(event)
                continue
            if isinstance(event, ConnectionClosed):
                del self.tunnels[conn]
            tunnel._on_event(event)
        return any_event

    def _on_established(self, conn: Connection, event: HandshakeCompleted) -> None:
        tunnel = Tunnel(conn, self, owns_engine=False)
        tunnel._on_handshake(event)
        self.tunnels[conn] = tunnel
        for early in self._early.pop(conn, []):
            tunnel._on_event(early)
        if self.closing:
            # Finished its handshake while we shut down: close it rather than serve it.
            conn.close(0, "server shutting down", now=self._loop.time())
            return
        log.debug("%s: established with %s at %s", conn.name, event.peer_fingerprint[:16],
                  conn.peer_addr)
        task = self._loop.create_task(self._run_handler(tunnel), name=f"palisade {conn.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_handler(self, tunnel: Tunnel) -> None:
        code, reason = 0, ""
        try:
            await self.handler(tunnel)
        except ConnectionClosedError:
            pass  # the handler used a tunnel the peer closed: a normal way to end
        except Exception:
            log.exception("handler for %s failed", tunnel.connection.name)
            code, reason = int(ErrorCode.ErrorInternal), "handler failed"
        finally:
            # A handler returning ends its tunnel (as websockets does); the close is bounded.
            if not tunnel.is_closed and not self.stopped:
                await tunnel.close(code, reason)

    def _internal_error(self) -> None:
        event = ConnectionClosed(int(ErrorCode.ErrorInternal), "internal error", False)
        for tunnel in list(self.tunnels.values()):
            tunnel._finish(event)
        self.tunnels.clear()
        self.stop()
        if self.on_fatal is not None:
            self.on_fatal()


class Server:
    """A running PALISADE server (see :func:`serve`). Also an async context manager."""

    def __init__(self, engine: _ServerEngine, config: Config) -> None:
        self._engine = engine
        self._config = config
        self._shutdown: asyncio.Task[None] | None = None
        self._done: asyncio.Future[None] = engine._loop.create_future()
        engine.on_fatal = self.close  # so that serve_forever() and wait_closed() return

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        sockname = self._engine.transport.local_address
        return str(sockname[0]), int(sockname[1])

    @property
    def endpoint(self) -> ServerEndpoint:
        """The sans-IO endpoint underneath (for introspection)."""
        return self._engine.endpoint

    @property
    def tunnels(self) -> list[Tunnel]:
        """The established tunnels that are not closed yet."""
        return list(self._engine.tunnels.values())

    @property
    def transport_counters(self) -> dict[str, int | None]:
        """Losses below the protocol, on UDP: ``kernel_drops`` (datagrams the kernel dropped
        for a full receive buffer, Linux only, else None) and ``dropped_sends``."""
        transport = self._engine.transport
        return transport.counters if isinstance(transport, UdpTransport) else {}

    @property
    def is_serving(self) -> bool:
        return self._shutdown is None

    def close(self) -> None:
        """Start shutting down: soft-close every tunnel, then release the socket.

        Returns at once; await :meth:`wait_closed` for the end. Idempotent.
        """
        if self._shutdown is None:
            self._shutdown = self._engine._loop.create_task(self._close())

    async def _close(self) -> None:
        engine = self._engine
        try:
            engine.closing = True
            engine.endpoint.close(now=engine._loop.time())
            engine.update()
            bound = self._config.close_drain_time + CLOSE_GRACE
            tunnels = list(engine.tunnels.values())
            if tunnels:
                await asyncio.wait([t.closed for t in tunnels], timeout=bound)
            for tunnel in tunnels:  # no-op for those that closed
                tunnel._finish(ConnectionClosed(int(ErrorCode.ErrorInternal), "server closed"))
            # Handlers see their tunnels closed and should return; give them a moment, then
            # cancel the rest so that shutdown is bounded.
            if engine.tasks:
                _done, pending = await asyncio.wait(set(engine.tasks), timeout=CLOSE_GRACE)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
        finally:
            engine.stop()
            await engine.transport.wait_closed()
            if not self._done.done():
                self._done.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the server has been closed and shut down completely."""
        await asyncio.shield(self._done)

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called; if cancelled, close the server first."""
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        host, port = self.address
        return f"Server(udp://{host}:{port}, tunnels={len(self._engine.tunnels)})"


async def serve(url: str | Transport, config: Config, handler: Handler, *,
                event_log: EventLog | None = None, sock: socket.socket | None = None) -> Server:
    """Listen on ``url`` (``udp://HOST:PORT``; port 0 picks a free port), or serve the peer
    on a serial link (``serial:///dev/ttyGS0``: this side plays the device), or serve over a
    ready :class:`~palisade_c.transport.base.Transport` (the server then owns it).

    Every connection that completes its handshake becomes a :class:`Tunnel` and gets its own
    task running ``handler(tunnel)``. When the handler returns, the tunnel is closed softly;
    if it raises, the tunnel is closed with ``ErrorInternal``. Raises :class:`OSError` when
    the address cannot be bound and :class:`~palisade_c.errors.ConfigError` for a bad URL.
    ``sock``: serve on this bound UDP socket instead of binding one (a worker process of
    ``palisade serve --workers``).
    """
    transport, _peer, config = await _open_transport(url, config, server=True, sock=sock)
    engine = _ServerEngine(ServerEndpoint(config, event_log=event_log), transport, handler)
    server = Server(engine, config)
    log.debug("serving on %s", transport.local_address)
    return server
