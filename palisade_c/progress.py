"""Handshake progress for slow links: bytes moved, time spent, time left.

Theory of operation
-------------------
A post-quantum handshake is about 16 KB; at 115200 baud that is 1.4 s of airtime, at 9600 baud
17 s, so a silent prompt looks hung. :class:`HandshakeProgress` watches a client
:class:`~palisade_c.connection.Connection` from the event loop (a ``call_later`` chain, never a
thread) and every ``interval`` seconds prints one status line built from the connection's own
counters (``hs_bytes_out`` / ``hs_bytes_in``) and the link speed: the remaining airtime is
``(expected - moved) * 10 / baud``, where the expected total comes from
:func:`~palisade_c.transport.base.estimate_handshake_bytes`. On a terminal the line is redrawn
in place; elsewhere (a log file, a pipe) each update is a line of its own. Whether to show it at
all is :func:`should_show`: on slow links, on a terminal, or when asked for (``-v``).
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from palisade_c.connection import Connection
from palisade_c.transport.base import estimate_handshake_bytes

__all__ = ["SLOW_LINK_BPS", "HandshakeProgress", "should_show"]

#: Links at or below this speed count as slow: a handshake takes most of a second or more.
SLOW_LINK_BPS = 250_000


def should_show(bits_per_second: float | None, stream: TextIO, verbose: bool) -> bool:
    """Whether progress is worth printing: a slow link, a terminal, or verbose output."""
    if verbose or (bits_per_second is not None and bits_per_second <= SLOW_LINK_BPS):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


class HandshakeProgress:
    """Prints a client handshake's progress every ``interval`` seconds until stopped."""

    def __init__(
        self,
        conn: Connection,
        *,
        bits_per_second: float | None = None,
        stream: TextIO | None = None,
        interval: float = 0.5,
        prefix: str = "palisade: ",
    ) -> None:
        self.conn = conn
        self.bits_per_second = bits_per_second or conn.config.link_bits_per_second
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.prefix = prefix
        self.expected = estimate_handshake_bytes(conn.config.max_datagram_size)
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._handle: asyncio.TimerHandle | None = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False
        #: Status lines printed so far.
        self.updates = 0

    def start(self) -> HandshakeProgress:
        self._started = self._loop.time()
        self._handle = self._loop.call_later(self.interval, self._tick)
        return self

    def status(self) -> str:
        """The current status line (without the prefix)."""
        sent, received = self.conn.hs_bytes_out, self.conn.hs_bytes_in
        elapsed = self._loop.time() - self._started
        text = (f"handshake {elapsed:4.1f} s: sent {_size(sent)}, received {_size(received)}")
        if self.bits_per_second:
            left = max(self.expected - sent - received, 0) * 10 / self.bits_per_second
            pct = min(100, 100 * (sent + received) // max(self.expected, 1))
            text += f" (~{pct}%, ~{left:.1f} s left at {self.bits_per_second:g} bit/s)"
        return text

    def _tick(self) -> None:
        self._handle = self._loop.call_later(self.interval, self._tick)
        if self.conn.established or self.conn.closed:
            self.stop()
            return
        self._write(self.status())

    def _write(self, text: str) -> None:
        try:
            if self._tty:
                self.stream.write(f"\r{self.prefix}{text}\x1b[K")
                self._drawn = True
            else:
                self.stream.write(f"{self.prefix}{text}\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.stop()  # stderr went away: progress is not worth failing for
            return
        self.updates += 1

    def stop(self) -> None:
        """Stop updating (idempotent); on a terminal, end the redrawn line."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._drawn:
            self._drawn = False
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass
