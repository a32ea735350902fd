"""The datagram transport interface shared by UDP and serial links, and URL parsing.

A transport moves whole datagrams; it knows nothing about PALISADE. The asyncio shell
(:mod:`palisade_c.aio`) sets :attr:`Transport.on_datagram` and calls :meth:`Transport.send`;
the sans-IO core never sees a transport at all. Keeping the interface this small is what lets
a serial link (framed bytes on a UART) stand in for UDP without the shell changing: the shell
only needs ``send``, a receive callback, the link's MTU and, for slow links, its speed (the
core scales its handshake timers from it).

Addresses are opaque to everything above the transport: ``(host, port)`` or an IPv6 4-tuple for
UDP, a device path for serial. The core stores them and hands them back to :meth:`send`.

URLs name an endpoint: ``udp://HOST:PORT`` where HOST is an IPv4 literal, an IPv6 literal in
brackets (``udp://[::1]:4433``) or a DNS name; a query string carries transport parameters
(``udp://0.0.0.0:4433?x=y``). :func:`parse_url` checks all of it up front so that a typo is a
clear :class:`~palisade_c.errors.ConfigError` and not a confusing socket error later.

Serial links (:mod:`palisade_c.transport.serial`) are named ``serial:///dev/ttyUSB0?baud=115200``
(``serial://COM3`` on Windows), or by one of pyserial's own URL forms (``loop://``,
``socket://HOST:PORT``, ``rfc2217://HOST:PORT``, ``spy://...``, ``hwgrep://...``), which are handed
to ``serial.serial_for_url``. For those :func:`parse_url` returns the device (the path, or the
pyserial URL without our parameters) as ``host`` and 0 as ``port``; the link parameters
(:data:`SERIAL_PARAMS`, line settings such as ``parity=even`` included) are checked by the
serial transport itself, and a pyserial URL may carry only its handler's own parameters
(:data:`PYSERIAL_URL_PARAMS`) besides ours: anything else is a :class:`ConfigError` here.
"""

from __future__ import annotations

import abc
import copy
import ipaddress
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit

from palisade_c.errors import ConfigError
from palisade_c.hsrecord import HS_RECORD_OVERHEAD
from palisade_c.shaping import check_link_share

if TYPE_CHECKING:
    import asyncio

    from palisade_c.config import Config

__all__ = [
    "MAX_DATAGRAM_SIZE",
    "MIN_DATAGRAM_SIZE",
    "PYSERIAL_URL_PARAMS",
    "SCHEMES",
    "SERIAL_PARAMS",
    "SERIAL_SCHEMES",
    "Addr",
    "DatagramHandler",
    "ParsedUrl",
    "ResetHandler",
    "Transport",
    "estimate_handshake_bytes",
    "link_config",
    "parse_url",
    "tune_for_link",
]

#: A transport address; opaque above the transport (see the module docstring).
Addr = Any
#: Receives one datagram and the address it came from.
DatagramHandler = Callable[[bytes, Addr], None]
#: Told (with a reason) that the link lost the peer's session state; see Transport.on_reset.
ResetHandler = Callable[[str], None]

#: Schemes served by the serial transport: ``serial`` names a local device; the others are
#: pyserial's URL handlers, passed through to ``serial.serial_for_url``.
SERIAL_SCHEMES = frozenset({"serial", "loop", "socket", "rfc2217", "spy", "hwgrep"})
#: Schemes :func:`parse_url` accepts. A new transport adds its scheme here.
SCHEMES = frozenset({"udp"}) | SERIAL_SCHEMES
#: Query parameters of serial URLs that belong to the serial transport (the rest of a pyserial
#: URL's query is pyserial's own and stays in the device URL).
SERIAL_PARAMS = frozenset(
    {"baud", "node", "dtr", "rts", "hupcl", "mtu", "ping", "queue", "role", "hello", "boot",
     "rtscts", "xonxoff", "parity", "bytesize", "stopbits"}
)
#: Query parameters pyserial's own URL handlers take (pyserial 3.5), which stay in the device
#: URL. Anything else is refused here: pyserial's own message for an unknown one names the
#: wrong thing, or nothing at all.
PYSERIAL_URL_PARAMS: dict[str, frozenset[str]] = {
    "loop": frozenset({"logging"}),
    "socket": frozenset({"logging"}),
    "rfc2217": frozenset({"logging", "ign_set_control", "poll_modem", "timeout"}),
    "spy": frozenset({"file", "color", "raw", "all"}),
    "hwgrep": frozenset({"n", "skip_busy"}),
}
#: Smallest and largest datagram sizes PALISADE runs on (Config refuses others).
MIN_DATAGRAM_SIZE = 256
MAX_DATAGRAM_SIZE = 65535

# Handshake message sizes (bytes before fragmentation) with the profile's algorithms,
# ML-KEM-768 and ML-DSA-65, as measured on this implementation: CH, SH, CF, and the record
# header every fragment carries. Used only for estimates (progress, link timers).
_HS_MESSAGES = (3191, 7584, 4403)
_HS_ACK = 50

# One DNS label: letters, digits, hyphens inside, underscores tolerated (some internal names
# use them); at most 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# ASCII digits only: str.isdigit() also accepts characters such as "²" that int() refuses.
_DIGITS = re.compile(r"[0-9]+")


class ParsedUrl(NamedTuple):
    """A checked endpoint URL; unpacks as ``scheme, host, port, params``."""

    scheme: str
    host: str
    port: int
    params: dict[str, str]


def _check_host(host: str, url: str) -> str:
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"bad URL {url!r}: unterminated IPv6 bracket")
        literal = host[1:-1]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ConfigError(f"bad URL {url!r}: {literal!r} is not an IPv6 address") from None
        return literal
    if ":" in host:
        raise ConfigError(f"bad URL {url!r}: put an IPv6 address in brackets, e.g. [::1]")
    if not host:
        raise ConfigError(f"bad URL {url!r}: no host (use 0.0.0.0 to listen on every address)")
    labels = host.rstrip(".").split(".")
    if all(_DIGITS.fullmatch(label) for label in labels):
        # Looks like an IPv4 literal, so it must be a valid one ("300.1.1.1" is a typo, not a
        # name to resolve).
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"bad URL {url!r}: {host!r} is not an IPv4 address") from None
        return host
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"bad URL {url!r}: {host!r} is not a valid host name")
    return host


def _parse_query(query: str, url: str) -> dict[str, str]:
    try:
        return dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise ConfigError(f"bad URL {url!r}: malformed query string") from None


