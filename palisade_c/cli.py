"""The ``palisade`` command: generate keys, run an echo server, send lines through a tunnel.

::

    palisade keygen -o server.key                      # server.key (0600) + server.key.pub
    palisade serve udp://0.0.0.0:4433 --key server.key --trust client.key.pub --echo
    palisade connect udp://127.0.0.1:4433 --key client.key --trust server.key.pub < lines.txt

Output contract (scripts and tests rely on it):

* ``keygen`` prints the new key's fingerprint, and nothing else, on stdout.
* ``serve`` prints one ``palisade: listening on URL ...`` line on stderr once it is bound.
* ``connect`` prints each reply as one line on stdout, in arrival order.
* Every failure is ONE line on stderr starting with ``palisade:``; text that came from the
  peer is escaped so that it cannot add lines or terminal control sequences.

Exit codes: 0 success; 1 a runtime or configuration error (including replies still missing
when ``connect`` gives up waiting); 2 a failed handshake (argparse also uses 2 for usage
errors); 130 interrupted.
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
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from palisade_c.aio import HandshakeTimeoutError, Tunnel, connect, serve
from palisade_c.config import Config
from palisade_c.errors import (
    ConfigError,
    ConnectionClosedError,
    HandshakeError,
    PacketTooLargeError,
    code_name,
)
from palisade_c.events import ConnectionClosed, DataReceived
from palisade_c.identity import Identity

__all__ = ["EXIT_ERROR", "EXIT_HANDSHAKE", "EXIT_OK", "build_parser", "main"]

log = logging.getLogger("palisade_c.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_HANDSHAKE = 2
EXIT_INTERRUPTED = 130

#: Lines read ahead from stdin before the reader thread waits for the tunnel to catch up.
STDIN_READ_AHEAD = 256


def _printable(text: str) -> str:
    """``text`` with control characters escaped: peer-chosen text must stay on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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

    parser = argparse.ArgumentParser(
        prog="palisade", description="PALISADE v1.2 post-quantum tunnel (palisade-c)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="debug logging on stderr")
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
        p.add_argument("url", metavar="URL", help="udp://HOST:PORT (IPv6 as udp://[::1]:PORT)")
        p.add_argument("--key", required=True, metavar="FILE",
                       help="this side's private key (from 'palisade keygen')")
        p.add_argument("--trust", required=True, action="append", metavar="PUBFILE",
                       help="a peer public key file or hex fingerprint to accept (repeatable)")
        p.add_argument("--node-id", type=_node_id, metavar="HEX",
                       help="8-byte node id (16 hex digits): the RID steering prefix")

    serve_p = sub.add_parser(
        "serve", parents=[verbose], help="run a server",
        description="Accept tunnels from pinned clients. With --echo every datagram is sent "
        "back on the same stream; without it, datagrams are written to stdout, one per line. "
        "Runs until SIGINT or SIGTERM.",
    )
    peer_options(serve_p)
    serve_p.add_argument("--echo", action="store_true", help="echo every datagram back")
    serve_p.set_defaults(func=_cmd_serve)

    connect_p = sub.add_parser(
        "connect", parents=[verbose], help="send stdin lines through a tunnel",
        description="Send each stdin line (without its newline) as one datagram and print "
        "each reply as one line. After stdin ends, wait for as many replies as lines sent "
        "(at most --wait seconds), then close.",
    )
    peer_options(connect_p)
    connect_p.add_argument("--timeout", type=_seconds, metavar="S",
                           help="handshake timeout in seconds (default 15)")
    connect_p.add_argument("--wait", type=_seconds_or_zero, default=5.0, metavar="S",
                           help="how long to wait for outstanding replies after stdin ends "
                           "(default 5; 0: do not wait)")
    connect_p.set_defaults(func=_cmd_connect)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_identity(path: str) -> Identity:
    # Identity.load warns (does not fail) about a key readable by others; show that as one
    # line like every other message rather than Python's two-line warning format.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        identity = Identity.load(path)
    for w in caught:
        _error(f"warning: {w.message}")
    return identity


def _make_config(args: argparse.Namespace, **extra: Any) -> Config:
    return Config(
        identity=_load_identity(args.key),
        trusted_peers=list(args.trust),
        node_id=args.node_id,
        **extra,
    )


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
            tunnel.send(event.data, event.stream_id)


async def _sink(tunnel: Tunnel) -> None:
    out = sys.stdout.buffer
    async for data in tunnel:
        out.write(data + b"\n")
        out.flush()


async def _serve_main(args: argparse.Namespace) -> int:
    config = _make_config(args)
    body = _echo if args.echo else _sink

    async def handler(tunnel: Tunnel) -> None:
        log.info("%s: tunnel from %s, peer %s", tunnel.connection.name, tunnel.peer_address,
                 tunnel.peer_fingerprint)
        # The summary waits for CLOSED so its counters are final, whoever closes.
        tunnel.closed.add_done_callback(lambda fut: log.info("%s", _summary(tunnel, fut.result())))
        await body(tunnel)

    try:
        server = await serve(args.url, config, handler)
    except OSError as exc:
        _error(f"cannot listen on {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    # Handlers first, so that a supervisor that signals as soon as it reads the "listening"
    # line always gets a clean shutdown.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            loop.add_signal_handler(sig, stop.set)
    host, port = server.address
    print(f"palisade: listening on udp://{_host_for_url(host)}:{port} "
          f"(fingerprint {config.identity.fingerprint})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        log.debug("shutting down")
        server.close()
        await server.wait_closed()
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    return asyncio.run(_serve_main(args))


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


async def _connect_main(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.timeout is not None:
        extra["handshake_timeout"] = args.timeout
    config = _make_config(args, **extra)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        tunnel = await connect(args.url, config)
    except HandshakeTimeoutError:
        # The elapsed time, not the configured limit: the core may give up earlier, when its
        # retransmissions are exhausted.
        _error(f"handshake timed out after {loop.time() - started:.1f} s "
               f"(no answer from {args.url})")
        return EXIT_HANDSHAKE
    except HandshakeError as exc:
        _error(f"handshake failed: {exc}")
        return EXIT_HANDSHAKE
    except OSError as exc:
        _error(f"cannot reach {args.url}: {exc.strerror or exc}")
        return EXIT_ERROR
    log.info("connected to %s, server %s", args.url, tunnel.peer_fingerprint)

    lines: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=STDIN_READ_AHEAD)
    stop = threading.Event()
    # A daemon thread, so a read blocked on an interactive stdin never delays exit.
    threading.Thread(target=_read_stdin, args=(loop, lines, stop), name="palisade-stdin",
                     daemon=True).start()

    sent = received = 0
    stdin_done = False
    replies_done = asyncio.Event()
    out = sys.stdout.buffer

    async def send_lines() -> None:
        nonlocal sent, stdin_done
        while (line := await lines.get()) is not None:
            data = _strip_newline(line)
            try:
                tunnel.send(data)
            except PacketTooLargeError:
                _error(f"line {sent + 1} does not fit in one datagram ({len(data)} bytes); "
                       "skipped")
                continue
            except ConnectionClosedError:
                return  # the printer sees the close too and ends the session
            sent += 1
        stdin_done = True
        if received >= sent:
            replies_done.set()

    async def print_replies() -> None:
        nonlocal received
        async for data in tunnel:
            out.write(data + b"\n")
            out.flush()
            received += 1
            if stdin_done and received >= sent:
                replies_done.set()

    sender = asyncio.create_task(send_lines())
    printer = asyncio.create_task(print_replies())
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
                status = EXIT_ERROR
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
    if event.by_peer or event.error_code != 0:
        if event.error_code != 0 or received < sent:
            _error(f"connection closed by {'peer' if event.by_peer else 'us'}: "
                   f"{code_name(event.error_code)} {event.reason}".rstrip())
            status = EXIT_ERROR
    log.info("%s", _summary(tunnel, event))
    return status


def _cmd_connect(args: argparse.Namespace) -> int:
    return asyncio.run(_connect_main(args))


# -- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(bool(getattr(args, "verbose", False)))
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


if __name__ == "__main__":  # pragma: no cover - `python -m palisade_c` goes via __main__.py
    sys.exit(main())
