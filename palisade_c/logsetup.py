"""Logging for the ``palisade`` command: levels, journald, rate limits, aggregated drops.

* ``--log-level`` (or ``-v`` for ``debug``) sets the level of palisade's own loggers
  (``palisade_c`` and ``firmware_bridge``) only; every other library stays at WARNING, so
  debugging the tunnel never floods the output with asyncio's or pyserial's debug lines.
* Under systemd with stderr connected to the journal (``JOURNAL_STREAM`` names stderr),
  lines carry a ``<N>`` syslog priority prefix and no timestamp: the journal adds its own.
* Session lines (opened, closed with the reason, handshake refused with the code and the
  address) are INFO on the ``palisade_c.sessions`` logger, limited to
  :data:`SESSION_LINES_PER_INTERVAL` per :data:`SESSION_INTERVAL` seconds; what is held
  back is counted and reported in the next line that passes.
* :class:`DropReporter` writes the drop classes to the JSON event log (``--log-json``),
  aggregated: one ``drops`` event per source and interval with the counts added since the
  last one, for each session and for the endpoint itself (``truncated``, ``bad-magic``,
  ``unknown-rid``, ...), and for a gateway and its serial ports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = [
    "SESSION_INTERVAL",
    "SESSION_LINES_PER_INTERVAL",
    "DropReporter",
    "RateLimitFilter",
    "journald_stream",
    "setup_logging",
]

#: Session INFO lines allowed per interval before they are held back and counted.
SESSION_LINES_PER_INTERVAL = 20
SESSION_INTERVAL = 10.0
#: Default seconds between two aggregated drop reports in the JSON event log.
DROP_INTERVAL = 10.0
LEVELS = ("debug", "info", "warning", "error")
OWN_LOGGERS = ("palisade_c", "firmware_bridge")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def journald_stream(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (stderr) is the journal's stream (systemd sets JOURNAL_STREAM to
    the device and inode of the stream it connected; a child's redirected stderr differs)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


class RateLimitFilter(logging.Filter):
    """Lets at most ``rate`` records through per ``per`` seconds; counts the rest and says
    how many were held back in the next record that passes."""

    def __init__(self, rate: int = SESSION_LINES_PER_INTERVAL, per: float = SESSION_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.rate = rate
        self.per = per
        self.clock = clock
        self._window_start = float("-inf")
        self._count = 0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now - self._window_start >= self.per:
            self._window_start = now
            self._count = 0
        if self._count >= self.rate:
            self.suppressed += 1
            return False
        self._count += 1
        if self.suppressed:
            record.msg = f"{record.msg} [{self.suppressed} session lines suppressed before this]"
            self.suppressed = 0
        return True


def setup_logging(level: str | None, verbose: bool, stream: IO[str] | None = None) -> None:
    """Configure logging for one command run (see the module docstring)."""
    stream = stream or sys.stderr
    name = level or ("debug" if verbose else "warning")
    own_level = getattr(logging, name.upper())
    handler = logging.StreamHandler(stream)
    if journald_stream(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party libraries: warnings and errors only
    for own in OWN_LOGGERS:
        logging.getLogger(own).setLevel(own_level)
    sessions = logging.getLogger("palisade_c.sessions")
    for old_filter in list(sessions.filters):
        if isinstance(old_filter, RateLimitFilter):
            sessions.removeFilter(old_filter)
    if own_level > logging.DEBUG:
        # At debug level the operator asked for every line, session lines included.
        sessions.addFilter(RateLimitFilter())


class DropReporter:
    """Aggregates drop counters into one JSON event per source and interval.

    ``sources`` returns ``{name: drops}`` for everything that counts drops right now (the
    counters are cumulative); sources that disappear (a closed session) are reported once
    more with their last counts, by :meth:`track` holding on to their last reading.
    """

    def __init__(self, sources: Callable[[], dict[str, dict[str, int]]],
                 emit: Callable[[dict[str, Any]], None], *,
                 interval: float = DROP_INTERVAL) -> None:
        self.sources = sources
        self.emit = emit
        self.interval = interval
        self._reported: dict[str, dict[str, int]] = {}
        self._latest: dict[str, dict[str, int]] = {}
        self.events = 0

    def track(self) -> None:
        """Read the sources (often: a closed session's last counts must not be lost)."""
        for name, drops in self.sources().items():
            self._latest[name] = dict(drops)

    def report(self, now: float) -> None:
        """Emit the drops counted since the last report, one event per source."""
        self.track()
        current = set(self.sources())
        for name, drops in sorted(self._latest.items()):
            before = self._reported.get(name, {})
            delta = {k: v - before.get(k, 0) for k, v in drops.items()
                     if v - before.get(k, 0) > 0}
            if delta:
                self.emit({"t": round(now, 6), "kind": "drops", "source": name,
                           "interval": self.interval, "drops": delta})
                self.events += 1
            self._reported[name] = drops
        for gone in [n for n in self._latest if n not in current]:
            del self._latest[gone]
            self._reported.pop(gone, None)

    async def run(self, track_every: float = 1.0) -> None:
        """Track every ``track_every`` seconds and report every interval, until cancelled
        (then report once more, so nothing counted is lost at shutdown)."""
        loop = asyncio.get_running_loop()
        next_report = loop.time() + self.interval
        try:
            while True:
                await asyncio.sleep(min(track_every, self.interval))
                self.track()
                if loop.time() >= next_report:
                    self.report(loop.time())
                    next_report = loop.time() + self.interval
        finally:
            self.report(loop.time())


async def watch_gateway(snapshot: Callable[[], dict[str, Any]],
                        emit: Callable[[dict[str, Any]], None], *,
                        every: float = 1.0) -> None:
    """JSON events for a gateway's ports: ``link`` when a link goes up or down and
    ``device-reset`` when a device's boot counter changes (polled every ``every`` s)."""
    loop = asyncio.get_running_loop()
    known: dict[str, tuple[str, Any]] = {}
    while True:
        for device in snapshot().get("devices", []):
            port, link, boot = device["port"], device["link"], device.get("boot_counter")
            before = known.get(port)
            if before is None or before[0] != link:
                emit({"t": round(loop.time(), 6), "kind": "link", "source": port,
                      "node": device.get("node"), "state": link, "mtu": device.get("mtu")})
            if before is not None and boot is not None and before[1] not in (None, boot):
                emit({"t": round(loop.time(), 6), "kind": "device-reset", "source": port,
                      "node": device.get("node"), "boot_counter": boot})
            known[port] = (link, boot if boot is not None else (before or ("", None))[1])
        await asyncio.sleep(every)