def _parse_serial_url(scheme: str, url: str) -> ParsedUrl:
    """``(scheme, device, 0, params)`` for the serial family (see the module docstring)."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"bad URL {url!r}: {exc}") from None
    if parts.fragment:
        raise ConfigError(f"bad URL {url!r}: unexpected fragment")
    query = _parse_query(parts.query, url) if parts.query else {}
    ours = {k: v for k, v in query.items() if k in SERIAL_PARAMS}
    if scheme == "serial":
        unknown = sorted(set(query) - SERIAL_PARAMS)
        if unknown:
            known = ", ".join(sorted(SERIAL_PARAMS))
            raise ConfigError(f"bad URL {url!r}: unknown parameter {unknown[0]!r} "
                              f"(serial URLs take: {known})")
        if parts.netloc and parts.path:
            raise ConfigError(f"bad URL {url!r}: a serial URL names a local device, e.g. "
                              "serial:///dev/ttyUSB0 (three slashes) or serial://COM3")
        device = parts.netloc or parts.path
        if not device or device == "/":
            raise ConfigError(f"bad URL {url!r}: no device (e.g. serial:///dev/ttyUSB0)")
        return ParsedUrl(scheme, device, 0, ours)
    # A pyserial URL: keep its own query parameters for pyserial, take ours out.
    rest = [(k, v) for k, v in query.items() if k not in SERIAL_PARAMS]
    theirs = PYSERIAL_URL_PARAMS.get(scheme, frozenset())
    unknown = sorted(k for k, _v in rest if k not in theirs)
    if unknown:
        known = ", ".join(sorted(SERIAL_PARAMS | theirs))
        raise ConfigError(f"bad URL {url!r}: unknown parameter {unknown[0]!r} "
                          f"({scheme}:// URLs take: {known})")
    device = f"{scheme}://{parts.netloc}{parts.path}"
    if rest:
        device += "?" + urlencode(rest)
    return ParsedUrl(scheme, device, 0, ours)


def parse_url(url: str) -> ParsedUrl:
    """Split and check an endpoint URL such as ``udp://127.0.0.1:4433``.

    Returns ``(scheme, host, port, params)``: the host without IPv6 brackets, the port as an
    int (0 is allowed: it asks the OS for a free port when binding), and the query string as
    a dict. Serial URLs return the device as ``host`` and 0 as ``port`` (module docstring).
    Raises :class:`ConfigError` naming what is wrong.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"bad URL {url!r}: expected SCHEME://HOST:PORT, e.g. udp://[::1]:4433")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unterminated "[" around an IPv6 address
        raise ConfigError(f"bad URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        supported = ", ".join(sorted(SCHEMES))
        raise ConfigError(
            f"bad URL {url!r}: unsupported scheme {scheme!r} (supported: {supported})"
        )
    if scheme in SERIAL_SCHEMES:
        return _parse_serial_url(scheme, url)
    if "@" in parts.netloc:
        raise ConfigError(f"bad URL {url!r}: user information is not allowed")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"bad URL {url!r}: unexpected path or fragment")
    # Split host and port ourselves: urlsplit accepts an unbracketed IPv6 address and then
    # fails obscurely, and its .port reports errors without naming the URL.
    netloc = parts.netloc
    if netloc.startswith("["):
        end = netloc.find("]")
        host_part, rest = netloc[: end + 1], netloc[end + 1 :]
        sep, port_text = rest[:1], rest[1:]
    else:
        if netloc.count(":") > 1:
            raise ConfigError(f"bad URL {url!r}: put an IPv6 address in brackets, e.g. [::1]")
        host_part, sep, port_text = netloc.partition(":")
    if sep != ":":
        raise ConfigError(f"bad URL {url!r}: no port (expected {scheme}://HOST:PORT)")
    if not _DIGITS.fullmatch(port_text) or len(port_text) > 5 or int(port_text) > 65535:
        raise ConfigError(f"bad URL {url!r}: port {port_text!r} is not a number in 0..65535")
    host = _check_host(host_part, url)
    params = _parse_query(parts.query, url)
    return ParsedUrl(scheme, host, int(port_text), params)


