"""A virtual serial line: two pseudo-terminals joined by a pump paced to a baud rate.

Theory of operation
-------------------
Each end of the line is a pty pair made with :func:`os.openpty`. A program opens the *slave*
side of its end, through a stable symlink (``<dir>/a`` and ``<dir>/b``), exactly as it would
open ``/dev/ttyUSB0``: the serial transport runs unmodified, pyserial and termios included. One
pump thread owns both *master* sides and copies bytes between them:

* **Pacing.** Bytes leave no faster than ``baud / 10`` per second in each direction (8N1: ten
  bit times a byte). The pump keeps, per direction, the time at which the simulated wire falls
  idle and never lets more than :data:`QUANTUM` seconds of bytes run ahead of it, so a
  receiver sees bytes arrive at line rate in small slices, as from a UART. ``baud=None`` copies
  unpaced (as fast as the ptys go).
* **Buffering.** Each direction buffers at most ``buffer`` bytes (4 KiB, about a UART driver's
  buffer). When it is full the pump stops reading from that side, the kernel's pty buffer fills
  and the sender's writes block: back-pressure, as on a real port.
* **Noise.** A :class:`Noise` flips bits, drops bytes and inserts garbage at given per-byte
  rates, from a seeded generator, on the bytes as they enter the wire. The next event is drawn
  as a geometric gap, so a clean stretch costs nothing per byte.
* **Unplug and replug.** :meth:`PtyLink.unplug` closes one end's pair: the program on it sees
  the port fail (a read error, as when a USB adapter is pulled) and its device path vanish.
  :meth:`PtyLink.replug` makes a new pair and points the same symlink at it, so a transport that
  keeps re-opening the path finds the port again. Whatever was on the wire is lost.

The pump holds a slave descriptor of each end open itself. Without it, the master would report
an error whenever no program had the port open; with it, a program may close and re-open its
port freely, as with a real device.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import select
import shutil
import tempfile
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = ["QUANTUM", "Noise", "PtyLink", "Side"]

Side = Literal["a", "b"]

#: Seconds of bytes the pump lets run ahead of the simulated wire (the pacing granularity).
QUANTUM = 0.002
#: Default per-direction buffer: about what a UART driver holds.
DEFAULT_BUFFER = 4096
_READ_CHUNK = 4096


@dataclass(frozen=True)
class Noise:
    """Line damage, as probabilities per byte that crosses the wire.

    ``bit_flip``: one random bit of the byte is inverted. ``drop``: the byte is lost.
    ``garbage``: a burst of 1..``garbage_len`` random bytes (zeros included, so it can cut a
    frame) is inserted after the byte. ``seed`` makes a run repeatable.
    """

    bit_flip: float = 0.0
    drop: float = 0.0
    garbage: float = 0.0
    garbage_len: int = 16
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("bit_flip", "drop", "garbage"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1)")
        if self.garbage_len < 1:
            raise ValueError("garbage_len must be at least 1")


class _Injector:
    """Applies a :class:`Noise` to a byte stream; counts what it did."""

    def __init__(self, noise: Noise, salt: int) -> None:
        self.noise = noise
        self._rng = random.Random(None if noise.seed is None else noise.seed * 2 + salt)
        # Bytes until the next event of each kind (geometric gaps).
        self._gaps = [self._gap(noise.bit_flip), self._gap(noise.drop), self._gap(noise.garbage)]
        self.flips = 0
        self.drops = 0
        self.garbage_bytes = 0

    def _gap(self, p: float) -> float:
        if p <= 0:
            return float("inf")
        return int(self._rng.expovariate(p))

    def apply(self, data: bytes) -> bytes:
        n = len(data)
        if min(self._gaps) >= n:
            self._gaps = [g - n for g in self._gaps]
            return data
        out = bytearray()
        noise = self.noise
        for byte in data:
            flip, drop, garbage = self._gaps
            if flip <= 0:
                byte ^= 1 << self._rng.randrange(8)
                self.flips += 1
                flip = self._gap(noise.bit_flip) + 1
            if drop <= 0:
                self.drops += 1
                drop = self._gap(noise.drop) + 1
            else:
                out.append(byte)
            if garbage <= 0:
                burst = self._rng.randbytes(self._rng.randint(1, noise.garbage_len))
                out += burst
                self.garbage_bytes += len(burst)
                garbage = self._gap(noise.garbage) + 1
            self._gaps = [flip - 1, drop - 1, garbage - 1]
        return bytes(out)


class _End:
    """One end of the line: a pty pair, its symlink, and the bytes waiting to go out of it."""

    def __init__(self, name: Side, path: Path) -> None:
        self.name = name
        self.path = path
        self.master = -1
        self.slave = -1
        self.tty = ""
        #: Bytes on their way *to* this end (read from the other end, not yet delivered).
        self.inbound = bytearray()
        #: When the wire towards this end falls idle.
        self.wire_free = 0.0
        #: Bytes delivered to this end.
        self.delivered = 0
        self.injector: _Injector | None = None

    def plug(self) -> None:
        master, slave = os.openpty()
        # Raw at once, before any program opens it: a fresh pty echoes and edits lines, and an
        # echo would send the peer's bytes straight back.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self.master, self.slave = master, slave
        self.tty = os.ttyname(slave)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.tty)
        tmp.replace(self.path)  # atomic: an opener sees the old target or the new one
        self.inbound.clear()

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = -1
        self.inbound.clear()

    @property
    def plugged(self) -> bool:
        return self.master >= 0


class PtyLink:
    """A paced, optionally noisy virtual serial line between two ends, ``a`` and ``b``.

    Use as a context manager (or call :meth:`start` and :meth:`close`). Open
    :meth:`path` of each end with any serial program, or use :meth:`url` for palisade.
    """

    def __init__(
        self,
        baud: int | None = 115200,
        *,
        noise: Noise | None = None,
        directory: str | os.PathLike[str] | None = None,
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        if baud is not None and baud <= 0:
            raise ValueError("baud must be positive (or None for an unpaced line)")
        if buffer < 64:
            raise ValueError("buffer must be at least 64 bytes")
        self.baud = baud
        self._buffer = buffer
        self._own_dir = directory is None
        self._dir = Path(tempfile.mkdtemp(prefix="palisade-pty-") if directory is None
                         else directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._ends: dict[Side, _End] = {s: _End(s, self._dir / s) for s in ("a", "b")}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.set_noise(noise)

    # -- control -------------------------------------------------------------------------------

    def start(self) -> Self:
        """Create both ends and start the pump. Returns self."""
        if self._thread is not None:
            return self
        with self._lock:
            for end in self._ends.values():
                end.plug()
        self._thread = threading.Thread(target=self._pump, name="pty-link", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the pump and remove both ends (idempotent)."""
        self._stop = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with self._lock:
            for end in self._ends.values():
                end.unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def path(self, side: Side) -> str:
        """The stable device path of one end (a symlink to its current pty)."""
        return str(self._ends[side].path)

    def url(self, side: Side, **params: object) -> str:
        """``serial://`` URL of one end; ``baud`` is this line's, other parameters as given."""
        query = {"baud": str(self.baud if self.baud is not None else 4_000_000)}
        query.update({k: str(v) for k, v in params.items()})
        return f"serial://{self.path(side)}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def set_noise(self, noise: Noise | None) -> None:
        """Damage bytes from now on (None: a clean line again). Both directions, independently."""
        with self._lock:
            for salt, end in enumerate(self._ends.values()):
                end.injector = None if noise is None else _Injector(noise, salt)

    def unplug(self, side: Side) -> None:
        """Pull one end's cable: its program sees the port fail and the path disappear."""
        with self._lock:
            self._ends[side].unplug()
            # Bytes on their way from this end are lost with it.
            other = self._ends["b" if side == "a" else "a"]
            other.inbound.clear()
        self._poke()

    def replug(self, side: Side) -> None:
        """Put one end back: a new pty behind the same path."""
        with self._lock:
            end = self._ends[side]
            if end.plugged:
                end.unplug()
            end.plug()
        self._poke()

    @property
    def counters(self) -> dict[str, int]:
        """Bytes delivered per direction and the damage done so far."""
        a, b = self._ends["a"], self._ends["b"]
        out = {"a_to_b": b.delivered, "b_to_a": a.delivered,
               "bit_flips": 0, "dropped": 0, "garbage": 0}
        for end in (a, b):
            if end.injector is not None:
                out["bit_flips"] += end.injector.flips
                out["dropped"] += end.injector.drops
                out["garbage"] += end.injector.garbage_bytes
        return out

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- the pump --------------------------------------------------------------------------------

    def _pump(self) -> None:
        ends = self._ends
        rate = None if self.baud is None else self.baud / 10.0
        while not self._stop:
            now = time.monotonic()
            timeout: float | None = None
            readers: list[int] = [self._wake_r]
            writers: list[int] = []
            with self._lock:
                for dst in ends.values():
                    src = ends["a" if dst.name == "b" else "b"]
                    if dst.inbound and dst.plugged:
                        wait = self._deliver(dst, now, rate)
                        if wait is not None:
                            if wait == 0.0:
                                writers.append(dst.master)  # the pty is full: wait for room
                            else:
                                timeout = wait if timeout is None else min(timeout, wait)
                    if src.plugged and len(dst.inbound) < self._buffer:
                        readers.append(src.master)
            try:
                readable, _writable, _ = select.select(readers, writers, [], timeout)
            except (OSError, ValueError):
                continue  # an end was unplugged under us; recompute
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 1024)
            with self._lock:
                for src in ends.values():
                    if src.plugged and src.master in readable:
                        dst = ends["a" if src.name == "b" else "b"]
                        self._take(src, dst)

    def _take(self, src: _End, dst: _End) -> None:
        room = self._buffer - len(dst.inbound)
        if room <= 0:
            return
        try:
            data = os.read(src.master, min(room, _READ_CHUNK))
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                return  # no slave open right now (cannot happen while we hold one)
            raise
        injector = dst.injector
        if injector is not None and data:
            data = injector.apply(data)
        # The noise may add bytes; the bound is what we read, give or take one burst.
        dst.inbound += data

    def _deliver(self, dst: _End, now: float, rate: float | None) -> float | None:
        """Move what the wire allows into ``dst``. Returns how long until more may go
        (None: everything went; 0.0: the pty is full, wait until it is writable)."""
        if rate is None:
            chunk = len(dst.inbound)
        else:
            ahead = dst.wire_free - now
            if ahead > QUANTUM:
                return ahead - QUANTUM
            # An idle wire does not bank credit: it restarts from now.
            dst.wire_free = max(dst.wire_free, now)
            chunk = min(len(dst.inbound), max(1, int(rate * (QUANTUM - max(ahead, 0.0)))))
        try:
            n = os.write(dst.master, bytes(dst.inbound[:chunk]))
        except BlockingIOError:
            return 0.0
        except OSError:
            dst.inbound.clear()  # the end went away; the bytes are lost with it
            return None
        del dst.inbound[:n]
        dst.delivered += n
        if rate is not None:
            dst.wire_free += n / rate
            if dst.inbound:
                return max(dst.wire_free - time.monotonic() - QUANTUM, 0.0001)
        if dst.inbound:
            return 0.0 if n < chunk else 0.0001
        return None
