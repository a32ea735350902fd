"""Handshake delivery over datagrams: reassembly, acks, retransmission and address checks.

Theory of operation
-------------------
Handshake messages (CH, SH, CF and the resumption forms) travel in cleartext "QH" records and are
split to the datagram size of the transport (PROFILE §4). Everything here is sans-IO: time comes
in as ``now`` (seconds, any monotonic origin) and randomness as an injected ``random.Random``-like
object, so the same code runs over UDP, over the serial bridge and inside tests.

Receiving side
    :class:`Reassembler` rebuilds ONE message. The first fragment fixes (msg_type, msg_seq,
    msg_length) and one ``bytearray(msg_length)`` is allocated, so memory never exceeds
    ``max_message`` however the peer slices or repeats its fragments. Held bytes are a sorted list
    of merged half-open ranges. An exact or contained repeat is a harmless duplicate; a fragment
    whose bytes disagree with bytes already held is malformed and leaves the state untouched (the
    first copy wins). :class:`ReassemblyTable` keys reassemblers by (rid, msg_type, msg_seq) under
    a hard cap: beyond it new messages are refused and counted, existing work is never evicted,
    and entries older than ``max_age`` are purged. A finished message gives its buffer back at once
    and leaves only a small bounded marker, so its late repeats are answered with a full ack
    instead of being assembled and delivered a second time.

Sending side
    A :class:`Flight` is the set of records carrying one message. The receiver's
    :class:`~palisade_c.hsrecord.HandshakeAck` lists the byte ranges it holds, and the sender
    resends only the records that no acked range covers. :class:`RetransmitTimer` schedules those
    resends with exponential back-off and jitter; on a slow serial link its first timeout is
    stretched to twice the time the flight needs to cross the wire.

Before the address is proven
    :class:`AmplificationLimiter` keeps a server from sending more than ``factor`` times the bytes
    it received from an unvalidated address (PROFILE §8 uses 3, as QUIC does).
    :class:`CookieIssuer` makes stateless retry cookies so a server under load can demand proof of
    address before it allocates anything for a ClientHello.
"""

from __future__ import annotations

import hmac as _stdlib_hmac
import ipaddress
import struct
from collections.abc import Iterable
from enum import Enum
from typing import NamedTuple, Protocol

from cryptography.hazmat.primitives import hashes, hmac

from palisade_c.errors import ConfigError, DecodeError, ErrorCode, StateError
from palisade_c.hsrecord import (
    ACK_MAX_RANGES,
    HS_RECORD_OVERHEAD,
    MAX_MESSAGE,
    MSG_CLIENT_FINISHED_RESUME,
    MSG_CLIENT_HELLO,
    HandshakeAck,
    HandshakeRecord,
    decode,
    fragment_message,
)

__all__ = [
    "COMPACT_COOKIE_LEN",
    "COOKIE_LEN",
    "AmplificationLimiter",
    "CookieIssuer",
    "Flight",
    "FragmentResult",
    "FragmentStatus",
    "RandomSource",
    "Reassembler",
    "ReassemblyKey",
    "ReassemblyTable",
    "RetransmitTimer",
    "link_rto_floor",
    "serialization_time",
]

_MALFORMED = ErrorCode.ErrorMalformedPacket

# Each handshake message seen by a reassembler may arrive in at most this many distinct
# fragments. 16 KiB at the 512-byte serial MTU needs 35; the bound keeps range bookkeeping small
# against a peer that sends one-byte slices [profile].
DEFAULT_MAX_FRAGMENTS = 64


def _is_reassembled_type(msg_type: int) -> bool:
    return MSG_CLIENT_HELLO <= msg_type <= MSG_CLIENT_FINISHED_RESUME


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge half-open ranges, joining ranges that touch; drops empty ones."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


# --- receiving ----------------------------------------------------------------------------------