class Transport(abc.ABC):
    """A datagram link. Subclasses implement :meth:`send`, :meth:`close` and the properties.

    Received datagrams go to :attr:`on_datagram` (set by the owner before any can arrive;
    datagrams arriving while it is ``None`` are dropped, as a network would). Every method is
    called on the event loop thread and must return without blocking: ``send`` either hands
    the datagram to the OS at once or buffers it a bounded amount, and otherwise drops it,
    because a datagram protocol recovers from loss but not from a stalled event loop.
    """

    def __init__(self) -> None:
        self.on_datagram: DatagramHandler | None = None
        #: Called on the event loop when the link learns that the peer lost its session
        #: state (a serial device rebooted): sessions over this link cannot continue and
        #: should handshake again. UDP never calls it.
        self.on_reset: ResetHandler | None = None
        self._closing = False
        #: Resolved once the link is released; subclasses create it on the running loop.
        self._closed: asyncio.Future[None] | None = None

    @property
    @abc.abstractmethod
    def max_datagram_size(self) -> int:
        """The largest datagram the link carries (the core is configured with it)."""

    @property
    def link_bits_per_second(self) -> float | None:
        """Link speed for slow links (serial); ``None`` where it does not matter (UDP)."""
        return None

    @property
    @abc.abstractmethod
    def local_address(self) -> Addr:
        """This end's address (for UDP, the bound ``(host, port)``)."""

    @abc.abstractmethod
    def send(self, data: bytes, addr: Addr) -> None:
        """Send one datagram to ``addr`` now, without blocking. Never raises for I/O errors."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving and release the link (pending sends are flushed best-effort)."""

    @property
    def is_closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    async def wait_closed(self) -> None:
        """Wait until the link is released after :meth:`close`."""
        if self._closed is not None:
            import asyncio  # here: importing palisade_c must not load asyncio

            await asyncio.shield(self._closed)

    def deliver(self, data: bytes, addr: Addr) -> None:
        """Hand one received datagram to :attr:`on_datagram` (called by subclasses)."""
        handler = self.on_datagram
        if handler is not None:
            handler(data, addr)

    def reset(self, reason: str) -> None:
        """Report a peer reset to :attr:`on_reset` (called by subclasses)."""
        handler = self.on_reset
        if handler is not None:
            handler(reason)


def estimate_handshake_bytes(max_datagram_size: int) -> int:
    """Roughly how many bytes a full handshake puts on the wire, both directions together,
    when its messages are fragmented to ``max_datagram_size`` (no loss, no resends)."""
    room = max(max_datagram_size - HS_RECORD_OVERHEAD, 1)
    total = _HS_ACK
    for size in _HS_MESSAGES:
        total += size + HS_RECORD_OVERHEAD * -(-size // room)
    return total


def tune_for_link(
    config: Config, max_datagram_size: int, bits_per_second: float | None
) -> Config:
    """``config`` for a path whose narrowest hop carries ``max_datagram_size`` bytes at
    ``bits_per_second`` (None: a fast link, and only the size changes).

    The core does the rest: handshake messages are fragmented to the datagram size, each
    flight's first retransmission waits at least twice the airtime of the flight and of the
    reply it expects, and the handshake timeout grows by twice a handshake's airtime.

    Returns ``config`` itself when nothing changes, otherwise a shallow copy: a copy, not
    :func:`dataclasses.replace`, because replace would rebuild the trust store from
    ``trusted_peers``, re-reading key files and finding a one-shot iterable already used up.
    Raises :class:`ConfigError` when the size is not one PALISADE runs on.
    """
    if not MIN_DATAGRAM_SIZE <= max_datagram_size <= MAX_DATAGRAM_SIZE:
        raise ConfigError(
            f"link MTU {max_datagram_size} is outside {MIN_DATAGRAM_SIZE}..65535, the "
            "datagram sizes PALISADE runs on (announce a larger MTU on the device)"
        )
    changes: dict[str, float | int | None] = {
        "max_datagram_size": max_datagram_size,
        "link_bits_per_second": bits_per_second,
    }
    if all(getattr(config, k) == v for k, v in changes.items()):
        return config
    adjusted = copy.copy(config)
    for name, value in changes.items():
        setattr(adjusted, name, value)
    # A constant rate must leave the link room for everything else (docs/protocol.md §17.5).
    problem = check_link_share(adjusted.shaping, bits_per_second, adjusted.shaping_link_share)
    if problem is not None:
        raise ConfigError(problem)
    return adjusted


def link_config(config: Config, transport: Transport) -> Config:
    """``config`` tuned (:func:`tune_for_link`) for a session over ``transport``: its
    datagram size and, when it has one, its speed."""
    speed = transport.link_bits_per_second
    if speed is None:
        speed = config.link_bits_per_second
    return tune_for_link(config, transport.max_datagram_size, speed)
