"""Resumption tickets (PALISADE-PLUS): sealing, the single-use store, and client-side storage.

Theory of operation
-------------------
After a full handshake the server sends NEW_TICKET (control frame 0x10)::

    lifetime u32 | max_early_data u32 | ticket_nonce[16] | ticket opaque<..2^16-1>

Both sides derive the ticket's PSK from their resumption secret and the nonce
(:func:`palisade_c.keyschedule.ticket_psk`), so the PSK never crosses the wire and the client
never needs the resumption secret again. The ticket itself is opaque to the client::

    key_id u32 | nonce[12] | ChaCha20-Poly1305(TicketInner), AAD = key_id ‖ server fingerprint

    TicketInner = ticket_id[16] | issued_at u64 (ms, wall clock) | lifetime u32 (s) | psk[32] |
                  max_early_data u32 | client_fingerprint[32] | kem u16 | sig u16 | aead u16

The sealing key rotates (:class:`TicketKeyRing`): tickets under the current or the previous key
open; older ones, or tickets sealed by another server (its fingerprint is in the AAD), do not.

Single use: a ticket_id is claimed at most once, atomically, in a :class:`TicketStore` that
remembers it until the ticket would have expired anyway. :class:`SqliteTicketStore` is the
embedded default, so a server restart does not reopen replays; :class:`MemoryTicketStore` is
for tests and single-process deployments; a fleet shares
:class:`palisade_c.ticketstore_redis.RedisTicketStore` (Redis ``SET NX PX``, fail closed). Keys
that outlive a process, shared by workers and hosts, live in a file
(:class:`palisade_c.ticketkeys.FileTicketKeyRing`).

Ticket time is wall-clock time (tickets outlive processes), taken from an injectable clock;
nothing here reads ``time`` unless no clock is given.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from palisade_c.errors import ConfigError, ControlFrameError
from palisade_c.frames import CTRL_NEW_TICKET, ControlFrame
from palisade_c.identity import write_atomic
from palisade_c.keyschedule import wipe

log = logging.getLogger("palisade_c.tickets")

Clock = Callable[[], float]

TICKET_NONCE_LEN = 16
DEFAULT_LIFETIME = 3600
DEFAULT_MAX_EARLY_DATA = 4096
MAX_TICKET_LEN = 1024
_INNER = struct.Struct(">16sQI32sI32sHHH")
_HEADER = struct.Struct(">I12s")
_NEW_TICKET = struct.Struct(">II16s")


@dataclass(frozen=True)
class TicketInner:
    """What only the server can read inside a ticket."""

    ticket_id: bytes
    issued_at: float  # wall-clock seconds
    lifetime: int
    psk: bytes
    max_early_data: int
    client_fingerprint: bytes  # raw 32-byte SHA3-256 of the client's public key
    kem: int
    sig: int
    aead: int

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.lifetime

    def encode(self) -> bytes:
        return _INNER.pack(self.ticket_id, int(self.issued_at * 1000), self.lifetime, self.psk,
                           self.max_early_data, self.client_fingerprint, self.kem, self.sig,
                           self.aead)

    @classmethod
    def decode(cls, data: bytes) -> TicketInner:
        if len(data) != _INNER.size:
            raise ValueError("ticket inner has the wrong size")
        tid, issued_ms, life, psk, early, fp, kem, sig, aead = _INNER.unpack(data)
        return cls(tid, issued_ms / 1000, life, psk, early, fp, kem, sig, aead)


def seal_ticket(inner: TicketInner, key_id: int, aead: ChaCha20Poly1305, nonce: bytes,
                server_fingerprint: bytes) -> bytes:
    """``key_id ‖ nonce ‖ AEAD(inner)``, the AAD binding the key id and the server's
    fingerprint: one format for every key ring (in memory or in a shared file)."""
    header = _HEADER.pack(key_id, nonce)
    return header + aead.encrypt(nonce, inner.encode(), header[:4] + server_fingerprint)


def open_ticket(ticket: object, server_fingerprint: bytes,
                lookup: Callable[[int], tuple[bytearray, ChaCha20Poly1305] | None]
                ) -> TicketInner | None:
    """The inner ticket sealed by :func:`seal_ticket` under the key ``lookup(key_id)`` gives,
    or None for anything else: wrong size, unknown key, failed tag, bad inner encoding. Never
    raises for what a peer sends."""
    if not isinstance(ticket, bytes) or not _HEADER.size < len(ticket) <= MAX_TICKET_LEN:
        return None
    key_id, nonce = _HEADER.unpack_from(ticket)
    entry = lookup(key_id)
    if entry is None:
        return None
    try:
        plain = entry[1].decrypt(nonce, ticket[_HEADER.size:], ticket[:4] + server_fingerprint)
        return TicketInner.decode(plain)
    except (InvalidTag, ValueError):
        return None


class TicketKeyRing:
    """The server's rotating ticket-sealing keys: the current one and the one before it."""

    def __init__(self, server_fingerprint: bytes, *, rotate_every: float = 3600.0,
                 rng: Callable[[int], bytes] = os.urandom, clock: Clock = time.time) -> None:
        if len(server_fingerprint) != 32:
            raise ConfigError("server fingerprint must be 32 raw bytes")
        if rotate_every <= 0:
            raise ConfigError("rotate_every must be positive")
        self._fp = server_fingerprint
        self._rng = rng
        self._clock = clock
        self._rotate_every = rotate_every
        self._keys: dict[int, tuple[bytearray, ChaCha20Poly1305]] = {}
        self._current_id = 0
        self._rotated_at = 0.0
        self.rotate()

    def rotate(self) -> None:
        """New current key; the old current stays usable for opening; older ones are wiped."""
        key_id = int.from_bytes(self._rng(4), "big")
        while key_id in self._keys:
            key_id = (key_id + 1) & 0xFFFFFFFF
        key = bytearray(self._rng(32))
        for old_id in [k for k in self._keys if k != self._current_id]:
            wipe(self._keys.pop(old_id)[0])
        self._keys[key_id] = (key, ChaCha20Poly1305(key))
        self._current_id = key_id
        self._rotated_at = self._clock()

    def _maybe_rotate(self) -> None:
        if self._clock() - self._rotated_at >= self._rotate_every:
            self.rotate()

    def seal(self, inner: TicketInner) -> bytes:
        self._maybe_rotate()
        key_id = self._current_id
        return seal_ticket(inner, key_id, self._keys[key_id][1], self._rng(12), self._fp)

    def open(self, ticket: bytes) -> TicketInner | None:
        """The inner ticket, or None for anything this server did not seal (never raises)."""
        return open_ticket(ticket, self._fp, self._keys.get)


class SealingKeys(Protocol):
    """What :class:`TicketService` needs of a key ring: :class:`TicketKeyRing` (in memory) or
    :class:`palisade_c.ticketkeys.FileTicketKeyRing` (a file shared by workers and hosts)."""

    def seal(self, inner: TicketInner) -> bytes: ...

    def open(self, ticket: bytes) -> TicketInner | None: ...


class TicketStoreUnavailable(Exception):
    """A shared store could not answer (in time): the claim is refused, never assumed."""


# -- the single-use store -------------------------------------------------------------------


class TicketStore(ABC):
    """Remembers used ticket ids until their tickets expire. Implementations must make
    :meth:`claim` atomic: of any number of concurrent claims of one id, exactly one wins."""

    @abstractmethod
    def claim(self, ticket_id: bytes, expires_at: float, now: float) -> bool:
        """Mark ``ticket_id`` used. True the first time, False for every replay."""

    @abstractmethod
    def purge(self, now: float) -> int:
        """Forget ids whose tickets have expired; returns how many."""


class MemoryTicketStore(TicketStore):
    """In-process store (tests, single-process servers). A restart forgets everything."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self._used: dict[bytes, float] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def claim(self, ticket_id: bytes, expires_at: float, now: float) -> bool:
        with self._lock:
            if ticket_id in self._used:
                return False
            if len(self._used) >= self._max:
                self._purge_locked(now)
                if len(self._used) >= self._max:
                    return False  # full of live ids: refuse rather than forget one
            self._used[ticket_id] = expires_at
            return True

    def _purge_locked(self, now: float) -> int:
        dead = [k for k, exp in self._used.items() if exp <= now]
        for k in dead:
            del self._used[k]
        return len(dead)

    def purge(self, now: float) -> int:
        with self._lock:
            return self._purge_locked(now)

    def __len__(self) -> int:
        return len(self._used)


class SqliteTicketStore(TicketStore):
    """The embedded default: a SQLite file, so used tickets stay used across restarts.

    The primary key makes the claim atomic across threads and processes sharing the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS used_tickets (id BLOB PRIMARY KEY, expires REAL NOT NULL)"
        )
        # Purging walks this index, so each batch costs what it deletes, not the table size.
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS used_tickets_by_expiry ON used_tickets (expires)"
        )

    def claim(self, ticket_id: bytes, expires_at: float, now: float) -> bool:
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO used_tickets (id, expires) VALUES (?, ?)",
                (ticket_id, expires_at),
            )
            return cur.rowcount == 1

    def purge(self, now: float, limit: int | None = None) -> int:
        """Delete ids whose tickets expired by ``now``: all of them, or at most ``limit``
        (a server purges in batches so that one call never stalls its event loop)."""
        with self._lock:
            args: tuple[float, ...]
            if limit is None:
                sql, args = "DELETE FROM used_tickets WHERE expires <= ?", (now,)
            else:
                sql = ("DELETE FROM used_tickets WHERE rowid IN (SELECT rowid FROM used_tickets"
                       " WHERE expires <= ? ORDER BY expires LIMIT ?)")
                args = (now, max(limit, 0))
            return self._db.execute(sql, args).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- the server's ticket service ------------------------------------------------------------

#: Seconds between two purges of expired used-ticket ids (sans-IO time of the endpoint).
PURGE_INTERVAL = 60.0
#: Ids deleted per purge at most; a full batch schedules the next one after PURGE_BACKLOG_DELAY.
PURGE_BATCH = 1000
PURGE_BACKLOG_DELAY = 1.0


class TicketService:
    """Everything a server needs to issue and redeem tickets: keys, store, policy, clock."""

    def __init__(self, server_fingerprint: bytes, store: TicketStore | None = None, *,
                 lifetime: int = DEFAULT_LIFETIME, max_early_data: int = DEFAULT_MAX_EARLY_DATA,
                 rotate_every: float = 3600.0, rng: Callable[[int], bytes] = os.urandom,
                 clock: Clock = time.time, keys: SealingKeys | None = None) -> None:
        if not 1 <= lifetime <= 7 * 24 * 3600:
            raise ConfigError("ticket lifetime must be 1 s .. 7 days")
        if not 0 <= max_early_data <= 1 << 20:
            raise ConfigError("max_early_data must be 0 .. 1 MiB")
        # ``keys``: a shared ring (--ticket-key); else one in memory for this process.
        self.keys: SealingKeys = keys if keys is not None else TicketKeyRing(
            server_fingerprint, rotate_every=rotate_every, rng=rng, clock=clock)
        self.store = store if store is not None else MemoryTicketStore()
        self.lifetime = lifetime
        self.max_early_data = max_early_data
        self.clock = clock

    def issue(self, psk: bytes | bytearray, nonce: bytes, client_fingerprint: bytes, kem: int,
              sig: int, aead: int) -> bytes:
        inner = TicketInner(nonce, self.clock(), self.lifetime, bytes(psk), self.max_early_data,
                            client_fingerprint, kem, sig, aead)
        return self.keys.seal(inner)

    def purge_expired(self, limit: int = PURGE_BATCH) -> int:
        """Forget at most ``limit`` used-ticket ids whose tickets have expired; returns how
        many. The server endpoint calls it from its timer (every PURGE_INTERVAL seconds, sooner
        while a backlog remains). Only the SQLite store needs it: the in-memory store purges
        itself when full, and its ids die with the process."""
        store = self.store
        if not isinstance(store, SqliteTicketStore):
            return 0
        try:
            return store.purge(self.clock(), limit)
        except sqlite3.Error as exc:
            # A locked or failing file must not take the server down with it (this runs from
            # the endpoint's timer); the next purge tries again.
            log.warning("purging used tickets from %s failed: %s", store.path, exc)
            return 0

    def redeem(self, ticket: bytes) -> tuple[TicketInner | None, str]:
        """Open, check expiry, and claim a ticket. Returns (inner, "") or (None, reason)."""
        inner = self.keys.open(ticket)
        if inner is None:
            return None, "invalid"
        now = self.clock()
        if now >= inner.expires_at or inner.issued_at > now + 60:
            return None, "expired"
        try:
            claimed = self.store.claim(inner.ticket_id, inner.expires_at, now)
        except TicketStoreUnavailable:
            return None, "store-unavailable"  # fail closed: the client does a full handshake
        if not claimed:
            return None, "replayed"
        return inner, ""


# -- NEW_TICKET and the client's view ---------------------------------------------------------


def encode_new_ticket(lifetime: int, max_early_data: int, nonce: bytes,
                      ticket: bytes) -> ControlFrame:
    if len(nonce) != TICKET_NONCE_LEN or not 0 < len(ticket) <= MAX_TICKET_LEN:
        raise ValueError("bad ticket nonce or ticket size")
    data = _NEW_TICKET.pack(lifetime, max_early_data, nonce) + struct.pack(">H", len(ticket))
    return ControlFrame(CTRL_NEW_TICKET, data + ticket)


def decode_new_ticket(frame: ControlFrame) -> tuple[int, int, bytes, bytes]:
    """``(lifetime, max_early_data, nonce, ticket)``; ControlFrameError if malformed."""
    d = frame.data
    head = _NEW_TICKET.size + 2
    if frame.ctrl_type != CTRL_NEW_TICKET or len(d) < head:
        raise ControlFrameError("NEW_TICKET too short")
    lifetime, early, nonce = _NEW_TICKET.unpack_from(d)
    (n,) = struct.unpack_from(">H", d, _NEW_TICKET.size)
    if n == 0 or n > MAX_TICKET_LEN or len(d) != head + n:
        raise ControlFrameError("NEW_TICKET ticket length mismatch")
    if lifetime == 0:
        raise ControlFrameError("NEW_TICKET lifetime is zero")
    return lifetime, early, nonce, d[head:]


@dataclass
class ClientTicket:
    """What a client keeps to resume: the opaque ticket and the PSK that goes with it."""

    ticket: bytes
    psk: bytes
    server_fingerprint: str
    expires_at: float  # wall clock
    max_early_data: int

    def usable(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["ticket"] = self.ticket.hex()
        d["psk"] = self.psk.hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, object]) -> ClientTicket:
        try:
            return cls(bytes.fromhex(str(d["ticket"])), bytes.fromhex(str(d["psk"])),
                       str(d["server_fingerprint"]), float(str(d["expires_at"])),
                       int(str(d["max_early_data"])))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"bad ticket entry: {exc}") from None


class ClientTicketCache:
    """Tickets by server fingerprint, in memory or in a 0600 JSON file (``--ticket-file``).

    Each ticket is single use: :meth:`take` removes it. The file holds PSKs, so it is written
    with the same care as a private key.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 clock: Clock = time.time) -> None:
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self._tickets: dict[str, list[ClientTicket]] = {}
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read ticket file {self.path}: {exc}") from None
        if not isinstance(raw, list):
            raise ConfigError(f"ticket file {self.path} is not a list")
        for entry in raw:
            if isinstance(entry, dict):
                t = ClientTicket.from_json(entry)
                self._tickets.setdefault(t.server_fingerprint, []).append(t)

    def _save(self) -> None:
        if self.path is None:
            return
        now = self.clock()
        data = [t.to_json() for ts in self._tickets.values() for t in ts if t.usable(now)]
        # The file holds PSKs: written like a private key (0600 from the start, synced, renamed).
        write_atomic(self.path, json.dumps(data).encode("utf-8"), 0o600, overwrite=True)

    def add(self, ticket: ClientTicket) -> None:
        bucket = self._tickets.setdefault(ticket.server_fingerprint, [])
        bucket.append(ticket)
        del bucket[:-8]  # a few per server is plenty
        self._save()

    def take(self, server_fingerprint: str | None = None) -> ClientTicket | None:
        """Remove and return the newest usable ticket (for one server, or any)."""
        now = self.clock()
        keys = [server_fingerprint] if server_fingerprint else list(self._tickets)
        for key in keys:
            bucket = self._tickets.get(key, [])
            while bucket:
                t = bucket.pop()
                if t.usable(now):
                    self._save()
                    return t
        self._save()
        return None

    def __len__(self) -> int:
        return sum(len(v) for v in self._tickets.values())
