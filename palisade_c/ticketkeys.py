"""A ticket key ring kept in a file (``palisade serve --ticket-key FILE``), shared by every worker
process and every host that reads the same file, and kept across restarts.

Theory of operation
-------------------
The file (mode 0600, written atomically) is JSON::

    {"palisade-ticket-keys": 1,
     "keys": [{"id": u32, "created": wall-clock seconds, "key": 64 hex digits}, ...]}

oldest first; the last key is the current one and seals new tickets, every key opens. When the
current key is ``rotate_every`` old, whichever process notices first appends a new key under an
exclusive ``flock`` on ``FILE.lock`` (so two workers never both rotate) and drops keys nobody
needs any more: a key stays for ``lifetime`` (plus a minute of clock skew) after its successor
was made, so a ticket sealed just before a rotation opens for its whole lifetime. With
``rotate_every >= lifetime`` that is the current key and the previous one.

Each process re-reads the file when it changes (checked at most once per ``recheck`` seconds,
and at once when a ticket names a key id it does not hold: another process may have rotated),
so every holder of the file opens every other's tickets. Ticket sealing itself is unchanged
(:class:`palisade_c.tickets.TicketKeyRing` describes it; the server fingerprint stays in the
AAD, so the hosts of a fleet share the identity key as well as this file).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from palisade_c.errors import ConfigError
from palisade_c.identity import write_atomic
from palisade_c.keyschedule import wipe
from palisade_c.tickets import (
    DEFAULT_LIFETIME,
    Clock,
    TicketInner,
    open_ticket,
    seal_ticket,
)

log = logging.getLogger("palisade_c.tickets")

FORMAT = 1
CLOCK_SKEW = 60.0
MAX_KEYS = 16


class FileTicketKeyRing:
    """Ticket-sealing keys read from, and rotated in, a shared 0600 file."""

    def __init__(self, path: str | os.PathLike[str], server_fingerprint: bytes, *,
                 rotate_every: float = 3600.0, lifetime: float = DEFAULT_LIFETIME,
                 rng: Callable[[int], bytes] = os.urandom, clock: Clock = time.time,
                 recheck: float = 1.0) -> None:
        if len(server_fingerprint) != 32:
            raise ConfigError("server fingerprint must be 32 raw bytes")
        if rotate_every <= 0 or lifetime <= 0:
            raise ConfigError("rotate_every and lifetime must be positive")
        self.path = Path(path)
        self._fp = server_fingerprint
        self._rotate_every = rotate_every
        self._lifetime = lifetime
        self._rng = rng
        self._clock = clock
        self._recheck = recheck
        self._keys: dict[int, tuple[bytearray, ChaCha20Poly1305]] = {}
        self._current = 0
        self._current_created = 0.0
        self._seen: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._refresh(force=True)

    # -- the file ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> list[tuple[int, float, bytes]] | None:
        """The keys in the file (oldest first), or None when there is no file."""
        try:
            st = os.stat(self.path)
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read ticket key file {self.path}: {exc}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"ticket key file {self.path} is readable by others "
                              f"(chmod 600 it)")
        try:
            doc = json.loads(raw)
            if doc.get("palisade-ticket-keys") != FORMAT:
                raise ValueError("not a palisade ticket key file")
            keys = [(int(k["id"]), float(k["created"]), bytes.fromhex(k["key"]))
                    for k in doc["keys"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"bad ticket key file {self.path}: {exc}") from None
        if not keys or len(keys) > MAX_KEYS or any(
                len(k) != 32 or not 0 <= i <= 0xFFFFFFFF for i, _, k in keys):
            raise ConfigError(f"bad ticket key file {self.path}: bad key list")
        return keys

    def _write(self, keys: list[tuple[int, float, bytes]]) -> None:
        doc = {"palisade-ticket-keys": FORMAT,
               "keys": [{"id": i, "created": c, "key": k.hex()} for i, c, k in keys]}
        write_atomic(self.path, json.dumps(doc).encode(), 0o600, overwrite=True)

    def _new_key(self, keys: list[tuple[int, float, bytes]], now: float) -> None:
        key_id = int.from_bytes(self._rng(4), "big")
        while any(i == key_id for i, _, _ in keys):
            key_id = (key_id + 1) & 0xFFFFFFFF
        keys.append((key_id, now, self._rng(32)))
        # Keep a key while a ticket it sealed may still be alive: until its successor has been
        # current for a whole lifetime.
        keep_after = now - self._lifetime - CLOCK_SKEW
        while len(keys) > 1 and (keys[1][1] < keep_after or len(keys) > MAX_KEYS):
            del keys[0]

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self, keys: list[tuple[int, float, bytes]]) -> None:
        old = self._keys
        self._keys = {}
        for key_id, _created, key in keys:
            prev = old.pop(key_id, None)
            if prev is not None and bytes(prev[0]) == key:
                self._keys[key_id] = prev
            else:
                buf = bytearray(key)
                self._keys[key_id] = (buf, ChaCha20Poly1305(buf))
                if prev is not None:
                    wipe(prev[0])
        for buf, _aead in old.values():
            wipe(buf)  # keys that left the ring are erased from memory too
        self._current, self._current_created = keys[-1][0], keys[-1][1]

    def _refresh(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._recheck
        try:
            sig = self._signature()
            if sig is None or sig != self._seen:
                keys = self._read()
                if keys is None:
                    with self._locked():
                        keys = self._read()
                        if keys is None:  # nobody made it meanwhile
                            keys = []
                            self._new_key(keys, now)
                            self._write(keys)
                self._load(keys)
                self._seen = self._signature()
            if now >= self._current_created + self._rotate_every:
                self._rotate(now, force=False)
        except (ConfigError, OSError) as exc:
            if not self._keys:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"ticket key file {self.path}: {exc}") from None
            # Serving goes on with the keys already held; the file is retried next time.
            log.warning("ticket key file %s: %s (keeping the keys held)", self.path, exc)

    def _rotate(self, now: float, *, force: bool) -> None:
        with self._locked():
            keys = self._read() or []
            if force or not keys or now >= keys[-1][1] + self._rotate_every:
                self._new_key(keys, now)
                self._write(keys)
            self._load(keys)
            self._seen = self._signature()

    def rotate(self) -> None:
        """Make a new current key now (the previous ones stay for a lifetime)."""
        self._rotate(self._clock(), force=True)

    # -- SealingKeys ------------------------------------------------------------------------

    def seal(self, inner: TicketInner) -> bytes:
        self._refresh()
        return seal_ticket(inner, self._current, self._keys[self._current][1], self._rng(12),
                           self._fp)

    def open(self, ticket: bytes) -> TicketInner | None:
        """The inner ticket, or None for anything no key in the file sealed (never raises
        for what a peer sends; a key file made unreadable raises ConfigError)."""
        self._refresh()
        return open_ticket(ticket, self._fp, self._lookup)

    def _lookup(self, key_id: int) -> tuple[bytearray, ChaCha20Poly1305] | None:
        if key_id not in self._keys:
            self._refresh(force=True)  # one stat: another process may have rotated
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> list[int]:
        """The ids of the keys held (tests and diagnostics)."""
        return list(self._keys)
