"""Serial transport: PALISADE datagrams over a UART or USB-CDC port (PROFILE §10, LINK.md).

Theory of operation
-------------------
A :class:`SerialTransport` is a :class:`~palisade_c.transport.base.Transport` like UDP, so the
same sans-IO core and the same asyncio engines run over it. It frames every datagram with the
shared C codec (:mod:`palisade_c.link`: COBS, CRC-32, channel byte) and keeps the asyncio loop
free of blocking I/O with two threads per port:

* the **I/O thread** owns the port: it opens it (and re-opens it after an unplug, backing off
  from 0.5 s to 5 s), reads whatever arrives, feeds the frame decoder, writes device log text
  (channel 1) to the ``palisade_c.device`` logger, and hands every other good frame to the loop
  with ``loop.call_soon_threadsafe``, one call per read;
* the **writer thread** drains a bounded queue of encoded frames into the port. ``send`` only
  encodes and appends, so it never blocks; when the queue holds ``queue`` bytes already, the
  datagram is dropped and counted (``dropped_queue_full``), exactly as the UDP transport drops
  when asyncio's buffer is full. PALISADE retransmits handshake flights and treats data as
  datagrams, so a drop is recoverable where a stalled event loop is not. A datagram identical
  to one still waiting in the queue is dropped too (``dropped_duplicate``): on a slow line a
  handshake retransmission often catches up with the first copy before it has left, and
  sending it twice would only delay what follows.

Everything else (link control on channel 2) runs on the event loop, so no lock guards the
protocol state; the lock only guards the port object and the write queue shared with the
threads.

Link control follows LINK.md §6. The side that opened the port as ``role=host`` (the default
for clients and the gateway) sends HELLO on opening, resends an unanswered one after 1 s and
then every 5 s, and answers a device HELLO it did not ask for; ``role=device`` (the default for
``palisade serve serial://``, which plays the firmware) announces itself once and answers every
HELLO. Until the peer's HELLO has arrived no datagram is sent (``dropped_not_ready``). The link
MTU is the smaller of the two announcements and becomes :attr:`max_datagram_size`; the baud
rate becomes :attr:`link_bits_per_second`, from which the core stretches its handshake timers.

A HELLO whose boot counter differs from the one seen before means the peer restarted and lost
its session keys: the transport logs it and calls :attr:`on_reset`, and the client engine ends
its session so that the shell connects again. A HELLO with the same counter (the host merely
re-opened the port after an unplug) changes nothing and the session carries on. The host also
PINGs after 2 s of silence; three unanswered PINGs mark the link silent, and it goes back to
sending HELLO until the device answers.

DTR and RTS: by default (``dtr=keep&rts=keep``) the transport never drives them, and it clears
HUPCL so that closing the port does not drop them either, because many boards reset on a DTR
edge. ``on``/``off`` set a line when the port opens; ``hupcl=1`` restores the classic drop on
close. (Linux itself raises DTR whenever a tty is opened while HUPCL is set; clearing HUPCL once
stops the drop on close and so the edge on the next open.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import serial
import serial.rfc2217

from palisade_c import link
from palisade_c.errors import ConfigError, DecodeError
from palisade_c.safetext import printable
from palisade_c.transport.base import (
    MIN_DATAGRAM_SIZE,
    SERIAL_SCHEMES,
    Addr,
    Transport,
    parse_url,
)

__all__ = [
    "DEFAULT_BAUD",
    "DEFAULT_QUEUE_BYTES",
    "HOST_BOOT_COUNTER",
    "RECONNECT_INITIAL",
    "RECONNECT_MAX",
    "LinePolicy",
    "Role",
    "SerialSpec",
    "SerialTransport",
]

log = logging.getLogger("palisade_c.transport.serial")
#: Device log text (channel 1) lands here, one record per frame.
device_log = logging.getLogger("palisade_c.device")

Role = Literal["host", "device"]
LinePolicy = Literal["keep", "on", "off"]

DEFAULT_BAUD = 115200
#: Bytes of encoded frames the write queue holds before ``send`` drops: a whole handshake
#: flight (the ServerHello is about 8.5 KB at MTU 512) with room to spare.
DEFAULT_QUEUE_BYTES = 32 * 1024
#: Back-off between attempts to re-open a lost port.
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 5.0
#: Host HELLO resends (LINK.md §6): first after 1 s, then every 5 s.
HELLO_RETRY_FIRST = 1.0
HELLO_RETRY = 5.0
#: Host keepalive (LINK.md §6): PING after this much silence; 3 misses mark the link silent.
PING_IDLE = 2.0
PING_MISSES = 3
#: How often the loop-side housekeeping (keepalive, HELLO resends) looks at the clock.
TICK = 0.25
#: How long ``open`` waits, by default, for the peer's HELLO before going on without it.
HELLO_WAIT = 2.0
#: Largest frame payload allowed before the peer's HELLO (LINK.md §5).
PRE_HELLO_MAX = link.MIN_MTU
#: Read timeout of the port: bounds how long the I/O thread takes to notice a close.
READ_TIMEOUT = 0.05
#: Writer batches: frames joined into one write, up to this many bytes.
WRITE_BATCH = 2048
#: Batches of received frames queued for the loop before the I/O thread drops (a stalled loop
#: must not make us buffer a fast link without bound).
MAX_PENDING_BATCHES = 512
#: Longest a close waits for queued frames (a CTRL_CLOSE, say) to leave, on top of airtime.
CLOSE_DRAIN = 0.5

#: This process's boot counter in the host role (LINK.md §6: random per process start).
HOST_BOOT_COUNTER = int.from_bytes(os.urandom(4), "little")

_ON = {"1", "on", "true", "yes"}
_OFF = {"0", "off", "false", "no"}


def _policy(name: str, value: str, url: str) -> LinePolicy:
    v = value.lower()
    if v == "keep":
        return "keep"
    if v in _ON:
        return "on"
    if v in _OFF:
        return "off"
    raise ConfigError(f"bad URL {url!r}: {name} must be keep, on or off, not {value!r}")


_PARITY = {
    "n": serial.PARITY_NONE, "none": serial.PARITY_NONE,
    "e": serial.PARITY_EVEN, "even": serial.PARITY_EVEN,
    "o": serial.PARITY_ODD, "odd": serial.PARITY_ODD,
    "m": serial.PARITY_MARK, "mark": serial.PARITY_MARK,
    "s": serial.PARITY_SPACE, "space": serial.PARITY_SPACE,
}
_STOPBITS = {"1": serial.STOPBITS_ONE, "1.5": serial.STOPBITS_ONE_POINT_FIVE,
             "2": serial.STOPBITS_TWO}


def _flag(name: str, value: str, url: str) -> bool:
    v = value.lower()
    if v in _ON or v in _OFF:
        return v in _ON
    raise ConfigError(f"bad URL {url!r}: {name} must be 0 or 1, not {value!r}")


def _line_options(params: dict[str, str], url: str) -> tuple[tuple[str, Any], ...]:
    """The pyserial line settings a URL gives (rtscts, xonxoff, parity, bytesize, stopbits);
    only those given, so that a handler that cannot change one is not asked to."""
    out: list[tuple[str, Any]] = []
    for name in ("rtscts", "xonxoff"):
        if name in params:
            out.append((name, _flag(name, params[name], url)))
    if "parity" in params:
        parity = _PARITY.get(params["parity"].lower())
        if parity is None:
            raise ConfigError(f"bad URL {url!r}: parity must be none, even, odd, mark or "
                              f"space (or N, E, O, M, S), not {params['parity']!r}")
        out.append(("parity", parity))
    if "bytesize" in params:
        out.append(("bytesize", _integer("bytesize", params["bytesize"], url, 5, 8)))
    if "stopbits" in params:
        stop = _STOPBITS.get(params["stopbits"])
        if stop is None:
            raise ConfigError(f"bad URL {url!r}: stopbits must be 1, 1.5 or 2, "
                              f"not {params['stopbits']!r}")
        out.append(("stopbits", stop))
    return tuple(out)


def _number(name: str, value: str, url: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"bad URL {url!r}: {name}={value!r} is not a number") from None
    if not lo <= x <= hi:
        raise ConfigError(f"bad URL {url!r}: {name} must be in {lo:g}..{hi:g}, not {value}")
    return x


def _integer(name: str, value: str, url: str, lo: int, hi: int) -> int:
    if not value.isascii() or not value.isdigit():
        raise ConfigError(f"bad URL {url!r}: {name}={value!r} is not a whole number")
    x = int(value)
    if not lo <= x <= hi:
        raise ConfigError(f"bad URL {url!r}: {name} must be in {lo}..{hi}, not {x}")
    return x


@dataclass(frozen=True)
class SerialSpec:
    """A checked serial URL: the device and every link parameter, with defaults applied.

    ``serial:///dev/ttyUSB0?baud=115200&node=0011223344556677&dtr=keep&rts=keep&hupcl=0
    &mtu=512&ping=2&queue=32768&role=host&hello=2&boot=N`` (every parameter optional), plus
    the line settings ``rtscts=0|1&xonxoff=0|1&parity=none|even|odd|mark|space&bytesize=5..8
    &stopbits=1|1.5|2`` (pyserial's defaults, 8N1 without flow control, when absent).
    """

    url: str
    #: A device path (``/dev/ttyUSB0``, ``COM3``) or a pyserial URL (``socket://h:p``).
    device: str
    #: Line speed; None for a pyserial URL without ``baud`` (a fast or unknown link).
    baud: int | None
    #: The node id (RID steering prefix) of the device on this port, for the gateway.
    node: bytes | None
    dtr: LinePolicy = "keep"
    rts: LinePolicy = "keep"
    hupcl: bool = False
    #: The MTU this side announces (payload bytes per frame).
    mtu: int = link.DEFAULT_MTU
    #: Seconds of silence before the host PINGs; 0 disables keepalive.
    ping: float = PING_IDLE
    queue: int = DEFAULT_QUEUE_BYTES
    role: Role = "host"
    #: Seconds ``open`` waits for the peer's HELLO (host role; a device does not wait).
    hello: float = HELLO_WAIT
    #: Boot counter announced in the device role (random per transport when None).
    boot: int | None = None
    #: Line settings given in the URL, as (pyserial attribute, value) pairs.
    line: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, url: str, *, role: Role = "host") -> SerialSpec:
        """Check ``url`` (see the class docstring); ``role`` is the default for ``role=``."""
        scheme, device, _port, params = parse_url(url)
        if scheme not in SERIAL_SCHEMES:
            raise ConfigError(f"bad URL {url!r}: not a serial URL (serial:///dev/ttyUSB0)")
        baud: int | None = DEFAULT_BAUD if scheme == "serial" else None
        if "baud" in params:
            baud = _integer("baud", params["baud"], url, 50, 20_000_000)
        node = None
        if "node" in params:
            try:
                node = bytes.fromhex(params["node"])
            except ValueError:
                node = b""
            if len(node) != 8:
                raise ConfigError(f"bad URL {url!r}: node must be 16 hex digits (8 bytes)")
        role_text = params.get("role", role)
        if role_text not in ("host", "device"):
            raise ConfigError(f"bad URL {url!r}: role must be host or device")
        chosen: Role = "host" if role_text == "host" else "device"
        hupcl = params.get("hupcl", "0").lower()
        if hupcl not in _ON | _OFF:
            raise ConfigError(f"bad URL {url!r}: hupcl must be 0 or 1")
        return cls(
            url=url,
            device=device,
            baud=baud,
            node=node,
            dtr=_policy("dtr", params.get("dtr", "keep"), url),
            rts=_policy("rts", params.get("rts", "keep"), url),
            hupcl=hupcl in _ON,
            mtu=_integer("mtu", params.get("mtu", str(link.DEFAULT_MTU)), url,
                         link.MIN_MTU, link.MAX_PAYLOAD),
            ping=_number("ping", params.get("ping", str(PING_IDLE)), url, 0, 3600),
            queue=_integer("queue", params.get("queue", str(DEFAULT_QUEUE_BYTES)), url,
                           1024, 16 << 20),
            role=chosen,
            # A device usually starts first and must not sit waiting for a host.
            hello=_number("hello", params.get("hello", str(HELLO_WAIT if chosen == "host"
                                                            else 0)), url, 0, 600),
            boot=(_integer("boot", params["boot"], url, 0, 0xFFFFFFFF)
                  if "boot" in params else None),
            line=_line_options(params, url),
        )

    def pyserial_options(self) -> dict[str, Any]:
        """The line settings for ``serial.serial_for_url`` (only those the URL gave)."""
        return dict(self.line)

    @property
    def is_device_path(self) -> bool:
        """True for a local device (``serial://``), False for a pyserial URL."""
        return "://" not in self.device


def airtime(nbytes: int, baud: int | None) -> float:
    """Seconds ``nbytes`` take on the line (8N1: 10 bit times a byte); 0 when unknown."""
    return nbytes * 10 / baud if baud else 0.0


class SerialTransport(Transport):
    """PALISADE datagrams over one serial port. Create it with :meth:`open`."""

    def __init__(self, spec: SerialSpec, *, name: str | None = None,
                 node_id: bytes | None = None) -> None:
        super().__init__()
        if node_id is not None and spec.node is not None and node_id != spec.node:
            raise ConfigError(f"bad URL {spec.url!r}: node={spec.node.hex()} differs from the "
                              f"node id {node_id.hex()} of this side")
        self.spec = spec
        #: The node id this side announces in its HELLO (device role; LINK.md §6.1).
        self.announce = (node_id if node_id is not None else spec.node) \
            if spec.role == "device" else None
        #: Called on the loop with every HELLO the peer sends (the gateway learns the node id
        #: there), after the link state has been updated.
        self.on_hello: Callable[[link.Hello], None] | None = None
        #: A short name for logs: the device path or URL.
        self.name = name or spec.device
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self.boot_counter = (
            HOST_BOOT_COUNTER if spec.role == "host"
            else spec.boot if spec.boot is not None
            else int.from_bytes(os.urandom(4), "little")
        )
        # Decoder sized for our own MTU: we announce it, so nothing longer is legitimate.
        self._decoder = link.FrameDecoder(spec.mtu)
        # -- shared with the threads (under _lock) --
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._port: Any = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        # Data frames waiting in the queue, for duplicate suppression (frame -> copies).
        self._queued_data: dict[bytes, int] = {}
        self._writing = False
        self._write_failed = False
        self._stop = False
        self._drain_until = 0.0
        self._pending_batches = 0
        self._opened_once = False
        self._first_open: asyncio.Future[BaseException | None] = self._loop.create_future()
        self._writer_done = threading.Event()
        # -- loop-side link state --
        self._up = False
        self._ready = False
        self._peer_hello: link.Hello | None = None
        self._peer_boot: int | None = None
        self._awaiting_hello = False
        self._hello_sent_at = -1.0
        self._hello_retry = HELLO_RETRY_FIRST
        self._hello_waiters: list[asyncio.Future[None]] = []
        self._last_rx = self._loop.time()
        self._ping_token = 0
        self._ping_outstanding: tuple[int, float, float] | None = None  # token, sent, deadline
        self._ping_misses = 0
        self._tick: asyncio.TimerHandle | None = None
        self._largest_promised = 0
        #: Round-trip time of the last answered PING, in seconds.
        self.rtt: float | None = None
        #: Why the first attempt to open the port failed (None: it opened).
        self.open_error: BaseException | None = None
        # Counters (see the counters property).
        self.frames_in = 0
        self.frames_out = 0
        #: PALISADE datagrams (channel 0) and their bytes, before framing.
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.datagram_bytes_in = 0
        self.datagram_bytes_out = 0
        self.wire_bytes_in = 0
        self.wire_bytes_out = 0
        self.dropped_queue_full = 0
        self.dropped_duplicate = 0
        self.dropped_not_ready = 0
        self.dropped_too_large = 0
        self.dropped_link_down = 0
        self.dropped_rx_backlog = 0
        self.unknown_channel = 0
        self.bad_control = 0
        self.log_frames = 0
        self.link_downs = 0
        self.reconnects = 0
        self.peer_resets = 0
        self.pings_sent = 0
        self.pongs_received = 0
        self.hellos_sent = 0
        self.hellos_received = 0
        self._threads: list[threading.Thread] = []

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str | SerialSpec,
        *,
        role: Role = "host",
        require: bool = True,
        hello_timeout: float | None = None,
        name: str | None = None,
        node_id: bytes | None = None,
    ) -> SerialTransport:
        """Open the port named by ``url`` and exchange HELLOs.

        ``role`` is the default for the URL's ``role=``. With ``require`` (the default) a port
        that cannot be opened raises :class:`OSError` (``serial.SerialException`` is one);
        without it the transport starts unplugged and keeps trying in the background (the
        gateway does this). ``open`` then waits up to ``hello_timeout`` seconds (the URL's
        ``hello=``: 2 s for a host, 0 for a device) for the peer's HELLO, so that the MTU is
        known before a session is configured; without an answer it returns anyway, and
        datagrams wait for the HELLO (LINK.md §6). Raises :class:`ConfigError` for a bad URL.
        In the device role the HELLO announces ``node_id`` (or the URL's ``node=``; the two
        must agree), so that a gateway routes to this side without being told.
        """
        spec = url if isinstance(url, SerialSpec) else SerialSpec.parse(url, role=role)
        self = cls(spec, name=name, node_id=node_id)
        self._start_threads()
        error = await asyncio.shield(self._first_open)
        self.open_error = error
        if error is not None and require:
            self.close()
            await self.wait_closed()
            if isinstance(error, OSError):
                raise error
            raise OSError(f"cannot open {spec.device}: {type(error).__name__}: {error}") from error
        wait = spec.hello if hello_timeout is None else hello_timeout
        if wait > 0 and error is None:
            await self.wait_ready(wait)
        return self

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` s) until the peer's HELLO arrived; True if it did."""
        if self._ready:
            return True
        fut: asyncio.Future[None] = self._loop.create_future()
        self._hello_waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        finally:
            if fut in self._hello_waiters:
                self._hello_waiters.remove(fut)
        return True

    def _start_threads(self) -> None:
        io = threading.Thread(target=self._run_io, name=f"serial-io {self.name}", daemon=True)
        wr = threading.Thread(target=self._run_writer, name=f"serial-tx {self.name}",
                              daemon=True)
        self._threads = [io, wr]
        io.start()
        wr.start()
        self._tick = self._loop.call_later(TICK, self._on_tick)

    # -- properties --------------------------------------------------------------------------------

    @property
    def max_datagram_size(self) -> int:
        """The link MTU: the smaller of both announcements, or ours before the peer's HELLO."""
        mtu = self.mtu
        self._largest_promised = max(self._largest_promised, mtu)
        return mtu

    @property
    def mtu(self) -> int:
        peer = self._peer_hello
        return self.spec.mtu if peer is None else link.negotiate_mtu(self.spec.mtu, peer.mtu)

    @property
    def link_bits_per_second(self) -> float | None:
        return float(self.spec.baud) if self.spec.baud else None

    @property
    def local_address(self) -> Addr:
        """``(device, 0)``: shaped like a UDP address so code that prints one keeps working."""
        return (self.spec.device, 0)

    @property
    def peer_address(self) -> Addr:
        """The address datagrams from the peer carry (and :meth:`send` accepts): the device."""
        return self.spec.device

    @property
    def node_id(self) -> bytes | None:
        """The node id pinned by the URL (``node=``), or None."""
        return self.spec.node

    @property
    def peer_node_id(self) -> bytes | None:
        """The node id the peer announced in its last HELLO (version 2), or None."""
        peer = self._peer_hello
        return None if peer is None else peer.node_id

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._up

    @property
    def ready(self) -> bool:
        """True once the peer's HELLO arrived on the open port (datagrams flow)."""
        return self._ready

    @property
    def peer_hello(self) -> link.Hello | None:
        return self._peer_hello

    @property
    def queued_bytes(self) -> int:
        """Encoded bytes waiting for the writer thread."""
        return self._queued

    @property
    def counters(self) -> dict[str, Any]:
        """Link statistics: frames, wire bytes, drops by reason, decoder errors, resets."""
        return {
            "connected": self._up,
            "ready": self._ready,
            "mtu": self.mtu,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
            "datagram_bytes_in": self.datagram_bytes_in,
            "datagram_bytes_out": self.datagram_bytes_out,
            "wire_bytes_in": self.wire_bytes_in,
            "wire_bytes_out": self.wire_bytes_out,
            "log_frames": self.log_frames,
            "hellos_sent": self.hellos_sent,
            "hellos_received": self.hellos_received,
            "pings_sent": self.pings_sent,
            "pongs_received": self.pongs_received,
            "rtt": self.rtt,
            "link_downs": self.link_downs,
            "reconnects": self.reconnects,
            "peer_resets": self.peer_resets,
            "drops": {k: v for k, v in (
                ("queue-full", self.dropped_queue_full),
                ("duplicate", self.dropped_duplicate),
                ("not-ready", self.dropped_not_ready),
                ("too-large", self.dropped_too_large),
                ("link-down", self.dropped_link_down),
                ("rx-backlog", self.dropped_rx_backlog),
                ("unknown-channel", self.unknown_channel),
                ("bad-control", self.bad_control),
            ) if v},
            "decoder": self._decoder.counters(),
        }

    # -- sending -----------------------------------------------------------------------------------

    def send(self, data: bytes, addr: Addr) -> None:
        """Queue one datagram for the port (``addr`` is ignored: a serial link has one peer).

        Drops, and counts, a datagram that arrives before the peer's HELLO, one larger than
        the link MTU, or one that finds the write queue full.
        """
        if self._closing:
            return
        if not self._ready:
            self.dropped_not_ready += 1
            return
        if len(data) > self.mtu:
            self.dropped_too_large += 1
            return
        if self._enqueue(link.encode_frame(link.CHANNEL_DATA, data), counted=True):
            self.datagrams_out += 1
            self.datagram_bytes_out += len(data)

    def _forget(self, frame: bytes) -> None:
        """Take a data frame that left the queue out of the duplicate index (lock held)."""
        left = self._queued_data.get(frame)
        if left is not None:
            if left <= 1:
                del self._queued_data[frame]
            else:
                self._queued_data[frame] = left - 1

    def send_log(self, text: str) -> None:
        """Send one line of log text on channel 1 (what a device does; the demo uses it)."""
        payload = text.encode("utf-8", "replace")[: self.mtu if self._ready else PRE_HELLO_MAX]
        self._enqueue(link.encode_frame(link.CHANNEL_LOG, payload), counted=False)

    def _send_control(self, payload: bytes) -> None:
        self._enqueue(link.encode_frame(link.CHANNEL_CONTROL, payload), counted=False)

    def _enqueue(self, frame: bytes, *, counted: bool) -> bool:
        """Queue one encoded frame; False if it was dropped (``counted``: count the drop)."""
        with self._lock:
            if self._port is None or self._stop:
                if counted:
                    self.dropped_link_down += 1
                return False
            if counted and frame in self._queued_data:
                self.dropped_duplicate += 1
                return False
            if self._queued + len(frame) > self.spec.queue:
                if counted:
                    self.dropped_queue_full += 1
                return False
            self._queue.append(frame)
            self._queued += len(frame)
            if counted:
                self._queued_data[frame] = self._queued_data.get(frame, 0) + 1
            self._wake.notify()
            return True

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: queued frames get a bounded time to leave, then the port closes."""
        if self._closing:
            return
        self._closing = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for fut in self._hello_waiters:
            if not fut.done():
                fut.set_result(None)
        with self._lock:
            self._drain_until = (time.monotonic() + CLOSE_DRAIN
                                 + airtime(self._queued, self.spec.baud))
            self._stop = True
            self._wake.notify_all()
        if not self._threads:
            self._set_closed()

    def _set_closed(self) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    # -- threads -----------------------------------------------------------------------------------

    def _call_loop(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self._loop.call_soon_threadsafe(fn, *args)

    def _open_port(self) -> Any:
        spec = self.spec
        kwargs: dict[str, Any] = {"timeout": READ_TIMEOUT, "do_not_open": True,
                                  **spec.pyserial_options()}
        if spec.baud:
            kwargs["baudrate"] = spec.baud
        if spec.is_device_path and os.name == "posix":
            # Two programs reading one port would each get half of every frame.
            kwargs["exclusive"] = True
        port = serial.serial_for_url(spec.device, **kwargs)
        # Bounded writes: a port that stops draining (flow control, a hung adapter) must not
        # hold the writer thread forever. pyserial's RFC 2217 client cannot do it (its open
        # fails with NotImplementedError): there the TCP connection bounds a stuck write.
        if not isinstance(port, serial.rfc2217.Serial):
            port.write_timeout = max(2.0, 4 * airtime(WRITE_BATCH, spec.baud))
        for line, policy in (("dtr", spec.dtr), ("rts", spec.rts)):
            if policy == "keep":
                # pyserial drives both lines when it opens the port; skip that so a board
                # that resets on a DTR edge is left alone.
                setattr(port, f"_update_{line}_state", lambda: None)
            else:
                setattr(port, line, policy == "on")
        port.open()
        if spec.is_device_path:
            # Only a local tty has HUPCL; a network port's fileno() is a socket.
            self._set_hupcl(port)
        return port

    def _set_hupcl(self, port: Any) -> None:
        try:
            import termios
        except ImportError:
            return  # not POSIX: there is no HUPCL to set
        try:
            fd = port.fileno()
            attrs = termios.tcgetattr(fd)
            if self.spec.hupcl:
                attrs[2] |= termios.HUPCL
            else:
                attrs[2] &= ~termios.HUPCL
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (AttributeError, OSError, ValueError, TypeError, termios.error,
                serial.SerialException):
            pass  # not a tty after all: there is no HUPCL to set

    def _run_io(self) -> None:
        """I/O thread: open (and re-open) the port, read, decode, hand frames to the loop."""
        delay = RECONNECT_INITIAL
        while not self._stop:
            try:
                port = self._open_port()
            except Exception as exc:
                # Every failure, not only the expected ones: a handler that cannot do what we
                # ask must fail open() at once, never end this thread and leave connect()
                # waiting forever.
                if not self._opened_once:
                    self._call_loop(self._report_first_open, exc)
                    if self._stop:
                        break
                log.debug("%s: cannot open (%s); retrying in %.1f s", self.name, exc, delay)
                with self._lock:
                    self._wake.wait_for(lambda: self._stop, timeout=delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_INITIAL
            self._decoder.reset()
            with self._lock:
                self._port = port
                self._write_failed = False
                # A lone delimiter first: whatever unframed bytes the peer saw before (a
                # half frame from before an unplug) end here instead of spoiling our HELLO.
                self._queue.clear()
                self._queued_data.clear()
                self._queue.append(b"\x00")
                self._queued = 1
                self._wake.notify_all()
            reopened = self._opened_once
            self._opened_once = True
            self._call_loop(self._on_port_up, reopened)
            error = self._read_loop(port)
            with self._lock:
                self._port = None
                dropped = sum(self._queued_data.values())
                self._queue.clear()
                self._queued_data.clear()
                self._queued = 0
                # Wait for a write in progress to give the port back before closing it.
                self._wake.wait_for(lambda: not self._writing, timeout=2.0)
            with contextlib.suppress(Exception):
                port.close()
            if error is not None:
                self._call_loop(self._on_port_down, str(error), dropped)
        self._writer_done.wait(timeout=5.0)
        self._call_loop(self._set_closed)

    def _read_loop(self, port: Any) -> BaseException | None:
        """Read until the port fails (returns the error) or the transport stops (None)."""
        decoder = self._decoder
        while True:
            # Closing: keep the port until the writer has flushed what it could.
            if self._stop and self._writer_done.is_set():
                return None
            if self._write_failed:
                return OSError("write failed")
            try:
                data = port.read(port.in_waiting or 1)
            except Exception as exc:  # any failure of the port ends this session of it
                return exc
            if not data:
                continue
            self.wire_bytes_in += len(data)
            frames = decoder.feed(data)
            if not frames:
                continue
            batch: list[tuple[int, bytes]] = []
            for channel, payload in frames:
                if channel == link.CHANNEL_LOG:
                    self.log_frames += 1
                    self._log_device_text(payload)
                else:
                    batch.append((channel, payload))
            if not batch:
                continue
            with self._lock:
                if self._pending_batches >= MAX_PENDING_BATCHES:
                    self.dropped_rx_backlog += len(batch)
                    continue
                self._pending_batches += 1
            self._call_loop(self._on_frames, batch)

    def _log_device_text(self, payload: bytes) -> None:
        text = payload.decode("utf-8", "replace").rstrip("\r\n")
        # Device text is untrusted: escape control characters so it stays on one log line.
        text = printable(text)
        device_log.info("%s: %s", self.name, text)

    def _run_writer(self) -> None:
        """Writer thread: move queued frames to the port, whole frames per write."""
        try:
            while True:
                with self._lock:
                    while not self._queue or self._port is None or self._write_failed:
                        if self._stop:
                            return
                        self._wake.wait()
                    if self._stop and time.monotonic() > self._drain_until:
                        return
                    port = self._port
                    parts = [self._queue.popleft()]
                    size = len(parts[0])
                    while self._queue and size + len(self._queue[0]) <= WRITE_BATCH:
                        frame = self._queue.popleft()
                        parts.append(frame)
                        size += len(frame)
                    self._queued -= size
                    if self._queued_data:
                        for frame in parts:
                            self._forget(frame)
                    self._writing = True
                try:
                    port.write(b"".join(parts) if len(parts) > 1 else parts[0])
                    self.wire_bytes_out += size
                    self.frames_out += len(parts)
                except serial.SerialTimeoutException:
                    log.debug("%s: write timed out; %d bytes dropped", self.name, size)
                except (OSError, serial.SerialException) as exc:
                    log.debug("%s: write failed: %s", self.name, exc)
                    with self._lock:
                        self._write_failed = True
                    with contextlib.suppress(Exception):
                        port.cancel_read()
                finally:
                    with self._lock:
                        self._writing = False
                        self._wake.notify_all()
        finally:
            self._writer_done.set()
            with self._lock:
                port = self._port
            if port is not None:
                # Wake a read blocked on the port so the I/O thread sees the close at once.
                with contextlib.suppress(Exception):
                    port.cancel_read()

    # -- loop side: link state -------------------------------------------------------------------

    def _report_first_open(self, error: BaseException) -> None:
        if not self._first_open.done():
            self._first_open.set_result(error)

    def _on_port_up(self, reopened: bool) -> None:
        if not self._first_open.done():
            self._first_open.set_result(None)
        if self._closing:
            return
        self._up = True
        self._ready = False
        self._last_rx = self._loop.time()
        self._ping_outstanding = None
        self._ping_misses = 0
        if reopened:
            self.reconnects += 1
            log.warning("%s: port is back; exchanging HELLO", self.name)
        # Both roles announce themselves on opening (a device: once per boot; a re-opened
        # port is as good as a boot for a peer that may have missed it).
        self._send_hello(asked=self.spec.role == "host")

    def _on_port_down(self, reason: str, dropped: int) -> None:
        self.dropped_link_down += dropped
        if self._closing:
            return
        self.link_downs += 1
        self._up = False
        self._ready = False
        self._awaiting_hello = False
        log.warning("%s: port lost (%s); reconnecting", self.name, reason)

    def _send_hello(self, *, asked: bool) -> None:
        """Send our HELLO; ``asked`` marks it as a question (host role) awaiting an answer."""
        self._send_control(link.encode_hello(link.LINK_VERSION, self.spec.mtu,
                                             self.boot_counter, self.announce))
        self.hellos_sent += 1
        now = self._loop.time()
        self._hello_sent_at = now
        if asked:
            if not self._awaiting_hello:
                self._hello_retry = HELLO_RETRY_FIRST
            self._awaiting_hello = True

    def _on_frames(self, batch: list[tuple[int, bytes]]) -> None:
        with self._lock:
            self._pending_batches -= 1
        if self._closing:
            return
        self._last_rx = self._loop.time()
        self._ping_misses = 0
        for channel, payload in batch:
            self.frames_in += 1
            if channel == link.CHANNEL_DATA:
                self.datagrams_in += 1
                self.datagram_bytes_in += len(payload)
                self.deliver(payload, self.spec.device)
            elif channel == link.CHANNEL_CONTROL:
                self._on_control(payload)
            else:
                self.unknown_channel += 1  # reserved channels are dropped (LINK.md §4)

    def _on_control(self, payload: bytes) -> None:
        try:
            kind = link.control_type(payload)
            if kind == link.CTL_HELLO:
                self._on_hello(link.parse_hello(payload))
            elif kind == link.CTL_PING:
                self._send_control(link.encode_pong(link.parse_token(payload)))
            elif kind == link.CTL_PONG:
                self._on_pong(link.parse_token(payload))
            else:
                self.bad_control += 1
        except DecodeError:
            self.bad_control += 1

    def _on_hello(self, hello: link.Hello) -> None:
        self.hellos_received += 1
        if self.spec.role == "device":
            self._send_hello(asked=False)  # a device answers every HELLO
        elif self._awaiting_hello:
            self._awaiting_hello = False  # the answer to ours
        else:
            self._send_hello(asked=True)  # unasked: the device (re)started, or sent one first
        previous = self._peer_boot
        self._peer_boot = hello.boot_counter
        self._peer_hello = hello
        was_ready = self._ready
        self._ready = True
        mtu = self.mtu
        if previous is not None and previous != hello.boot_counter:
            self.peer_resets += 1
            who = "device" if self.spec.role == "host" else "host"
            reason = (f"serial link reset: the {who} on {self.name} restarted "
                      f"(boot counter {previous:#x} -> {hello.boot_counter:#x})")
            log.warning("%s", reason)
            self.reset(reason)
        elif mtu < self._largest_promised:
            # Sessions were configured for larger datagrams than the link now carries.
            reason = (f"serial link reset: MTU on {self.name} fell to {mtu} "
                      f"(sessions use {self._largest_promised})")
            log.warning("%s", reason)
            self.reset(reason)
        if not was_ready:
            log.info("%s: link up (version %d, MTU %d, peer boot %#x)", self.name,
                     min(hello.version, link.LINK_VERSION), mtu, hello.boot_counter)
            if mtu < MIN_DATAGRAM_SIZE:
                log.error("%s: link MTU %d is below %d; PALISADE cannot run on it",
                          self.name, mtu, MIN_DATAGRAM_SIZE)
        for fut in self._hello_waiters:
            if not fut.done():
                fut.set_result(None)
        if self.on_hello is not None:
            self.on_hello(hello)

    def _on_pong(self, token: int) -> None:
        out = self._ping_outstanding
        if out is None or out[0] != token:
            return  # matches nothing outstanding (LINK.md §6)
        self.pongs_received += 1
        self.rtt = self._loop.time() - out[1]
        self._ping_outstanding = None

    def _on_tick(self) -> None:
        """Housekeeping on the loop: HELLO resends and the host's keepalive."""
        self._tick = self._loop.call_later(TICK, self._on_tick)
        if not self._up or self.spec.role != "host":
            return
        now = self._loop.time()
        if self._awaiting_hello:
            if now - self._hello_sent_at >= self._hello_retry:
                self._send_hello(asked=True)
                self._hello_retry = HELLO_RETRY
            return
        if not self._ready or self.spec.ping <= 0:
            return
        out = self._ping_outstanding
        if out is not None:
            if now < out[2]:
                return
            self._ping_outstanding = None
            self._ping_misses += 1
            if self._ping_misses >= PING_MISSES:
                # Silent: report it, keep the session (the tunnel has its own timeouts) and
                # ask again; the answer's boot counter says whether the session survived.
                log.warning("%s: no answer to %d PINGs; link silent, sending HELLO",
                            self.name, self._ping_misses)
                self.link_downs += 1
                self._ready = False
                self._ping_misses = 0
                self._send_hello(asked=True)
                return
        if now - self._last_rx >= self.spec.ping and self._ping_outstanding is None:
            self._ping_token = (self._ping_token + 1) & 0xFFFFFFFF
            # A PONG may queue behind a full frame each way (LINK.md §6).
            wait = 1.0 + 2 * airtime(link.encoded_max(self.mtu), self.spec.baud)
            self._ping_outstanding = (self._ping_token, now, now + wait)
            self._send_control(link.encode_ping(self._ping_token))
            self.pings_sent += 1

    def __repr__(self) -> str:
        state = "ready" if self._ready else "up" if self._up else "down"
        return (f"SerialTransport({self.spec.device!r}, baud={self.spec.baud}, "
                f"role={self.spec.role}, {state}, mtu={self.mtu})")