class Reassembler:
    """Rebuilds one handshake message from its fragments, within ``max_message`` bytes."""

    __slots__ = (
        "_buf",
        "_complete",
        "_fragments",
        "_max_fragments",
        "_max_message",
        "_msg_length",
        "_msg_seq",
        "_msg_type",
        "_ranges",
        "duplicates",
        "rejected",
    )

    def __init__(
        self, max_message: int = MAX_MESSAGE, max_fragments: int = DEFAULT_MAX_FRAGMENTS
    ) -> None:
        if not 0 <= max_message <= MAX_MESSAGE:
            raise ConfigError(f"max_message must be in 0..{MAX_MESSAGE}")
        if max_fragments < 1:
            raise ConfigError("max_fragments must be at least 1")
        self._max_message = max_message
        self._max_fragments = max_fragments
        self._msg_type: int | None = None
        self._msg_seq = 0
        self._msg_length = 0
        self._buf = bytearray()
        self._ranges: list[tuple[int, int]] = []
        self._fragments = 0
        self._complete = False
        #: Fragments that brought no new byte.
        self.duplicates = 0
        #: Fragments refused as malformed (each one also raised DecodeError).
        self.rejected = 0

    def _reject(self, why: str) -> DecodeError:
        self.rejected += 1
        return DecodeError(f"handshake reassembly: {why}", _MALFORMED)

    def add(self, record: HandshakeRecord) -> bytes | None:
        """Take one decoded fragment. Returns the whole message on the call that completes it,
        else None. A fragment that contradicts what is held raises DecodeError
        (ErrorMalformedPacket) and changes nothing, so the caller can count it and go on."""
        start, end = record.frag_offset, record.frag_end
        if self._msg_type is None:
            if not _is_reassembled_type(record.msg_type):
                raise self._reject("acks and error responses are not reassembled")
            # Bounded memory: the one allocation is sized by a length we have agreed to hold.
            if record.msg_length > self._max_message:
                raise self._reject("msg_length over the reassembly limit")
            self._msg_type = record.msg_type
            self._msg_seq = record.msg_seq
            self._msg_length = record.msg_length
            self._buf = bytearray(record.msg_length)
        elif (record.msg_type, record.msg_seq) != (self._msg_type, self._msg_seq):
            raise self._reject("fragment belongs to another message")
        elif record.msg_length != self._msg_length:
            raise self._reject("msg_length differs from earlier fragments")

        if start == end:
            # Only an empty message has an empty fragment (the decoder enforces it).
            if self._complete:
                self.duplicates += 1
                return None
            self._complete = True
            return b""

        frag = record.fragment
        ranges = self._ranges
        if (not ranges and start == 0) or (len(ranges) == 1 and ranges[0] == (0, start)):
            # The common case: fragments arriving in order. No overlap is possible.
            if self._fragments >= self._max_fragments:
                raise self._reject("too many fragments for one message")
            self._buf[start:end] = frag
            self._fragments += 1
            self._ranges = [(0, end)]
            if end == self._msg_length:
                self._complete = True
                return bytes(self._buf)
            return None
        contained = False
        for r_start, r_end in self._ranges:
            lo, hi = max(start, r_start), min(end, r_end)
            if lo >= hi:
                continue
            # Overlaps must repeat the same bytes: a peer (or forger) that rewrites part of a
            # message would otherwise change what was already checked or hashed.
            if self._buf[lo:hi] != frag[lo - start : hi - start]:
                raise self._reject("overlapping fragment carries different bytes")
            if r_start <= start and end <= r_end:
                contained = True
        if contained:
            self.duplicates += 1
            return None
        if self._fragments >= self._max_fragments:
            raise self._reject("too many fragments for one message")

        self._buf[start:end] = frag
        self._fragments += 1
        self._ranges = _merge_ranges([*self._ranges, (start, end)])
        if self._ranges == [(0, self._msg_length)]:
            self._complete = True
            return bytes(self._buf)
        return None

    @property
    def started(self) -> bool:
        """True once a first fragment has been accepted."""
        return self._msg_type is not None

    @property
    def is_complete(self) -> bool:
        return self._complete

    @property
    def message(self) -> bytes | None:
        """The message once complete, else None."""
        return bytes(self._buf) if self._complete else None

    @property
    def msg_type(self) -> int | None:
        return self._msg_type

    @property
    def msg_seq(self) -> int:
        return self._msg_seq

    @property
    def msg_length(self) -> int:
        return self._msg_length

    @property
    def bytes_held(self) -> int:
        return sum(end - start for start, end in self._ranges)

    def ranges(self) -> list[tuple[int, int]]:
        """The byte ranges held so far: sorted, merged, half-open."""
        return list(self._ranges)

    def ack(self) -> HandshakeAck:
        """The ack to send for this message. Past 16 ranges only the lowest 16 are listed; the
        sender then resends everything above them too, which is wasteful but never wrong."""
        if self._msg_type is None:
            raise StateError("no fragment received yet, nothing to acknowledge")
        return HandshakeAck(self._msg_type, self._msg_seq, self._ranges[:ACK_MAX_RANGES])


