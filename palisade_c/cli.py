"""The ``palisade`` command: keys, an echo server, tunnels, the serial gateway and the demo.

::

    palisade keygen -o server.key                      # server.key (0600) + server.key.pub
    palisade serve udp://0.0.0.0:4433 --key server.key --trust client.key.pub --echo
    palisade connect udp://127.0.0.1:4433 --key client.key --trust server.key.pub < lines.txt

    # serial devices: serve on the device side, connect directly or through a gateway
    palisade serve serial:///dev/ttyGS0 --key dev.key --trust client.key.pub --echo \
        --node-id 0011223344556677
    palisade connect serial:///dev/ttyUSB0?baud=115200 --key client.key --trust dev.key.pub
    palisade gateway --listen udp://0.0.0.0:4433 --serial 'serial:///dev/ttyUSB0?baud=115200'
    palisade connect udp://gateway:4433 --node-id 0011223344556677 \
        --key client.key --trust dev.key.pub
    palisade demo                                      # all of it on a virtual serial line

Output contract (scripts and tests rely on it):

* ``keygen`` prints the new key's fingerprint, and nothing else, on stdout.
* ``serve`` prints one ``palisade: listening on URL ...`` line on stderr once it is bound
  (for a serial URL, once the port is open).
* ``gateway`` prints one ``palisade: gateway listening on udp://HOST:PORT ...`` line on stderr.
* ``connect`` prints each reply as one line on stdout, in arrival order. On a slow link (or a
  terminal, or with ``-v``) it reports handshake progress on stderr, lines starting with
  ``palisade: handshake``.
* ``demo`` prints its summary on stdout, lines starting with ``palisade demo:``.
* Every failure is ONE line on stderr starting with ``palisade:``; text that came from the
  peer is escaped so that it cannot add lines or terminal control sequences.

Exit codes (docs/cli.md lists them too): 0 success; 1 a runtime or configuration error;
2 a usage error (bad flags, config file or environment value); 3 the handshake was refused
(an error code from the peer or a key that is not pinned); 4 timed out (no handshake answer);
5 data not delivered (replies still missing when ``connect`` gives up waiting, lines too
long for one datagram of the path, each reported and skipped, or data lost to a device
reboot); 130 interrupted (SIGINT); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from palisade_c import __version__
from palisade_c.aio import HandshakeTimeoutError, Tunnel, connect, describe_stall, serve
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.errors import (
    BackPressureError,
    ConfigError,
    ConnectionClosedError,
    ErrorCode,
    HandshakeError,
    PacketTooLargeError,
    code_name,
)
from palisade_c.eventlog import JsonLinesLog
from palisade_c.events import ConnectionClosed, DataReceived
from palisade_c.forward import (
    DEFAULT_FLOW_IDLE,
    ListenForwarder,
    ServiceForwarder,
    parse_udp_target,
)
from palisade_c.identity import Identity
from palisade_c.logsetup import DROP_INTERVAL, DropReporter, setup_logging, watch_gateway
from palisade_c.logsetup import LEVELS as LOG_LEVELS
from palisade_c.progress import HandshakeProgress, should_show
from palisade_c.ridlayout import MAX_WORKERS, RidLayout
from palisade_c.safetext import printable
from palisade_c.settings import apply_sources
from palisade_c.settings import finish as finish_sources
from palisade_c.shaping import Shaping
from palisade_c.ticketkeys import FileTicketKeyRing
from palisade_c.tickets import ClientTicketCache, SqliteTicketStore, TicketService, TicketStore
from palisade_c.transport.base import (
    MAX_DATAGRAM_SIZE,
    MIN_DATAGRAM_SIZE,
    SERIAL_SCHEMES,
    parse_url,
    tune_for_link,
)
from palisade_c.trustdir import TrustReloader, read_trust_source
from palisade_c.wire import PLUS_SHAPING

__all__ = [
    "EXIT_ERROR",
    "EXIT_HANDSHAKE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_TIMEOUT",
    "EXIT_UNDELIVERED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

log = logging.getLogger("palisade_c.cli")
#: Session opened/closed lines (rate-limited by palisade_c.logsetup).
session_log = logging.getLogger("palisade_c.sessions")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2  # what argparse exits with
EXIT_HANDSHAKE = 3
EXIT_TIMEOUT = 4
EXIT_UNDELIVERED = 5
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports it

#: Lines read ahead from stdin before the reader thread waits for the tunnel to catch up.
STDIN_READ_AHEAD = 256
#: Handshakes ``connect`` attempts after a serial device rebooted under the tunnel.
RECONNECT_ATTEMPTS = 3


def _printable(text: str) -> str:
    """``text`` with control characters escaped: peer-chosen text must stay on one line."""
    return printable(text)


def _error(message: str) -> None:
    print(f"palisade: {_printable(message)}", file=sys.stderr, flush=True)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- argument parsing ---------------------------------------------------------------------------


def _node_id(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex") from None
    if len(value) != 8:
        raise argparse.ArgumentTypeError(
            f"node id must be 8 bytes (16 hex digits), not {len(value)}"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _datagram_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not MIN_DATAGRAM_SIZE <= value <= MAX_DATAGRAM_SIZE:
        raise argparse.ArgumentTypeError(f"must be {MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE} bytes")
    return value


def _bits_per_second(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 50 <= value <= 1e11:
        raise argparse.ArgumentTypeError("must be a line speed in bit/s, e.g. 115200")
    return value


def _baud(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 300 <= value <= 20_000_000:
        raise argparse.ArgumentTypeError("must be 300..20000000")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 100_000:
        raise argparse.ArgumentTypeError("must be 0..100000")
    return value


def _socket_buffer(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value != 0 and not 4096 <= value <= 1 << 30:
        raise argparse.ArgumentTypeError("must be 0 (kernel default) or 4096 .. 1073741824")
    return value


def _shaping(text: str) -> Shaping:
    try:
        return Shaping.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(text: str) -> int:
    n = _count(text)
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"workers must be 1..{MAX_WORKERS}")
    return n


def _host_id(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= n <= 0xFFFF:
        raise argparse.ArgumentTypeError("a host id is 0..65535")
    return n


def _is_serial(url: str) -> bool:
    return url.partition("://")[0].lower() in SERIAL_SCHEMES


def _seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError("must be 0 or a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tools and tests)."""
    # -v is accepted before and after the subcommand; SUPPRESS keeps the subcommand's
    # default from overwriting a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging on stderr")
    verbose.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                         help="level of palisade's log lines on stderr (default warning; "
                         "info adds session opened/closed/refused lines; -v means debug)")

    parser = argparse.ArgumentParser(
        prog="palisade", description="PALISADE v1.2 post-quantum tunnel (palisade-c)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="debug logging on stderr")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                        help="level of palisade's log lines on stderr (default warning)")
    parser.add_argument("--version", action="version", version=f"palisade {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file with option defaults (also PALISADE_CONFIG); flags "
                        "override PALISADE_* environment variables, which override the file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = sub.add_parser(
        "keygen", parents=[verbose], help="generate an ML-DSA-65 identity key pair",
        description="Write a new private key to FILE (mode 0600) and its public key to "
        "FILE.pub, and print the key's fingerprint.",
    )
    keygen.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="private key file to create (the public key goes to FILE.pub)")
    keygen.add_argument("--force", action="store_true", help="replace existing files")
    keygen.set_defaults(func=_cmd_keygen)

    def peer_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", metavar="URL",
                       help="udp://HOST:PORT (IPv6 as udp://[::1]:PORT), or a serial port: "
                       "serial:///dev/ttyUSB0?baud=115200")
        p.add_argument("--key", required=True, metavar="FILE",
                       help="this side's private key (from 'palisade keygen')")
        p.add_argument("--trust", action="append", metavar="PUBFILE",
                       help="a peer public key file or hex fingerprint to accept (repeatable)")
        p.add_argument("--trust-dir", action="append", metavar="PATH",
                       help="a directory of .pub (and .fp fingerprint list) files, or a file "
                       "listing one fingerprint or .pub path per line; serve re-reads it on "
                       "SIGHUP (repeatable)")
        p.add_argument("--node-id", type=_node_id, metavar="HEX",
                       help="8-byte node id (16 hex digits): the RID steering prefix")
        p.add_argument("--plus", action="store_true",
                       help="offer/allow PALISADE-PLUS resumption and migration")
        p.add_argument("--shaping", type=_shaping, metavar="MODE",
                       help="traffic shaping (spec §10): off, pad:MIN-MAX (random padding) "
                       "or rate:PPS:SIZE (constant rate); a client asks for it, a server "
                       "imposes it (off: each client chooses). Implies PLUS shaping")
        p.add_argument("--socket-buffer", type=_socket_buffer, metavar="BYTES",
                       help="UDP receive/send buffer size to ask of the kernel (default "
                       "4194304; 0: the kernel's default; Linux caps it at "
                       "net.core.rmem_max)")
        _log_json_option(p)

    serve_p = sub.add_parser(
        "serve", parents=[verbose], help="run a server",
        description="Accept tunnels from pinned clients. With --echo every datagram is sent "
        "back on the same stream; without it, datagrams are written to stdout, one per line. "
        "Runs until SIGINT or SIGTERM.",
    )
    peer_options(serve_p)
    serve_p.add_argument("--echo", action="store_true", help="echo every datagram back")
    serve_p.add_argument("--ticket-db", metavar="FILE",
                         help="SQLite file remembering used resumption tickets, so that a "
                         "replayed ticket stays refused across restarts (implies --plus)")
    # Scale-out (docs/architecture.md, "Workers"); the --worker-* options are internal.
    serve_p.add_argument("--workers", type=_workers, default=1, metavar="N",
                         help="serve with N processes sharing the port, each datagram steered "
                         "by its RID to the process holding its session (default 1)")
    serve_p.add_argument("--host-id", type=_host_id, default=None, metavar="N",
                         help="this host's id (0..65535) in the RIDs it issues, for a load "
                         "balancer in front of several hosts")
    serve_p.add_argument("--ticket-key", metavar="FILE",
                         help="ticket key ring file (0600, created if missing, rotated in "
                         "place): tickets survive restarts and open on every worker and host "
                         "sharing FILE (implies --plus)")
    serve_p.add_argument("--ticket-store", metavar="URL",
                         help="shared single-use ticket store, redis://HOST:PORT/DB (needs "
                         "the redis extra; fails closed; implies --plus)")
    serve_p.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    serve_p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    serve_p.add_argument("--engine", choices=("python", "c"), default="python",
                         help="which implementation plays a serial device: the Python core "
                         "(default) or the C device peer firmware uses (CORE only)")
    serve_p.add_argument("--forward", metavar="URL",
                         help="forward the tunnels' datagrams to the UDP service at "
                         "udp://HOST:PORT and its replies back (one source port per flow)")
    _flow_idle_option(serve_p)
    _observability_options(serve_p)
    serve_p.set_defaults(func=_cmd_serve)

    connect_p = sub.add_parser(
        "connect", parents=[verbose], help="send stdin lines through a tunnel",
        description="Send each stdin line (without its newline) as one datagram and print "
        "each reply as one line. After stdin ends, wait for as many replies as lines sent "
        "(at most --wait seconds), then close.",
    )
    peer_options(connect_p)
    connect_p.add_argument("--ticket-file", metavar="FILE",
                           help="keep resumption tickets in FILE (0600) and resume from it "
                           "when it holds one (implies --plus)")
    connect_p.add_argument("--early-data", metavar="TEXT",
                           help="when resuming, send TEXT as 0-RTT early data (replayable: "
                           "only for requests safe to repeat); its reply is printed too")
    connect_p.add_argument("--timeout", type=_seconds, metavar="S",
                           help="handshake timeout in seconds (default 15)")
    connect_p.add_argument("--wait", type=_seconds_or_zero, default=5.0, metavar="S",
                           help="how long to wait for outstanding replies after stdin ends "
                           "(default 5; 0: do not wait)")
    connect_p.add_argument("--mtu", type=_datagram_size, metavar="BYTES",
                           help="largest datagram to send (default 1200 on UDP; a serial "
                           "link uses its own MTU; a gateway tells the client its device's "
                           "link MTU, so this is only an override)")
    connect_p.add_argument("--link-bps", type=_bits_per_second, metavar="BPS",
                           help="speed of the slowest hop, e.g. 115200: stretches the "
                           "handshake timers (a serial URL knows it, a gateway tells it; "
                           "this is only an override)")
    connect_p.add_argument("--listen", metavar="URL",
                           help="instead of stdin: forward datagrams that local applications "
                           "send to udp://HOST:PORT through the tunnel, and the replies back; "
                           "runs until SIGINT/SIGTERM or the tunnel closes")
    _flow_idle_option(connect_p)
    connect_p.set_defaults(func=_cmd_connect)

    gateway_p = sub.add_parser(
        "gateway", parents=[verbose], help="relay UDP peers to serial devices",
        description="Relay PALISADE datagrams between UDP clients and serial-attached devices, "
        "routing by the RID steering prefix (each device's node id). Holds no keys. Runs until "
        "SIGINT or SIGTERM.",
    )
    gateway_p.add_argument("--listen", required=True, metavar="URL",
                           help="UDP address for clients: udp://HOST:PORT")
    gateway_p.add_argument("--serial", required=True, action="append", metavar="URL",
                           help="a device: serial:///dev/ttyUSB0?baud=115200 (repeatable); "
                           "the device announces its node id, node=HEX16 only pins it")
    _observability_options(gateway_p, gateway=True)
    gateway_p.set_defaults(func=_cmd_gateway)

    demo_p = sub.add_parser(
        "demo", parents=[verbose], help="run a device, a gateway and a client on a virtual line",
        description="Without hardware: a simulated device serves PALISADE on a virtual serial "
        "line (a pty pair paced to --baud), a gateway bridges it to UDP on the loopback, and a "
        "client handshakes through it, echoes messages, rekeys and closes. Prints a summary.",
    )
    demo_p.add_argument("--baud", type=_baud, default=115200, metavar="N",
                        help="line speed of the virtual serial link (default 115200)")
    demo_p.add_argument("--messages", type=_count, default=10, metavar="N",
                        help="messages to echo through the tunnel (default 10)")
    demo_p.add_argument("--engine", choices=("python", "c"), default="python",
                        help="which implementation plays the device (see serve --engine)")
    demo_p.add_argument("--shaping", type=_shaping, metavar="MODE",
                        help="the client asks for traffic shaping (off, pad:MIN-MAX, "
                        "rate:PPS:SIZE); the summary then shows its overhead")
    demo_p.set_defaults(func=_cmd_demo)
    _add_key_commands(sub, verbose)
    _add_show_command(sub, verbose)
    return parser


def _load_identity(path: str) -> Identity:
    # Identity.load warns (does not fail) about a key readable by others; show that as one
    # line like every other message rather than Python's two-line warning format.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        identity = Identity.load(path)
    for w in caught:
        _error(f"warning: {w.message}")
    return identity


def _event_log(args: argparse.Namespace) -> JsonLinesLog | None:
    """The --log-json sink (one per process; closed at exit by the interpreter)."""
    path = getattr(args, "log_json", None)
    if not path:
        return None
    sink: JsonLinesLog | None = getattr(args, "_event_log_sink", None)
    if sink is None:
        sink = JsonLinesLog(path)
        args._event_log_sink = sink
    return sink


def _plus_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "plus", False) or getattr(args, "ticket_db", None)
                or getattr(args, "ticket_file", None) or getattr(args, "ticket_key", None)
                or getattr(args, "ticket_store", None))


def _make_config(args: argparse.Namespace, **extra: Any) -> Config:
    if not args.trust and not getattr(args, "trust_dir", None):
        raise _UsageError("give at least one --trust or --trust-dir")
    identity = _load_identity(args.key)
    plus = _plus_requested(args)
    if plus:
        extra.setdefault("plus_features", PLUS_RESUMPTION | PLUS_MIGRATION)
    shaping = getattr(args, "shaping", None)
    if shaping is not None:
        extra["shaping"] = shaping
        extra["plus_features"] = extra.get("plus_features", 0) | PLUS_SHAPING
    buffer = getattr(args, "socket_buffer", None)
    if buffer is not None:
        extra["socket_buffer_bytes"] = buffer or None
    ticket_key, store_url = getattr(args, "ticket_key", None), getattr(args, "ticket_store", None)
    if getattr(args, "ticket_db", None) or ticket_key or store_url:
        fp = bytes.fromhex(identity.fingerprint)
        store: TicketStore | None = None
        if store_url:
            from palisade_c.ticketstore_redis import RedisTicketStore
            store = RedisTicketStore(store_url)
        elif getattr(args, "ticket_db", None):
            store = SqliteTicketStore(args.ticket_db)
        keys = FileTicketKeyRing(ticket_key, fp) if ticket_key else None
        extra["tickets"] = TicketService(fp, store, keys=keys)
    config = Config(
        identity=identity,
        trusted_peers=[*(args.trust or ()),
                       *(e for src in getattr(args, "trust_dir", None) or ()
                         for e in read_trust_source(src))],
        node_id=args.node_id,
        **extra,
    )
    mtu, bps = getattr(args, "mtu", None), getattr(args, "link_bps", None)
    if mtu is not None or bps is not None:
        # A serial URL overrides both with what the link says (aio.connect does that).
        config = tune_for_link(config, mtu or config.max_datagram_size,
                               bps or config.link_bits_per_second)
    return config