ReassemblyKey = tuple[bytes, int, int]
"""(rid, msg_type, msg_seq): what identifies one message being reassembled."""


class FragmentStatus(Enum):
    PARTIAL = "partial"  # new bytes stored, message still incomplete
    COMPLETE = "complete"  # this fragment completed the message (message attached)
    DUPLICATE = "duplicate"  # nothing new
    MALFORMED = "malformed"  # contradicts what is held; ignored and counted
    REFUSED = "refused"  # the table is full; nothing stored


class FragmentResult(NamedTuple):
    status: FragmentStatus
    #: The reassembled message when status is COMPLETE.
    message: bytes | None = None
    #: What to acknowledge now (None for MALFORMED, REFUSED, and for acks and errors, which are
    #: never acknowledged).
    ack: HandshakeAck | None = None


class ReassemblyTable:
    """Reassemblers for many messages at once, keyed by (rid, msg_type, msg_seq), hard-capped.

    Worst-case memory is ``max_messages * max_message`` bytes of buffers. When the table is full a
    new message is refused rather than evicting one in progress, so a flood cannot push out a
    legitimate handshake; ``refused`` rising is the endpoint's signal to demand cookies.

    A finished message gives up its buffer at once and leaves only a small marker (its key and
    length, at most ``max_completed`` of them, oldest dropped first), so a peer's late
    retransmissions come back as DUPLICATE with a full ack instead of starting the message over.
    Each message is therefore delivered once, unless its marker was pushed out or discarded.
    """

    def __init__(
        self,
        max_messages: int,
        *,
        max_message: int = MAX_MESSAGE,
        max_fragments: int = DEFAULT_MAX_FRAGMENTS,
        max_age: float | None = None,
        max_completed: int | None = None,
    ) -> None:
        if max_messages < 1:
            raise ConfigError("max_messages must be at least 1")
        if max_age is not None and max_age <= 0:
            raise ConfigError("max_age must be positive")
        if max_completed is not None and max_completed < 0:
            raise ConfigError("max_completed must not be negative")
        # Checked here so a bad value fails at construction, not at the first packet.
        Reassembler(max_message, max_fragments)
        self._max_messages = max_messages
        self._max_message = max_message
        self._max_fragments = max_fragments
        self._max_age = max_age
        self._max_completed = max_messages if max_completed is None else max_completed
        self._entries: dict[ReassemblyKey, tuple[float, Reassembler]] = {}
        # key -> (completion time, msg_length); insertion order is age order.
        self._completed: dict[ReassemblyKey, tuple[float, int]] = {}
        self.refused = 0
        self.malformed = 0
        self.expired = 0

    def __len__(self) -> int:
        """Messages in progress (completed markers are not counted)."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def add(self, record: HandshakeRecord, now: float = 0.0, *, ack: bool = True
            ) -> FragmentResult:
        """Feed one decoded record. Never raises for anything a peer can send.

        With ``ack=False`` the result carries no ack for a partial message (the caller builds
        one later from :meth:`get`, when it actually sends it)."""
        msg_type = record.msg_type
        if not MSG_CLIENT_HELLO <= msg_type <= MSG_CLIENT_FINISHED_RESUME:
            # Acks and ErrorResponses always arrive whole (the decoder enforces it) and are
            # neither reassembled nor acknowledged.
            return FragmentResult(FragmentStatus.COMPLETE, record.fragment)
        key: ReassemblyKey = (record.rid, msg_type, record.msg_seq)
        done = self._completed.get(key)
        if done is not None:
            if record.msg_length != done[1]:
                self.malformed += 1
                return FragmentResult(FragmentStatus.MALFORMED)
            return FragmentResult(FragmentStatus.DUPLICATE, None, _full_ack(key, done[1]))
        entry = self._entries.get(key)
        if entry is None:
            if record.is_complete_message:
                # One record holds the whole message: no buffer is ever allocated for it.
                if record.msg_length > self._max_message:
                    self.malformed += 1
                    return FragmentResult(FragmentStatus.MALFORMED)
                self._mark_completed(key, now, record.msg_length)
                return FragmentResult(FragmentStatus.COMPLETE, record.fragment,
                                      _full_ack(key, record.msg_length))
            if len(self._entries) >= self._max_messages:
                self.expire(now)
            if len(self._entries) >= self._max_messages:
                self.refused += 1
                return FragmentResult(FragmentStatus.REFUSED)
            reasm = Reassembler(self._max_message, self._max_fragments)
            created = now
        else:
            created, reasm = entry
        duplicates_before = reasm.duplicates
        try:
            message = reasm.add(record)
        except DecodeError:
            self.malformed += 1
            return FragmentResult(FragmentStatus.MALFORMED)
        if message is not None:
            self._entries.pop(key, None)
            self._mark_completed(key, now, reasm.msg_length)
            return FragmentResult(FragmentStatus.COMPLETE, message, _full_ack(key, len(message)))
        self._entries[key] = (created, reasm)
        status = (FragmentStatus.DUPLICATE if reasm.duplicates != duplicates_before
                  else FragmentStatus.PARTIAL)
        return FragmentResult(status, None, reasm.ack() if ack else None)

    def _mark_completed(self, key: ReassemblyKey, now: float, msg_length: int) -> None:
        if self._max_completed == 0:
            return
        while len(self._completed) >= self._max_completed:
            del self._completed[next(iter(self._completed))]
        self._completed[key] = (now, msg_length)

    def get(self, key: ReassemblyKey) -> Reassembler | None:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def pop(self, key: ReassemblyKey) -> Reassembler | None:
        entry = self._entries.pop(key, None)
        return entry[1] if entry is not None else None

    def is_completed(self, key: ReassemblyKey) -> bool:
        """True while the table remembers delivering this message."""
        return key in self._completed

    def discard_rid(self, rid: bytes) -> int:
        """Forget everything about ``rid`` (handshake done or aborted): partial messages and
        completed markers. Returns how many partial messages were dropped."""
        doomed = [k for k in self._entries if k[0] == rid]
        for k in doomed:
            del self._entries[k]
        for k in [k for k in self._completed if k[0] == rid]:
            del self._completed[k]
        return len(doomed)

    def expire(self, now: float) -> int:
        """Drop partial messages whose first fragment is older than ``max_age`` (and completed
        markers older than that). Returns how many partial messages were dropped."""
        if self._max_age is None:
            return 0
        limit = now - self._max_age
        doomed = [k for k, (created, _) in self._entries.items() if created < limit]
        for k in doomed:
            del self._entries[k]
        for k in [k for k, (at, _) in self._completed.items() if at < limit]:
            del self._completed[k]
        self.expired += len(doomed)
        return len(doomed)


def _full_ack(key: ReassemblyKey, msg_length: int) -> HandshakeAck:
    return HandshakeAck(key[1], key[2], [(0, msg_length)] if msg_length else [])


# --- sending ------------------------------------------------------------------------------------


class Flight:
    """The records that carry one handshake message, as sent together and resent together."""

    __slots__ = ("_last_ack", "_msg_length", "_msg_seq", "_msg_type", "_rid", "_spans")

    def __init__(self, records: Iterable[bytes]) -> None:
        spans: list[tuple[bytes, int, int]] = []
        ident: tuple[bytes, int, int, int] | None = None
        for raw in records:
            try:
                rec = decode(raw)
            except DecodeError as exc:
                raise ConfigError(f"flight holds an invalid record: {exc}") from exc
            this = (rec.rid, rec.msg_type, rec.msg_seq, rec.msg_length)
            if ident is None:
                ident = this
            elif this != ident:
                raise ConfigError("a flight carries the records of exactly one message")
            spans.append((bytes(raw), rec.frag_offset, rec.frag_end))
        if ident is None:
            raise ConfigError("a flight needs at least one record")
        if not _is_reassembled_type(ident[1]):
            raise ConfigError("acks and error responses are not sent as flights")
        self._rid, self._msg_type, self._msg_seq, self._msg_length = ident
        self._spans = spans
        self._last_ack: list[tuple[int, int]] | None = None

    @classmethod
    def from_message(
        cls, msg_type: int, rid: bytes, msg_seq: int, message: bytes, max_datagram: int
    ) -> Flight:
        records = fragment_message(msg_type, rid, msg_seq, message, max_datagram)
        if not _is_reassembled_type(msg_type):
            raise ConfigError("acks and error responses are not sent as flights")
        # fragment_message fills records greedily in order, so each record's span follows
        # from its size; no need to decode what was just encoded.
        flight = cls.__new__(cls)
        spans: list[tuple[bytes, int, int]] = []
        offset = 0
        for raw in records:
            end = offset + len(raw) - HS_RECORD_OVERHEAD
            spans.append((raw, offset, end))
            offset = end
        flight._rid, flight._msg_type, flight._msg_seq = rid, msg_type, msg_seq
        flight._msg_length = len(message)
        flight._spans = spans
        flight._last_ack = None
        return flight

    @property
    def records(self) -> tuple[bytes, ...]:
        return tuple(raw for raw, _, _ in self._spans)

    @property
    def rid(self) -> bytes:
        return self._rid

    @property
    def msg_type(self) -> int:
        return self._msg_type

    @property
    def msg_seq(self) -> int:
        return self._msg_seq

    @property
    def msg_length(self) -> int:
        return self._msg_length

    @property
    def total_bytes(self) -> int:
        """Bytes on the wire for the whole flight (what the link timer scales with)."""
        return sum(len(raw) for raw, _, _ in self._spans)

    def matches(self, ack: HandshakeAck) -> bool:
        return ack.acked_type == self._msg_type and ack.acked_seq == self._msg_seq

    def on_ack(self, ack: HandshakeAck) -> bool:
        """Remember the peer's latest ack for this message; False if it names another message.

        The latest ack replaces earlier ones instead of being added to them: a receiver that
        dropped its partial state (expiry, restart) reports less than before, and trusting an
        old ack would then leave bytes that nobody resends. Reordered acks only cost a resend.
        """
        if not self.matches(ack):
            return False
        self._last_ack = list(ack.ranges)
        return True

    def records_to_resend(self, ack_ranges: Iterable[tuple[int, int]] | None = None) -> list[bytes]:
        """Records not covered by ``ack_ranges`` (default: the latest ack given to on_ack).
        With no ack information at all, every record."""
        if ack_ranges is None:
            if self._last_ack is None:
                return [raw for raw, _, _ in self._spans]
            ack_ranges = self._last_ack
        merged = _merge_ranges(ack_ranges)
        return [raw for raw, s, e in self._spans if not _covered(merged, s, e)]

    @property
    def acknowledged(self) -> bool:
        """True when the latest ack covers every record (the timer can stop)."""
        return self._last_ack is not None and not self.records_to_resend()


def _covered(merged: list[tuple[int, int]], start: int, end: int) -> bool:
    if start == end:
        # An empty message's only record: any ack for this message proves it arrived.
        return True
    return any(r_start <= start and end <= r_end for r_start, r_end in merged)


class RandomSource(Protocol):
    """What the timer needs from ``random.Random`` (or ``secrets.SystemRandom``)."""

    def random(self) -> float: ...


# A UART in 8N1 framing spends 10 bit times per byte (start + 8 data + stop).
LINK_BITS_PER_BYTE = 10
# On a slow link the first timeout is at least this many flight serialization times [profile].
LINK_RTO_FACTOR = 2.0


def serialization_time(bytes_in_flight: int, bits_per_second: float) -> float:
    """Seconds a link of ``bits_per_second`` needs to clock out ``bytes_in_flight`` bytes."""
    if bits_per_second <= 0:
        raise ConfigError("bits_per_second must be positive")
    if bytes_in_flight < 0:
        raise ConfigError("bytes_in_flight must not be negative")
    return bytes_in_flight * LINK_BITS_PER_BYTE / bits_per_second


def link_rto_floor(bytes_in_flight: int, bits_per_second: float | None) -> float:
    """The smallest sensible timeout for a flight on this link (0 when the speed is unknown).

    Without it a 9600-baud serial link would time out long before a 3 KB ClientHello has even
    left the UART, and every retransmission would queue behind the first copy.
    """
    if bits_per_second is None:
        return 0.0
    return LINK_RTO_FACTOR * serialization_time(bytes_in_flight, bits_per_second)


class RetransmitTimer:
    """Exponential back-off with jitter for one flight (sans-IO).

    Transition table (``now`` is always supplied by the caller)::

        state    event                          action                          next
        IDLE     start(now)                     attempts=0, rto=initial, arm    RUNNING
        RUNNING  on_timeout(now) [attempts<max] attempts+=1, rto*=2, arm; True  RUNNING
        RUNNING  on_timeout(now) [attempts=max] disarm; False (give up)         IDLE
        any      stop()                         disarm                          IDLE

    Arming sets ``deadline = now + clamp(rto * U(1 - jitter, 1 + jitter))`` where the clamp keeps
    the delay within [floor, max(maximum, floor)]; ``floor`` comes from :meth:`scale_for_link`.
    ``max_attempts`` counts resends, so the default 7 gives up after about 32 s on a fast link.
    """

    __slots__ = (
        "_attempts",
        "_deadline",
        "_floor",
        "_initial",
        "_jitter",
        "_max_attempts",
        "_maximum",
        "_rng",
        "_rto",
    )

    def __init__(
        self,
        rng: RandomSource,
        *,
        initial: float = 0.25,
        maximum: float = 8.0,
        max_attempts: int = 7,
        jitter: float = 0.25,
    ) -> None:
        if initial <= 0:
            raise ConfigError("initial timeout must be positive")
        if maximum < initial:
            raise ConfigError("maximum timeout must be at least the initial one")
        if max_attempts < 0:
            raise ConfigError("max_attempts must not be negative")
        if not 0 <= jitter < 1:
            raise ConfigError("jitter must be in [0, 1)")
        self._rng = rng
        self._initial = initial
        self._maximum = maximum
        self._max_attempts = max_attempts
        self._jitter = jitter
        self._floor = 0.0
        self._rto = initial
        self._attempts = 0
        self._deadline: float | None = None

    def scale_for_link(self, bytes_in_flight: int, bits_per_second: float | None) -> None:
        """Stretch the timeouts for a slow link; takes effect at the next arm. Call it with the
        flight's wire size whenever a new flight starts (None means a fast or unknown link)."""
        self._floor = link_rto_floor(bytes_in_flight, bits_per_second)

    @property
    def floor(self) -> float:
        return self._floor

    @property
    def deadline(self) -> float | None:
        """When on_timeout is due, or None when the timer is not running."""
        return self._deadline

    @property
    def attempts(self) -> int:
        """Resends so far in this run."""
        return self._attempts

    @property
    def rto(self) -> float:
        """The current base timeout, before jitter and clamping."""
        return self._rto

    @property
    def running(self) -> bool:
        return self._deadline is not None

    def due(self, now: float) -> bool:
        return self._deadline is not None and now >= self._deadline

    def _arm(self, now: float) -> None:
        factor = 1.0 + self._jitter * (2.0 * self._rng.random() - 1.0)
        ceiling = max(self._maximum, self._floor)
        delay = min(max(self._rto * factor, self._floor), ceiling)
        self._deadline = now + delay

    def start(self, now: float) -> None:
        """(Re)start for a new flight."""
        self._attempts = 0
        self._rto = max(self._initial, self._floor)
        self._arm(now)

    def on_timeout(self, now: float) -> bool:
        """The deadline passed. True: resend the unacked records (the timer is re-armed).
        False: max_attempts resends went unanswered; give up (ErrorHandshakeTimeout)."""
        if self._deadline is None:
            raise StateError("retransmit timer is not running")
        if now < self._deadline:
            raise StateError("retransmit timer fired before its deadline")
        if self._attempts >= self._max_attempts:
            self._deadline = None
            return False
        self._attempts += 1
        self._rto = min(self._rto * 2.0, max(self._maximum, self._floor))
        self._arm(now)
        return True

    def stop(self) -> None:
        self._deadline = None


# --- address validation -------------------------------------------------------------------------


class AmplificationLimiter:
    """At most ``factor`` x the bytes received may go to an address until it is validated."""

    __slots__ = ("_factor", "_received", "_sent", "_validated")

    def __init__(self, factor: int = 3) -> None:
        if factor < 1:
            raise ConfigError("factor must be at least 1")
        self._factor = factor
        self._received = 0
        self._sent = 0
        self._validated = False

    def on_received(self, n: int) -> None:
        self._received += n

    def on_sent(self, n: int) -> None:
        self._sent += n

    def can_send(self, n: int) -> bool:
        return self._validated or self._sent + n <= self._factor * self._received

    def validate(self) -> None:
        """The address is proven (cookie, PATH_RESPONSE or an authenticated packet)."""
        self._validated = True

    @property
    def validated(self) -> bool:
        return self._validated

    @property
    def budget(self) -> int | None:
        """Bytes that may still be sent, or None when unlimited."""
        if self._validated:
            return None
        return max(0, self._factor * self._received - self._sent)


COOKIE_LEN = 24  # u64 issue time in milliseconds + 16-byte truncated MAC
COMPACT_COOKIE_LEN = 14  # u32 issue time in seconds + 10-byte MAC: fits a RID's random part
_COOKIE_MAC_LEN = 16
_COMPACT_MAC_LEN = 10
_MIN_COOKIE_SECRET = 32
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def _addr_bytes(addr: tuple[object, ...]) -> bytes:
    """A canonical byte form of a transport address (host, port[, flowinfo, scope]).

    IP hosts are packed (an IPv4-mapped IPv6 host counts as the IPv4 one), so the same peer gets
    the same bytes however the socket spelled it; IPv6 flowinfo can change between datagrams and
    is left out. Other hosts (a serial device, a gateway path name) are taken as text.
    """
    if not isinstance(addr, tuple) or not addr:
        raise ConfigError("address must be a non-empty tuple")
    host, port = addr[0], addr[1] if len(addr) > 1 else 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ConfigError("address port must be an int in 0..65535")
    port_b = port.to_bytes(2, "big")
    if isinstance(host, bytes):
        return b"\x01" + len(host).to_bytes(2, "big") + host + port_b
    if not isinstance(host, str):
        raise ConfigError("address host must be str or bytes")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        text = host.encode("utf-8")
        return b"\x00" + len(text).to_bytes(2, "big") + text + port_b
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x04" + ip.packed + port_b
    scope = (ip.scope_id or "").encode("utf-8")
    return b"\x06" + ip.packed + len(scope).to_bytes(1, "big") + scope + port_b


def _check_secret(secret: bytes) -> bytearray:
    if len(secret) < _MIN_COOKIE_SECRET:
        raise ConfigError("cookie secret must be at least 32 bytes")
    # Kept in a bytearray so a retired secret can be overwritten (PROFILE §3).
    return bytearray(secret)


class CookieIssuer:
    """Stateless retry cookies: ``stamp || HMAC-SHA3-256(secret, addr || context || stamp)[:n]``.

    The full form (``COOKIE_LEN`` = 24 bytes) stamps milliseconds as u64 with a 16-byte MAC. The
    compact form (``COMPACT_COOKIE_LEN`` = 14 bytes: u32 seconds, 10-byte MAC) fits inside the
    random part of a RID, which is how the endpoint carries it (PROFILE §4 keeps the 8-byte
    steering prefix and the 2-byte rotation epoch in front of it). ``context`` binds extra bytes
    (the steering prefix) into the MAC.

    A cookie is valid for ``lifetime`` seconds, only for the address it was made for, and under the
    current or the previous secret (so a rotation does not strand clients mid-retry). Timestamps
    more than ``max_skew`` seconds in the future are refused; set it above zero only when several
    servers with loosely synchronised clocks share the secret.
    """

    __slots__ = ("_current", "_lifetime_ms", "_mac_len", "_max_skew_ms", "_previous", "_stamp")

    def __init__(
        self, secret: bytes, lifetime: float = 30.0, *, max_skew: float = 0.0,
        compact: bool = False,
    ) -> None:
        if lifetime <= 0:
            raise ConfigError("cookie lifetime must be positive")
        if max_skew < 0:
            raise ConfigError("max_skew must not be negative")
        self._current = _check_secret(secret)
        self._previous: bytearray | None = None
        self._lifetime_ms = int(lifetime * 1000)
        self._max_skew_ms = int(max_skew * 1000)
        # Full: u64 milliseconds. Compact: u32 seconds (enough for a 30 s lifetime until 2106).
        self._stamp = _U32 if compact else _U64
        self._mac_len = _COMPACT_MAC_LEN if compact else _COOKIE_MAC_LEN

    @property
    def cookie_len(self) -> int:
        return self._stamp.size + self._mac_len

    def _mac(self, secret: bytearray, addr_b: bytes, context: bytes, stamp: bytes) -> bytes:
        h = hmac.HMAC(secret, hashes.SHA3_256())
        h.update(addr_b)
        h.update(context)
        h.update(stamp)
        return h.finalize()[: self._mac_len]

    def _ms(self, stamp_value: int) -> int:
        return stamp_value * 1000 if self._stamp is _U32 else stamp_value

    def make(self, addr: tuple[object, ...], now: float, context: bytes = b"") -> bytes:
        if now < 0:
            raise ConfigError("now must not be negative")
        value = int(now) if self._stamp is _U32 else int(now * 1000)
        stamp = self._stamp.pack(value & (0xFFFFFFFF if self._stamp is _U32 else (1 << 64) - 1))
        return stamp + self._mac(self._current, _addr_bytes(addr), context, stamp)

    def check(
        self, cookie: bytes | bytearray, addr: tuple[object, ...], now: float,
        context: bytes = b"",
    ) -> bool:
        """True only for an unexpired cookie this issuer made for ``addr``. Never raises on the
        cookie's contents, which come from the peer."""
        if not isinstance(cookie, bytes | bytearray) or len(cookie) != self.cookie_len:
            return False
        n = self._stamp.size
        stamp = bytes(cookie[:n])
        (issued,) = self._stamp.unpack(stamp)
        issued_ms = self._ms(issued)
        now_ms = int(now * 1000)
        # Compact stamps are whole seconds: allow the second that is still running.
        slack = 999 if self._stamp is _U32 else 0
        if issued_ms > now_ms + self._max_skew_ms or now_ms - issued_ms > self._lifetime_ms + slack:
            return False
        addr_b = _addr_bytes(addr)
        tag = bytes(cookie[n:])
        ok = _stdlib_hmac.compare_digest(tag, self._mac(self._current, addr_b, context, stamp))
        if self._previous is not None:
            # Evaluated whatever the first result, so timing does not tell which secret matched.
            ok |= _stdlib_hmac.compare_digest(
                tag, self._mac(self._previous, addr_b, context, stamp)
            )
        return ok

    def rotate(self, new_secret: bytes) -> None:
        """Make ``new_secret`` current; the old current stays acceptable until the next rotate."""
        fresh = _check_secret(new_secret)
        if self._previous is not None:
            self._previous[:] = bytes(len(self._previous))
        self._previous, self._current = self._current, fresh