# -- keygen -------------------------------------------------------------------------------------


def _cmd_keygen(args: argparse.Namespace) -> int:
    private = Path(args.output)
    public = Path(f"{args.output}.pub")
    if not args.force:
        # Check both before writing either, so a refusal never leaves half a key pair.
        for path in (private, public):
            if path.exists():
                _error(f"{path} already exists (use --force to replace it)")
                return EXIT_ERROR
    identity = Identity.generate()
    try:
        identity.save(private, overwrite=args.force)
        identity.save_public(public, overwrite=args.force)
    except OSError as exc:
        _error(f"cannot write key: {exc.strerror or exc} ({exc.filename or private})")
        return EXIT_ERROR
    print(identity.fingerprint, flush=True)
    log.info("wrote %s (private, 0600) and %s", private, public)
    return EXIT_OK


# -- serve --------------------------------------------------------------------------------------


def _summary(tunnel: Tunnel, event: ConnectionClosed) -> str:
    counters = json.dumps(tunnel.counters, sort_keys=True, separators=(",", ":"))
    who = "peer" if event.by_peer else "us"
    return (f"closed {tunnel.connection.name} peer={tunnel.peer_fingerprint[:16]} "
            f"addr={tunnel.peer_address} by={who} code={code_name(event.error_code)} "
            f"reason={_printable(event.reason)!r} counters={counters}")


async def _echo(tunnel: Tunnel) -> None:
    while True:
        event = await tunnel.recv_event()
        if isinstance(event, ConnectionClosed):
            return
        if isinstance(event, DataReceived):
            try:
                tunnel.send(event.data, event.stream_id)
            except BackPressureError:
                pass  # constant-rate shaping, queue full: an echo is best effort


async def _sink(tunnel: Tunnel) -> None:
    out = sys.stdout.buffer
    async for data in tunnel:
        out.write(data + b"\n")
        out.flush()


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets (where the platform lets the loop catch them)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_c_engine(args: argparse.Namespace, config: Config) -> int:
    """``serve serial://… --engine c``: the C device peer answers on the link."""
    from palisade_c.device_engine import echo, serve_device

    def sink(_device: object, _stream: int, data: bytes) -> None:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.buffer.flush()

    # Options the C peer does not implement are refused by name, never silently ignored.
    unsupported = [flag for flag, given in (
        ("--forward", getattr(args, "forward", None)),
        ("--workers", getattr(args, "workers", 1) != 1),
        ("--metrics", getattr(args, "metrics", None)),
        ("--shaping", getattr(getattr(args, "shaping", None), "mode", 0) != 0),
    ) if given]
    if unsupported:
        _error(f"--engine c does not support {', '.join(unsupported)} (firmware_bridge/DEVICE.md)")
        return EXIT_USAGE
    if not _is_serial(args.url) or config.plus_features:
        _error("--engine c serves a serial URL, CORE only (no --plus, no --ticket-db)")
        return EXIT_ERROR
    try:
        server = await serve_device(args.url, config, echo if args.echo else sink)
    except OSError as exc:
        _error(f"cannot open {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    stop = _stop_on_signals()
    # The C peer's pins are fixed when its context is set up: nothing to re-read.
    _on_sighup(lambda: log.warning("SIGHUP: the C device engine has nothing to reload"))
    print(f"palisade: listening on {args.url} with the C device engine "
          f"(fingerprint {config.identity.fingerprint})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
    return EXIT_OK


async def _serve_main(args: argparse.Namespace, sock: socket.socket | None = None,
                      cookie_secret: bytes | None = None) -> int:
    extra: dict[str, Any] = {}
    if sock is not None or args.host_id is not None:
        # Routing fields in every session RID this process issues (docs/protocol.md §3.3).
        extra["rid_layout"] = RidLayout(0, args.host_id or 0, args.worker_index)
    if cookie_secret is not None:
        extra["cookie_secret"] = cookie_secret
    config = _make_config(args, **extra)
    if getattr(args, "engine", "python") == "c":
        return await _serve_c_engine(args, config)
    body = _forward_handler(args) or (_echo if args.echo else _sink)

    async def handler(tunnel: Tunnel) -> None:
        session_log.info("%s: session opened from %s, peer %s", tunnel.connection.name,
                         tunnel.peer_address, tunnel.peer_fingerprint)
        # The summary waits for CLOSED so its counters are final, whoever closes.
        tunnel.closed.add_done_callback(
            lambda fut: session_log.info("%s", _summary(tunnel, fut.result())))
        await body(tunnel)

    try:
        server = await serve(args.url, config, handler, event_log=_event_log(args), sock=sock)
    except OSError as exc:
        what = "open" if _is_serial(args.url) else "listen on"
        _error(f"cannot {what} {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    # Handlers first, so that a supervisor that signals as soon as it reads the "listening"
    # line always gets a clean shutdown.
    stop = _stop_on_signals()
    _reload_trust_on_sighup(args, config)
    host, port = server.address
    where = args.url if _is_serial(args.url) else f"udp://{_host_for_url(host)}:{port}"
    try:
        observers = await _start_observers(args, _serve_snapshot(args, server, config, where))
    except ConfigError:
        server.close()
        await server.wait_closed()
        raise
    print(f"palisade: listening on {where} "
          f"(fingerprint {config.identity.fingerprint})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        # Losses below the protocol (a receive buffer too small for a burst) show here.
        log.info("shutting down; endpoint drops %s, transport %s",
                 server.endpoint.drop_counts, server.transport_counters)
        await observers.close()
        server.close()
        await server.wait_closed()
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.worker_fd is not None:
        # A worker of `serve --workers`: its socket is inherited, its cookie key on stdin.
        from palisade_c.workers import die_with_parent

        die_with_parent()
        secret = bytes.fromhex(sys.stdin.readline().strip())
        sock = socket.socket(fileno=args.worker_fd)
        return asyncio.run(_serve_main(args, sock, secret))
    if args.workers > 1:
        if _is_serial(args.url):
            _error("--workers needs a udp:// URL")
            return EXIT_ERROR
        # A bad key, trust or ticket option: one message here, not one per worker restart.
        checked = _make_config(args)
        if checked.tickets is not None and isinstance(checked.tickets.store, SqliteTicketStore):
            checked.tickets.store.close()
        status = _serve_workers(args)
        if status is not None:
            return status
    return asyncio.run(_serve_main(args))


def _serve_workers(args: argparse.Namespace) -> int | None:
    """Run the worker supervisor; None when the kernel cannot steer (one worker then)."""
    from palisade_c.workers import Supervisor, open_group

    _, host, port, _ = parse_url(args.url)
    try:
        socks = open_group(host, port, args.workers)
    except OSError as exc:
        _error(f"cannot listen on {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    if socks is None:
        return None
    supervisor = Supervisor(socks, args._argv, plus=_plus_requested(args),
                            has_ticket_key=bool(args.ticket_key),
                            has_store=bool(args.ticket_db or args.ticket_store))

    async def run() -> int:
        stop = _stop_on_signals()
        # The workers hold the sessions and the trust stores: SIGHUP goes on to each of
        # them (it must not stop the supervisor, which would take every worker with it).
        _on_sighup(lambda: log.warning("SIGHUP passed on to %d workers",
                                       supervisor.signal_workers(signal.SIGHUP)))
        return await supervisor.run(stop)

    return asyncio.run(run())


# -- connect ------------------------------------------------------------------------------------


def _read_stdin(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None],
                stop: threading.Event) -> None:
    """Thread body: feed stdin lines into ``queue`` (newline kept), then ``None`` at the end.

    A thread, because a read from stdin blocks and stdin may be a regular file, which the
    event loop cannot watch. It reads the file descriptor with ``os.read`` and never touches
    ``sys.stdin``: a daemon thread blocked inside a buffered reader holds that reader's lock,
    and the interpreter aborts at exit when it finds the lock taken. The queue is bounded, so
    a large input is read only as fast as it is sent.
    """

    def put(item: bytes | None) -> bool:
        fut = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        while not stop.is_set():
            try:
                fut.result(timeout=0.2)
                return True
            except concurrent.futures.TimeoutError:
                continue
        fut.cancel()
        return False

    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
    except (OSError, ValueError):  # no usable stdin (closed, or replaced by a non-file)
        fd = -1
    pending = b""
    try:
        while fd >= 0 and not stop.is_set():
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if not put(line + b"\n"):
                    return
        if pending and not put(pending):
            return
        put(None)
    except (RuntimeError, OSError, concurrent.futures.CancelledError):
        # The loop is gone or stdin failed: the main thread has moved on or will see EOF.
        with contextlib.suppress(RuntimeError):
            put(None)


def _strip_newline(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


#: How often ``connect`` looks again whether a handshake's path is slow enough for progress.
PROGRESS_RECHECK = 0.25


def _is_link_reset(event: ConnectionClosed) -> bool:
    """True for the close the client makes when a device restarted: a serial link's new boot
    counter, or a probe that a gateway's REBOOT notice prompted and nobody answered."""
    return not event.by_peer and event.error_code == ErrorCode.ErrorSessionNotFound


async def _open_tunnel(args: argparse.Namespace, config: Config) -> Tunnel | int:
    """Connect, showing progress on slow links; the tunnel, or an exit status once the
    failure has been reported."""
    loop = asyncio.get_running_loop()
    verbose = bool(getattr(args, "verbose", False))
    progress: HandshakeProgress | None = None

    def watch(conn: Connection) -> None:
        nonlocal progress
        if should_show(conn.config.link_bits_per_second, sys.stderr, verbose):
            progress = HandshakeProgress(conn).start()
        elif not conn.established and not conn.closed:
            # Behind a gateway the path's speed arrives with its PATH notice, after the
            # first flight: look again until the handshake ends, and show progress from the
            # moment the path turns out to be slow.
            loop.call_later(PROGRESS_RECHECK, watch, conn)

    started = loop.time()
    try:
        cache: ClientTicketCache | None = getattr(args, "_tickets", None)
        early = args.early_data.encode() if args.early_data is not None else None
        # --timeout went into config.handshake_timeout; connect() waits as long as the core
        # allows, which on a slow serial link includes the handshake's airtime.
        tunnel = await connect(args.url, config, on_connection=watch,
                               tickets=cache, early_data=early if cache else None,
                               event_log=_event_log(args))
    except HandshakeTimeoutError as exc:
        # The elapsed time, not the configured limit: the core may give up earlier, when its
        # retransmissions are exhausted. Silence and a stalled reply point at different
        # faults (a wrong address or a firewall; a lossy path), so the message tells them apart.
        _error(f"handshake timed out after {loop.time() - started:.1f} s "
               f"({describe_stall(exc.received, args.url)})")
        return EXIT_TIMEOUT
    except HandshakeError as exc:
        _error(f"handshake failed: {exc}")
        return EXIT_HANDSHAKE
    except OSError as exc:
        _error(f"cannot reach {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None and progress.updates:
        conn = tunnel.connection
        print(f"palisade: handshake done in {loop.time() - started:.1f} s "
              f"(sent {conn.hs_bytes_out} B, received {conn.hs_bytes_in} B)",
              file=sys.stderr, flush=True)
    log.info("connected to %s, server %s", args.url, tunnel.peer_fingerprint)
    return tunnel


async def _connect_main(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.timeout is not None:
        extra["handshake_timeout"] = args.timeout
    config = _make_config(args, **extra)
    if config.plus_features & PLUS_RESUMPTION:
        # One cache for the whole run: a reconnect after a device reboot resumes with the
        # ticket the previous session earned (no signatures over a slow line), and
        # --ticket-file carries tickets from one run to the next.
        args._tickets = ClientTicketCache(args.ticket_file)
    loop = asyncio.get_running_loop()
    opened = await _open_tunnel(args, config)
    if isinstance(opened, int):
        return opened
    tunnel = opened
    # A device may reboot under the tunnel, on a serial link or behind a gateway (whose
    # REBOOT notice made the session probe itself and fail); then we connect again.
    can_reconnect = True

    lines: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=STDIN_READ_AHEAD)
    stop = threading.Event()
    # A daemon thread, so a read blocked on an interactive stdin never delays exit.
    threading.Thread(target=_read_stdin, args=(loop, lines, stop), name="palisade-stdin",
                     daemon=True).start()

    sent = received = lost = skipped = 0
    line_no = 0
    if tunnel.handshake is not None and tunnel.handshake.early_data_accepted:
        sent = 1  # the --early-data request is answered like a line
    stdin_done = False
    gave_up: int | None = None  # exit status once reconnecting failed
    replies_done = asyncio.Event()
    switched = asyncio.Event()  # set whenever the tunnel was replaced or we gave up
    out = sys.stdout.buffer

    async def send_lines() -> None:
        nonlocal sent, stdin_done, skipped, line_no
        while (line := await lines.get()) is not None:
            data = _strip_newline(line)
            line_no += 1
            while True:
                current = tunnel
                try:
                    current.send(data)
                except PacketTooLargeError as exc:
                    # The path's datagram size is a promise: say so, for every line, and
                    # make the exit status show that not everything went out.
                    skipped += 1
                    _error(f"line {line_no} skipped: {len(data)} bytes, more than the "
                           f"{exc.max_payload} bytes one datagram of this path carries")
                    break
                except BackPressureError:
                    # Constant-rate shaping: the send queue is full; wait one slot.
                    await asyncio.sleep(1.0 / max(1, current.connection.shaping.a))
                    continue
                except ConnectionClosedError:
                    if not can_reconnect:
                        return  # the printer sees the close too and ends the session
                    # The printer decides: a new tunnel (send again) or the end.
                    while tunnel is current and gave_up is None and not printer.done():
                        switched.clear()
                        await switched.wait()
                    if tunnel is current:
                        return
                    continue
                sent += 1
                break
        stdin_done = True
        if received >= sent:
            replies_done.set()

    async def print_replies() -> None:
        nonlocal received, sent, lost, tunnel, gave_up
        for attempt in range(RECONNECT_ATTEMPTS + 1):
            async for data in tunnel:
                out.write(data + b"\n")
                out.flush()
                received += 1
                if stdin_done and received >= sent:
                    replies_done.set()
            event = tunnel.closed.result()
            if not (can_reconnect and _is_link_reset(event)) or attempt == RECONNECT_ATTEMPTS:
                return
            # The device restarted: what it had not answered is gone with its session.
            lost += sent - received
            sent = received
            _error(f"{event.reason}; connecting again")
            await tunnel.close()
            opened = await _open_tunnel(args, config)
            if isinstance(opened, int):
                gave_up = opened
                switched.set()
                return
            tunnel = opened
            switched.set()
            if stdin_done and received >= sent:
                replies_done.set()

    sender = asyncio.create_task(send_lines())
    printer = asyncio.create_task(print_replies())
    printer.add_done_callback(lambda _t: switched.set())
    status = EXIT_OK
    try:
        await asyncio.wait({sender, printer}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and not printer.done() and stdin_done and args.wait > 0:
            waiter = asyncio.create_task(replies_done.wait())
            await asyncio.wait({printer, waiter}, timeout=args.wait,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if received < sent and not printer.done():
                _error(f"{sent - received} of {sent} replies missing after {args.wait:g} s")
                status = EXIT_UNDELIVERED
    finally:
        stop.set()
        event = await tunnel.close()
        # The printer is not cancelled: it ends by itself once the replies that arrived
        # before CLOSED are written, so none of them is lost.
        sender.cancel()
        results = await asyncio.gather(sender, printer, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, ConnectionClosedError):
            _error(f"unexpected error: {result!r}")
            status = EXIT_ERROR
    if gave_up is not None:
        return gave_up
    if lost:
        _error(f"{lost} replies lost when the device restarted")
        status = EXIT_UNDELIVERED
    if skipped:
        _error(f"{skipped} line(s) not sent: longer than the path's maximum payload")
        status = EXIT_UNDELIVERED
    if event.by_peer or event.error_code != 0:
        if event.error_code != 0 or received < sent:
            _error(f"connection closed by {'peer' if event.by_peer else 'us'}: "
                   f"{code_name(event.error_code)} {event.reason}".rstrip())
            status = EXIT_UNDELIVERED if received < sent else EXIT_ERROR
    _report_client_drops(args, tunnel)
    log.info("%s", _summary(tunnel, event))
    return status


def _cmd_connect(args: argparse.Namespace) -> int:
    main = _listen_main(args) if args.listen else _connect_main(args)
    return asyncio.run(_close_on_sigterm(main))


# -- gateway ------------------------------------------------------------------------------------


async def _gateway_main(args: argparse.Namespace) -> int:
    from palisade_c.gateway import Gateway  # pyserial only for serial commands

    try:
        gateway = await Gateway.start(args.listen, args.serial)
    except OSError as exc:
        _error(f"cannot listen on {args.listen}: {exc.strerror or exc}")
        return EXIT_ERROR
    stop = _stop_on_signals()
    # A gateway holds no keys and no trust: SIGHUP (a reload by habit) must not stop it.
    _on_sighup(lambda: log.warning("SIGHUP: the gateway has nothing to reload"))
    host, port = gateway.address
    try:
        observers = await _start_observers(args, _gateway_snapshot(
            gateway, f"udp://{_host_for_url(host)}:{port}"))
    except ConfigError:
        gateway.close()
        await gateway.wait_closed()
        raise
    devices = ", ".join(
        f"{d.name} (node {d.node.hex() if d.node else 'from its HELLO'})" for d in gateway.devices
    )
    print(f"palisade: gateway listening on udp://{_host_for_url(host)}:{port} for {devices}",
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await observers.close()
        gateway.close()
        await gateway.wait_closed()
        log.info("gateway counters %s",
                 json.dumps(gateway.counters, sort_keys=True, separators=(",", ":")))
    return EXIT_OK


def _cmd_gateway(args: argparse.Namespace) -> int:
    return asyncio.run(_gateway_main(args))


# -- demo ---------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from palisade_c.demo import run

    return run(baud=args.baud, messages=args.messages,
               verbose=bool(getattr(args, "verbose", False)),
               engine=getattr(args, "engine", "python"),
               shaping=getattr(args, "shaping", None))


# -- key tools, trust reload, SIGTERM (issue 14) -------------------------------------------------


class _UsageError(ConfigError):
    """A combination of options that cannot work: exits with EXIT_USAGE."""


def _add_key_commands(sub: Any, verbose: argparse.ArgumentParser) -> None:
    pubkey_p = sub.add_parser(
        "pubkey", parents=[verbose], help="print the public key of a key file",
        description="Print the public key (the PEM a .pub file holds) of a private key file "
        "or a .pub file on stdout: palisade pubkey server.key > server.key.pub",
    )
    pubkey_p.add_argument("keyfile", metavar="KEYFILE")
    pubkey_p.set_defaults(func=_cmd_pubkey)
    fingerprint_p = sub.add_parser(
        "fingerprint", parents=[verbose], help="print the fingerprint of a key file",
        description="Print the hex fingerprint (what --trust accepts) of a private key file "
        "or a .pub file on stdout.",
    )
    fingerprint_p.add_argument("keyfile", metavar="FILE")
    fingerprint_p.set_defaults(func=_cmd_fingerprint)


def _cmd_pubkey(args: argparse.Namespace) -> int:
    from palisade_c.keytools import public_pem

    sys.stdout.write(public_pem(args.keyfile))
    sys.stdout.flush()
    return EXIT_OK


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from palisade_c.keytools import fingerprint_of

    print(fingerprint_of(args.keyfile), flush=True)
    return EXIT_OK


def _on_sighup(handler: Callable[[], None]) -> None:
    """Run ``handler`` on SIGHUP instead of dying of it (the default action), where the
    platform lets the loop catch signals. Long-running commands all install one."""
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, handler)


def _reload_trust_on_sighup(args: argparse.Namespace, config: Config) -> None:
    """SIGHUP re-reads --trust-dir into the running server's trust store; established
    sessions stay up. Without --trust-dir it only logs (it no longer kills the server)."""
    reloader = TrustReloader(config.trust, list(args.trust or ()),
                             list(getattr(args, "trust_dir", None) or ()))

    def on_hup() -> None:
        try:
            count = reloader.reload()
        except ConfigError as exc:
            _error(f"trust reload failed, keeping the previous keys: {exc}")
            return
        log.warning("trust reloaded on SIGHUP: %d keys pinned", count)

    _on_sighup(on_hup)


async def _close_on_sigterm(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main``; SIGTERM cancels it like SIGINT does, so its cleanup sends the close."""
    task = asyncio.current_task()
    terminated = False

    def on_term() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await main
    except asyncio.CancelledError:
        if terminated:
            return EXIT_TERMINATED
        raise


# -- UDP forwarding (issue 14) ------------------------------------------------------------------


def _flow_idle_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flow-idle", type=_seconds, default=DEFAULT_FLOW_IDLE, metavar="S",
                   help="with --forward/--listen: release a flow (its stream id and socket) "
                   f"after S idle seconds (default {DEFAULT_FLOW_IDLE:g})")


def _forward_handler(args: argparse.Namespace) -> Any:
    """serve --forward: the tunnel handler, or None without --forward."""
    if not getattr(args, "forward", None):
        return None
    forwarder = ServiceForwarder(parse_udp_target(args.forward), flow_idle=args.flow_idle)
    args._forwarder = forwarder  # for `palisade show` and --metrics
    return forwarder.handle


def _report_client_drops(args: argparse.Namespace, tunnel: Tunnel) -> None:
    """connect --log-json: the session's drop classes, as one aggregated event at its end."""
    sink = _event_log(args)
    if sink is not None:
        name = tunnel.connection.name
        DropReporter(lambda: {name: tunnel.connection.drop_counts}, sink,
                     interval=0.0).report(asyncio.get_running_loop().time())


async def _listen_main(args: argparse.Namespace) -> int:
    """connect --listen: forward local applications' datagrams through one tunnel."""
    host, port = parse_udp_target(args.listen)
    extra: dict[str, Any] = {}
    if args.timeout is not None:
        extra["handshake_timeout"] = args.timeout
    config = _make_config(args, **extra)
    if config.plus_features & PLUS_RESUMPTION:
        args._tickets = ClientTicketCache(args.ticket_file)
    opened = await _open_tunnel(args, config)
    if isinstance(opened, int):
        return opened
    tunnel = opened
    forwarder = ListenForwarder(tunnel, flow_idle=args.flow_idle)
    args._forwarder = forwarder
    try:
        try:
            bound_host, bound_port = await forwarder.bind(host, port)
        except OSError as exc:
            _error(f"cannot listen on {args.listen}: {exc.strerror or exc}")
            return EXIT_ERROR
        print(f"palisade: forwarding udp://{_host_for_url(bound_host)}:{bound_port} "
              f"through the tunnel to {args.url}", file=sys.stderr, flush=True)
        event = await forwarder.run()
    finally:
        forwarder.close()
        closed = await tunnel.close()
        _report_client_drops(args, tunnel)
        log.info("%s forward=%s", _summary(tunnel, closed),
                 json.dumps(forwarder.snapshot()["counters"], sort_keys=True,
                            separators=(",", ":")))
    if event.error_code != 0:
        _error(f"connection closed by {'peer' if event.by_peer else 'us'}: "
               f"{code_name(event.error_code)} {event.reason}".rstrip())
        return EXIT_ERROR
    return EXIT_OK


# -- show, control socket, metrics (issue 14) ---------------------------------------------------


def _observability_options(p: argparse.ArgumentParser, *, gateway: bool = False) -> None:
    default = ("$XDG_RUNTIME_DIR/palisade/gateway.sock, none without XDG_RUNTIME_DIR"
               if gateway else "$XDG_RUNTIME_DIR/palisade/KEYNAME.sock, else KEYFILE.sock")
    p.add_argument("--control", metavar="PATH",
                   help=f"Unix control socket (0600) for 'palisade show' (default {default}; "
                   "'none' for no socket)")
    if gateway:
        _log_json_option(p)
    p.add_argument("--log-interval", type=_seconds, default=DROP_INTERVAL, metavar="S",
                   help="with --log-json: write the drop counts aggregated over S seconds "
                   f"(default {DROP_INTERVAL:g})")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP, e.g. 127.0.0.1:9109 (needs the "
                   "prometheus_client package: pip install 'palisade-c[metrics]')")


def _log_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-json", metavar="FILE",
                   help="append one JSON object per state change, epoch change, close and "
                   "(aggregated) drop class to FILE, '-' for stdout (never keys or data)")


def _add_show_command(sub: Any, verbose: argparse.ArgumentParser) -> None:
    show_p = sub.add_parser(
        "show", parents=[verbose], help="list a running server's sessions or gateway's devices",
        description="Ask a running 'palisade serve' or 'palisade gateway' over its control "
        "socket. Finds the socket from --control, or from --key as serve does, or else asks "
        "every socket in $XDG_RUNTIME_DIR/palisade/.",
    )
    show_p.add_argument("--control", metavar="PATH", help="the control socket")
    show_p.add_argument("--key", metavar="FILE", help="the server's key file (locates the "
                        "socket the way serve does)")
    show_p.add_argument("--json", action="store_true", help="machine-readable output")
    show_p.set_defaults(func=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    from palisade_c.control import default_path, format_show, query, runtime_dir

    paths: list[Path] = []
    if args.control:
        paths = [Path(args.control)]
    elif args.key:
        found = default_path(args.key)
        paths = [found] if found else []
    else:
        base = runtime_dir()
        paths = sorted(base.glob("*.sock")) if base and base.is_dir() else []
    if not paths:
        raise _UsageError("no control socket: give --control PATH or --key FILE")
    snaps = [query(path) for path in paths]
    if args.json:
        print(json.dumps(snaps[0] if len(snaps) == 1 else snaps, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_show(snap) for snap in snaps))
    return EXIT_OK


def _serve_snapshot(args: argparse.Namespace, server: Any, config: Config,
                    where: str) -> Any:
    from palisade_c.control import ActivityTracker, server_snapshot

    tracker = ActivityTracker()
    args._tracker = tracker

    def extra() -> dict[str, Any]:
        forwarder = getattr(args, "_forwarder", None)
        return {"forward": forwarder.snapshot()} if forwarder is not None else {}

    def snapshot() -> dict[str, Any]:
        return server_snapshot(server, listen=where, fingerprint=config.identity.fingerprint,
                               tracker=tracker, extra=extra)

    def drop_sources() -> dict[str, dict[str, int]]:
        endpoint = server.endpoint
        sources = {"endpoint": endpoint.drop_counts}
        for conn in endpoint.connections:
            sources[conn.name] = conn.drop_counts
        return sources

    snapshot.connections = lambda: server.endpoint.connections  # type: ignore[attr-defined]
    snapshot.drop_sources = drop_sources  # type: ignore[attr-defined]
    return snapshot


def _gateway_snapshot(gateway: Any, where: str) -> Any:
    from palisade_c.control import gateway_snapshot

    def snapshot() -> dict[str, Any]:
        return gateway_snapshot(gateway, listen=where)

    def drop_sources() -> dict[str, dict[str, int]]:
        snap = snapshot()
        sources = {"gateway": snap["drops"]}
        for d in snap["devices"]:
            errors = {k: v for k, v in d["frame_errors"].items() if isinstance(v, int)}
            sources[d["port"]] = {**d["drops"], **errors}
        return sources

    snapshot.drop_sources = drop_sources  # type: ignore[attr-defined]
    snapshot.is_gateway = True  # type: ignore[attr-defined]
    return snapshot


class _Observers:
    """The control socket, the session sampler and the metrics endpoint of one process."""

    def __init__(self) -> None:
        self.control: Any = None
        self.metrics: Any = None
        self.sampler: asyncio.Task[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def close(self) -> None:
        for task in [self.sampler, *self.tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.close)
        if self.control is not None:
            await self.control.close()


async def _start_observers(args: argparse.Namespace, snapshot: Any) -> _Observers:
    from palisade_c.control import ControlServer, default_path

    observers = _Observers()
    connections = getattr(snapshot, "connections", None)
    tracker = getattr(args, "_tracker", None)
    if connections is not None and tracker is not None:
        observers.sampler = asyncio.get_running_loop().create_task(tracker.run(connections))
    event_log = _event_log(args)
    sources = getattr(snapshot, "drop_sources", None)
    if event_log is not None and sources is not None:
        reporter = DropReporter(sources, event_log, interval=args.log_interval)
        observers.tasks.append(asyncio.get_running_loop().create_task(reporter.run()))
        if getattr(snapshot, "is_gateway", False):
            observers.tasks.append(asyncio.get_running_loop().create_task(
                watch_gateway(snapshot, event_log)))
    path_text = getattr(args, "control", None)
    path = (None if path_text == "none" else Path(path_text) if path_text
            else default_path(getattr(args, "key", None), gateway=args.func is _cmd_gateway))
    # Under `serve --workers N` each worker holds its own sessions: worker i answers on the
    # control socket PATH.i and serves metrics on PORT+i (worker 0 on PATH and PORT).
    worker = getattr(args, "worker_index", 0) if getattr(args, "worker_fd", None) is not None \
        else 0
    if path is not None and worker:
        path = path.with_name(f"{path.name}.{worker}")
    if path is not None:
        control = ControlServer(path, snapshot)
        try:
            await control.start()
            observers.control = control
            log.info("control socket %s", path)
        except OSError as exc:
            _error(f"warning: no control socket: {exc.strerror or exc}")
    if getattr(args, "metrics", None):
        from palisade_c.metrics import MetricsServer, parse_listen

        host, port = parse_listen(args.metrics)
        if port and worker:
            port += worker
            if port > 0xFFFF:
                raise ConfigError(f"--metrics {args.metrics}: worker {worker} would need port "
                                  f"{port}")
        try:
            observers.metrics = MetricsServer(host, port, snapshot)
        except OSError as exc:
            await observers.close()
            raise ConfigError(f"cannot serve metrics on {args.metrics}: "
                              f"{exc.strerror or exc}") from None
        mhost, mport = observers.metrics.address
        print(f"palisade: metrics on http://{_host_for_url(mhost)}:{mport}/metrics",
              file=sys.stderr, flush=True)
    return observers


# -- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        apply_sources(parser, arguments)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    args = parser.parse_args(arguments)
    args._argv = arguments  # for worker processes
    finish_sources(args)
    setup_logging(getattr(args, "log_level", None), bool(getattr(args, "verbose", False)))
    try:
        status: int = args.func(args)
    except _UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":  # pragma: no cover - `python -m palisade_c` goes via __main__.py
    sys.exit(main())
