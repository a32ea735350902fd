# cython: language_level=3
"""Handshake delivery over datagrams: reassembly, acks, retransmission and address checks.

Theory of operation
-------------------
Handshake messages (CH, SH, CF and the resumption forms) travel in cleartext "QH" records and are
split to the datagram size of the transport (PROFILE §4). Everything here is sans-IO: time comes
in as ``now`` (seconds, any monotonic origin) and randomness as an injected ``random.Random``-like
object, so the same code runs over UDP, over the serial bridge and inside tests.

Receiving side
    :class:`Reassembler` rebuilds ONE message. The first fragment fixes (msg_type, msg_seq,
    msg_length) and one ``msg_length``-byte buffer is allocated, so memory never exceeds
    ``max_message`` however the peer slices or repeats its fragments. Held bytes are a sorted C
    array of merged half-open ranges (inline for up to four, so in-order delivery never allocates
    for them), and it never holds more ranges than ``max_fragments``. An exact or contained
    repeat is a harmless duplicate; a fragment whose bytes disagree with bytes already held is
    malformed and leaves the state untouched (the first copy wins). :class:`ReassemblyTable` keys
    reassemblers by (rid, msg_type, msg_seq) under a hard cap: beyond it new messages are refused
    and counted, existing work is never evicted, and entries older than ``max_age`` are purged.
    The buffer, filled in place, becomes the delivered message itself (no copy); the table then
    drops the reassembler and keeps only a small bounded marker, so the message's late repeats
    are answered with a full ack instead of being assembled and delivered a second time.

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

Compiled form
    The five state classes are final cdef classes with C fields (declared in reassembly.pxd): an
    optional time is a double plus a flag, counts and offsets are C integers, and the per-datagram
    paths (an in-order fragment, a flight's resend set) read HandshakeRecord and HandshakeAck
    fields directly and build no Python object that is not returned. ``ReassemblyTable.add``
    feeds the reassembler through ``Reassembler._add``, which reports a rejection as a status
    instead of raising, so a flood of malformed fragments costs no exception objects. The
    results that carry nothing variable (REFUSED, MALFORMED, PARTIAL/DUPLICATE without an ack)
    are built once. CookieIssuer stays a plain class: it runs per ClientHello under load, and its
    cost is the HMAC. The methods the connection calls per datagram (``add``, ``on_ack``,
    ``start``/``stop``, ``can_send``/``on_sent``/``on_received`` and so on) each have a cdef twin
    declared in reassembly.pxd that compiled callers use directly; the def method delegates to it.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.limits cimport LLONG_MAX, LLONG_MIN
from libc.string cimport memcmp, memcpy, memmove, memset

import hmac as _stdlib_hmac
import ipaddress
import struct
from enum import Enum
from typing import NamedTuple, Protocol

from cryptography.hazmat.primitives import hashes, hmac

from palisade_c.errors import ConfigError, DecodeError, ErrorCode, StateError
from palisade_c.hsrecord import decode, fragment_message

from palisade_c.hsrecord cimport (
    ACK_MAX_RANGES,
    is_message_type,
    HS_RECORD_OVERHEAD,
    MAX_MESSAGE,
    HandshakeAck,
    HandshakeRecord,
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


def _merge_ranges(ranges) -> list:
    """Sort and merge half-open ranges, joining ranges that touch; drops empty ones.

    Kept in Python on purpose: it serves ``Flight.records_to_resend(ack_ranges)``, whose caller
    may pass any iterable of pairs; the per-datagram paths merge C spans instead."""
    cdef list out = []
    cdef Py_ssize_t last
    # Explicit last index: the module is compiled with wraparound=False, so out[-1] would not
    # mean the last item.
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        last = len(out) - 1
        if last >= 0 and start <= out[last][1]:
            if end > out[last][1]:
                out[last] = (out[last][0], end)
        else:
            out.append((start, end))
    return out


cdef inline Py_ssize_t _pmax(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a >= b else b


cdef inline Py_ssize_t _pmin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a <= b else b


cdef inline double _fmax(double a, double b) noexcept nogil:
    # Python's max(a, b): a unless b is strictly greater (the same answer for NaN as before).
    return b if b > a else a


cdef inline double _fmin(double a, double b) noexcept nogil:
    # Python's min(a, b): a unless b is strictly smaller.
    return b if b < a else a


cdef Py_ssize_t _count(object value) except? -1:
    """A validated non-negative count as a C integer. A count beyond what C can hold allows more
    than can ever happen, so PY_SSIZE_T_MAX stands in for it without changing behaviour."""
    if value > PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    return value


# --- receiving ----------------------------------------------------------------------------------


@cython.final
cdef class Reassembler:
    """Rebuilds one handshake message from its fragments, within ``max_message`` bytes."""

    def __cinit__(self):
        self._ranges = self._inline
        self._cap = INLINE_SPANS
        # A Reassembler made with __new__ (as the table does) is a default one until configured.
        self._reset(MAX_MESSAGE, DEFAULT_MAX_FRAGMENTS)

    def __dealloc__(self):
        if self._ranges != self._inline:
            PyMem_Free(self._ranges)

    def __init__(self, max_message=MAX_MESSAGE, max_fragments=DEFAULT_MAX_FRAGMENTS):
        if not 0 <= max_message <= MAX_MESSAGE:
            raise ConfigError(f"max_message must be in 0..{MAX_MESSAGE}")
        if max_fragments < 1:
            raise ConfigError("max_fragments must be at least 1")
        self._reset(max_message, _count(max_fragments))

    cdef void _reset(self, Py_ssize_t max_message, Py_ssize_t max_fragments) noexcept:
        self._max_message = max_message
        self._max_fragments = max_fragments
        self._started = False
        self._msg_type = 0
        self._msg_seq = 0
        self._msg_length = 0
        self._buf = None  # allocated by the first fragment, at its msg_length
        self._nranges = 0
        self._fragments = 0
        self._complete = False
        self._why = None
        self._created = 0.0
        #: Fragments that brought no new byte.
        self.duplicates = 0
        #: Fragments refused as malformed (each one also raised DecodeError).
        self.rejected = 0

    cdef int _reject(self, str why) noexcept:
        self.rejected += 1
        self._why = why
        return ADD_REJECTED

    cdef int _reserve(self, Py_ssize_t n) except -1:
        """Room for ``n`` spans. Grows only past INLINE_SPANS, and never beyond max_fragments
        spans: each stored fragment adds at most one."""
        cdef Py_ssize_t cap
        cdef Span* grown
        if n <= self._cap:
            return 0
        cap = self._cap * 2
        if cap < n:
            cap = n
        grown = <Span*>PyMem_Malloc(<size_t>cap * sizeof(Span))
        if grown == NULL:
            raise MemoryError()
        memcpy(grown, self._ranges, <size_t>self._nranges * sizeof(Span))
        if self._ranges != self._inline:
            PyMem_Free(self._ranges)
        self._ranges = grown
        self._cap = cap
        return 0

    cdef int _add(self, HandshakeRecord record) except -1:
        """The work of :meth:`add`, with a rejection reported as ADD_REJECTED (reason in _why)
        instead of raised, so the table counts malformed fragments without exception objects."""
        cdef Py_ssize_t start, end, lo, hi, i, j, n, frag_len
        cdef Py_ssize_t msg_length = record.msg_length
        cdef bint contained = False
        cdef const char* frag
        cdef char* buf
        cdef Span* r
        if not self._started:
            if not is_message_type(record.msg_type):
                return self._reject("acks and error responses are not reassembled")
            # Bounded memory: the one allocation is sized by a length we have agreed to hold.
            if msg_length > self._max_message:
                return self._reject("msg_length over the reassembly limit")
        elif record.msg_type != self._msg_type or record.msg_seq != self._msg_seq:
            return self._reject("fragment belongs to another message")
        elif msg_length != self._msg_length:
            return self._reject("msg_length differs from earlier fragments")

        frag_len = PyBytes_GET_SIZE(record.fragment)
        start = record.frag_offset
        end = start + frag_len
        if end > msg_length:
            # HandshakeRecord never holds such a fragment (its constructor and decoder refuse
            # it); checked again because the copies below write into a msg_length buffer.
            return self._reject("fragment overruns msg_length")
        if not self._started:
            # Allocated before any field changes, so a MemoryError leaves the state as it was.
            # A bytes object filled in place: nothing else can reach it until the message is
            # complete, and from then on no fragment writes to it (every later one is inside
            # the held range), so the finished message is handed out without a copy.
            self._buf = PyBytes_FromStringAndSize(NULL, msg_length)
            if msg_length:
                memset(PyBytes_AS_STRING(self._buf), 0, <size_t>msg_length)
            self._started = True
            self._msg_type = record.msg_type
            self._msg_seq = record.msg_seq
            self._msg_length = msg_length

        if start == end:
            # Only an empty message has an empty fragment (the decoder enforces it).
            if self._complete:
                self.duplicates += 1
                return ADD_DUPLICATE
            self._complete = True
            return ADD_COMPLETE

        frag = PyBytes_AS_STRING(record.fragment)
        buf = PyBytes_AS_STRING(self._buf)
        r = self._ranges
        n = self._nranges
        if (n == 0 and start == 0) or (n == 1 and r[0].start == 0 and r[0].end == start):
            # The common case: fragments arriving in order. No overlap is possible.
            if self._fragments >= self._max_fragments:
                return self._reject("too many fragments for one message")
            memcpy(buf + start, frag, <size_t>frag_len)
            self._fragments += 1
            r[0].start = 0
            r[0].end = end
            self._nranges = 1
            if end == self._msg_length:
                self._complete = True
                return ADD_COMPLETE
            return ADD_PARTIAL
        for i in range(n):
            lo = _pmax(start, r[i].start)
            hi = _pmin(end, r[i].end)
            if lo >= hi:
                continue
            # Overlaps must repeat the same bytes: a peer (or forger) that rewrites part of a
            # message would otherwise change what was already checked or hashed.
            if memcmp(buf + lo, frag + (lo - start), <size_t>(hi - lo)) != 0:
                return self._reject("overlapping fragment carries different bytes")
            if r[i].start <= start and end <= r[i].end:
                contained = True
        if contained:
            self.duplicates += 1
            return ADD_DUPLICATE
        if self._fragments >= self._max_fragments:
            return self._reject("too many fragments for one message")

        # Room first: a failed allocation must leave the state as it was.
        self._reserve(n + 1)
        r = self._ranges
        memcpy(buf + start, frag, <size_t>frag_len)
        self._fragments += 1
        # Merge [start, end) into the sorted spans, joining every span it overlaps or touches.
        i = 0
        while i < n and r[i].end < start:
            i += 1
        j = i
        while j < n and r[j].start <= end:
            j += 1
        if j > i:
            start = _pmin(start, r[i].start)
            end = _pmax(end, r[j - 1].end)
        if j == i:
            memmove(r + i + 1, r + i, <size_t>(n - i) * sizeof(Span))
            self._nranges = n + 1
        elif j > i + 1:
            memmove(r + i + 1, r + j, <size_t>(n - j) * sizeof(Span))
            self._nranges = n - (j - i - 1)
        r[i].start = start
        r[i].end = end
        if self._nranges == 1 and r[0].start == 0 and r[0].end == self._msg_length:
            self._complete = True
            return ADD_COMPLETE
        return ADD_PARTIAL

    def add(self, HandshakeRecord record not None) -> bytes | None:
        """Take one decoded fragment. Returns the whole message on the call that completes it,
        else None. A fragment that contradicts what is held raises DecodeError
        (ErrorMalformedPacket) and changes nothing, so the caller can count it and go on."""
        cdef int status = self._add(record)
        if status == ADD_COMPLETE:
            return self._message()
        if status == ADD_REJECTED:
            raise DecodeError("handshake reassembly: " + self._why, _MALFORMED)
        return None

    cdef bytes _message(self):
        return self._buf

    @property
    def started(self) -> bool:
        """True once a first fragment has been accepted."""
        return self._started

    @property
    def is_complete(self) -> bool:
        return self._complete

    @property
    def message(self) -> bytes | None:
        """The message once complete, else None."""
        return self._message() if self._complete else None

    @property
    def msg_type(self) -> int | None:
        return self._msg_type if self._started else None

    @property
    def msg_seq(self) -> int:
        return self._msg_seq

    @property
    def msg_length(self) -> int:
        return self._msg_length

    @property
    def bytes_held(self) -> int:
        cdef Py_ssize_t i, total = 0
        for i in range(self._nranges):
            total += self._ranges[i].end - self._ranges[i].start
        return total

    def ranges(self) -> list:
        """The byte ranges held so far: sorted, merged, half-open."""
        cdef Py_ssize_t i
        return [(self._ranges[i].start, self._ranges[i].end) for i in range(self._nranges)]

    cdef HandshakeAck _ack(self):
        cdef Py_ssize_t i, n = _pmin(self._nranges, ACK_MAX_RANGES)
        cdef HandshakeAck ack = HandshakeAck.__new__(HandshakeAck)
        ack.acked_type = <unsigned char>self._msg_type
        ack.acked_seq = <unsigned char>self._msg_seq
        # Built directly: held spans are sorted, merged, non-empty and within 16 KiB, which is
        # everything HandshakeAck's constructor would check again.
        ack.ranges = tuple([(self._ranges[i].start, self._ranges[i].end) for i in range(n)])
        return ack

    def ack(self) -> HandshakeAck:
        """The ack to send for this message. Past 16 ranges only the lowest 16 are listed; the
        sender then resends everything above them too, which is wasteful but never wrong."""
        if not self._started:
            raise StateError("no fragment received yet, nothing to acknowledge")
        return self._ack()


ReassemblyKey = tuple[bytes, int, int]
# (rid, msg_type, msg_seq): what identifies one message being reassembled.


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


cdef object _PARTIAL = FragmentStatus.PARTIAL
cdef object _COMPLETE = FragmentStatus.COMPLETE
cdef object _DUPLICATE = FragmentStatus.DUPLICATE
cdef object _tuple_new = tuple.__new__


cdef inline object _result(object status, object message, object ack):
    # What FragmentResult(status, message, ack) does, without its Python-level __new__ frame.
    return _tuple_new(FragmentResult, (status, message, ack))


# Results with nothing variable in them are immutable, so one instance of each serves every call.
cdef object _R_REFUSED = FragmentResult(FragmentStatus.REFUSED)
cdef object _R_MALFORMED = FragmentResult(FragmentStatus.MALFORMED)
cdef object _R_PARTIAL = FragmentResult(FragmentStatus.PARTIAL)
cdef object _R_DUPLICATE = FragmentResult(FragmentStatus.DUPLICATE)


cdef HandshakeAck _full_ack_c(int msg_type, int msg_seq, Py_ssize_t msg_length):
    cdef HandshakeAck ack = HandshakeAck.__new__(HandshakeAck)
    ack.acked_type = <unsigned char>msg_type
    ack.acked_seq = <unsigned char>msg_seq
    # Built directly: msg_type is a reassembled type and msg_length at most max_message, so the
    # one range is canonical.
    ack.ranges = ((0, msg_length),) if msg_length else ()
    return ack


@cython.final
cdef class ReassemblyTable:
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
        max_messages,
        *,
        max_message=MAX_MESSAGE,
        max_fragments=DEFAULT_MAX_FRAGMENTS,
        max_age=None,
        max_completed=None,
    ):
        if max_messages < 1:
            raise ConfigError("max_messages must be at least 1")
        if max_age is not None and max_age <= 0:
            raise ConfigError("max_age must be positive")
        if max_completed is not None and max_completed < 0:
            raise ConfigError("max_completed must not be negative")
        # Checked here so a bad value fails at construction, not at the first packet.
        Reassembler(max_message, max_fragments)
        self._max_messages = _count(max_messages)
        self._max_message = max_message
        self._max_fragments = _count(max_fragments)
        self._has_max_age = max_age is not None
        self._max_age = 0.0
        if max_age is not None:
            self._max_age = max_age
        self._max_completed = self._max_messages
        if max_completed is not None:
            self._max_completed = _count(max_completed)
        self._entries = {}
        self._completed = {}
        self.refused = 0
        self.malformed = 0
        self.expired = 0

    def __len__(self) -> int:
        """Messages in progress (completed markers are not counted)."""
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def add(self, HandshakeRecord record not None, double now=0.0, *, bint ack=True
            ) -> FragmentResult:
        """Feed one decoded record. Never raises for anything a peer can send.

        With ``ack=False`` the result carries no ack for a partial message (the caller builds
        one later from :meth:`get`, when it actually sends it)."""
        return self._add_record(record, now, ack)

    cdef object _add_record(self, HandshakeRecord record, double now, bint ack):
        cdef int msg_type = record.msg_type
        cdef int msg_seq = record.msg_seq
        cdef Py_ssize_t msg_length = record.msg_length
        cdef Reassembler reasm
        cdef bint fresh = False
        cdef int status
        cdef bytes message
        if not is_message_type(msg_type):
            # Acks and ErrorResponses always arrive whole (the decoder enforces it) and are
            # neither reassembled nor acknowledged.
            return _result(_COMPLETE, record.fragment, None)
        key = (record.rid, msg_type, msg_seq)
        done = self._completed.get(key)
        if done is not None:
            if msg_length != <Py_ssize_t>(<tuple>done)[1]:
                self.malformed += 1
                return _R_MALFORMED
            return _result(_DUPLICATE, None, _full_ack_c(msg_type, msg_seq, msg_length))
        entry = self._entries.get(key)
        if entry is None:
            if record.frag_offset == 0 and PyBytes_GET_SIZE(record.fragment) == msg_length:
                # One record holds the whole message: no buffer is ever allocated for it.
                if msg_length > self._max_message:
                    self.malformed += 1
                    return _R_MALFORMED
                self._mark_completed(key, now, msg_length)
                return _result(_COMPLETE, record.fragment,
                               _full_ack_c(msg_type, msg_seq, msg_length))
            if len(self._entries) >= self._max_messages:
                self._expire(now)
            if len(self._entries) >= self._max_messages:
                self.refused += 1
                return _R_REFUSED
            # __init__ validated these limits already; configure without checking again.
            reasm = Reassembler.__new__(Reassembler)
            reasm._max_message = self._max_message
            reasm._max_fragments = self._max_fragments
            reasm._created = now
            fresh = True
        else:
            reasm = <Reassembler>entry
        status = reasm._add(record)
        if status == ADD_REJECTED:
            self.malformed += 1
            return _R_MALFORMED
        if status == ADD_COMPLETE:
            message = reasm._message()
            self._entries.pop(key, None)
            self._mark_completed(key, now, reasm._msg_length)
            return _result(_COMPLETE, message,
                           _full_ack_c(msg_type, msg_seq, PyBytes_GET_SIZE(message)))
        if fresh:
            self._entries[key] = reasm
        if status == ADD_DUPLICATE:
            return _result(_DUPLICATE, None, reasm._ack()) if ack else _R_DUPLICATE
        return _result(_PARTIAL, None, reasm._ack()) if ack else _R_PARTIAL

    cdef int _mark_completed(self, tuple key, double now, Py_ssize_t msg_length) except -1:
        if self._max_completed == 0:
            return 0
        while len(self._completed) >= self._max_completed:
            del self._completed[next(iter(self._completed))]
        self._completed[key] = (now, msg_length)
        return 0

    def get(self, key) -> Reassembler | None:
        return self._entries.get(key)

    def pop(self, key) -> Reassembler | None:
        return self._entries.pop(key, None)

    def is_completed(self, key) -> bool:
        """True while the table remembers delivering this message."""
        return key in self._completed

    def discard_rid(self, rid) -> int:
        """Forget everything about ``rid`` (handshake done or aborted): partial messages and
        completed markers. Returns how many partial messages were dropped."""
        doomed = [k for k in self._entries if k[0] == rid]
        for k in doomed:
            del self._entries[k]
        for k in [k for k in self._completed if k[0] == rid]:
            del self._completed[k]
        return len(doomed)

    cdef Py_ssize_t _expire(self, double now) except -1:
        cdef double limit
        cdef Py_ssize_t dropped
        if not self._has_max_age:
            return 0
        limit = now - self._max_age
        doomed = [k for k, reasm in self._entries.items() if (<Reassembler>reasm)._created < limit]
        for k in doomed:
            del self._entries[k]
        for k in [k for k, done in self._completed.items()
                  if <double>(<tuple>done)[0] < limit]:
            del self._completed[k]
        dropped = len(doomed)
        self.expired += dropped
        return dropped

    def expire(self, double now) -> int:
        """Drop partial messages whose first fragment is older than ``max_age`` (and completed
        markers older than that). Returns how many partial messages were dropped."""
        return self._expire(now)


# --- sending ------------------------------------------------------------------------------------


@cython.final
cdef class Flight:
    """The records that carry one handshake message, as sent together and resent together."""

    def __dealloc__(self):
        PyMem_Free(self._spans)

    cdef int _alloc_spans(self, Py_ssize_t n) except -1:
        self._spans = <Span*>PyMem_Malloc(<size_t>_pmax(n, 1) * sizeof(Span))
        if self._spans == NULL:
            raise MemoryError()
        self._nspans = n
        return 0

    def __init__(self, records):
        cdef list raws = []
        cdef list spans = []
        cdef HandshakeRecord rec, first = None
        cdef Py_ssize_t i, total = 0
        for raw in records:
            try:
                rec = decode(raw)
            except DecodeError as exc:
                raise ConfigError(f"flight holds an invalid record: {exc}") from exc
            if first is None:
                first = rec
            elif (rec.rid != first.rid or rec.msg_type != first.msg_type
                    or rec.msg_seq != first.msg_seq or rec.msg_length != first.msg_length):
                raise ConfigError("a flight carries the records of exactly one message")
            raw_b = bytes(raw)
            raws.append(raw_b)
            spans.append((rec.frag_offset, rec.frag_offset + PyBytes_GET_SIZE(rec.fragment)))
            total += PyBytes_GET_SIZE(raw_b)
        if first is None:
            raise ConfigError("a flight needs at least one record")
        if not is_message_type(first.msg_type):
            raise ConfigError("acks and error responses are not sent as flights")
        PyMem_Free(self._spans)  # __init__ may run twice on one object
        self._spans = NULL
        self._alloc_spans(len(raws))
        for i in range(self._nspans):
            self._spans[i].start = (<tuple>spans[i])[0]
            self._spans[i].end = (<tuple>spans[i])[1]
        self._rid = first.rid
        self._msg_type = first.msg_type
        self._msg_seq = first.msg_seq
        self._msg_length = first.msg_length
        self._records = tuple(raws)
        self._total_bytes = total
        self._has_ack = False
        self._nack = 0

    @classmethod
    def from_message(cls, msg_type, rid, msg_seq, message, max_datagram) -> Flight:
        cdef list records = fragment_message(msg_type, rid, msg_seq, message, max_datagram)
        cdef Flight flight
        cdef Py_ssize_t i, n, size, offset = 0, total = 0
        if not is_message_type(msg_type):
            raise ConfigError("acks and error responses are not sent as flights")
        # fragment_message fills records greedily in order, so each record's span follows
        # from its size; no need to decode what was just encoded.
        flight = Flight.__new__(Flight)
        n = len(records)
        flight._alloc_spans(n)
        for i in range(n):
            size = PyBytes_GET_SIZE(<bytes>records[i])
            flight._spans[i].start = offset
            offset += size - HS_RECORD_OVERHEAD
            flight._spans[i].end = offset
            total += size
        flight._rid = rid
        flight._msg_type = msg_type
        flight._msg_seq = msg_seq
        flight._msg_length = offset
        flight._records = tuple(records)
        flight._total_bytes = total
        return flight

    @property
    def records(self) -> tuple:
        return self._records

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
        return self._total_bytes

    def matches(self, HandshakeAck ack not None) -> bool:
        return ack.acked_type == self._msg_type and ack.acked_seq == self._msg_seq

    def on_ack(self, HandshakeAck ack not None) -> bool:
        """Remember the peer's latest ack for this message; False if it names another message.

        The latest ack replaces earlier ones instead of being added to them: a receiver that
        dropped its partial state (expiry, restart) reports less than before, and trusting an
        old ack would then leave bytes that nobody resends. Reordered acks only cost a resend.
        """
        return self._on_ack(ack)

    cdef bint _on_ack(self, HandshakeAck ack) except -1:
        cdef tuple ranges = ack.ranges
        cdef Py_ssize_t i, n
        if ack.acked_type != self._msg_type or ack.acked_seq != self._msg_seq:
            return False
        n = len(ranges)
        if n > ACK_MAX_RANGES:
            # HandshakeAck's constructor and decoder both refuse this.
            raise ConfigError("handshake ack: more than 16 ranges")
        for i in range(n):
            self._ack[i].start = (<tuple>ranges[i])[0]
            self._ack[i].end = (<tuple>ranges[i])[1]
        # No merging needed: an ack's ranges are sorted, merged and non-empty by construction
        # (HandshakeAck checks them), which is what _acked relies on.
        self._nack = n
        self._has_ack = True
        return True

    cdef bint _acked(self, Py_ssize_t i) noexcept:
        """True when some range of the latest ack covers record ``i``."""
        cdef Py_ssize_t k
        cdef Py_ssize_t start = self._spans[i].start, end = self._spans[i].end
        if start == end:
            # An empty message's only record: any ack for this message proves it arrived.
            return True
        for k in range(self._nack):
            if self._ack[k].start <= start and end <= self._ack[k].end:
                return True
        return False

    def records_to_resend(self, ack_ranges=None) -> list:
        """Records not covered by ``ack_ranges`` (default: the latest ack given to on_ack).
        With no ack information at all, every record."""
        cdef Py_ssize_t i
        if ack_ranges is None:
            if not self._has_ack:
                return list(self._records)
            return [self._records[i] for i in range(self._nspans) if not self._acked(i)]
        merged = _merge_ranges(ack_ranges)
        return [self._records[i] for i in range(self._nspans)
                if not _covered(merged, self._spans[i].start, self._spans[i].end)]

    @property
    def acknowledged(self) -> bool:
        """True when the latest ack covers every record (the timer can stop)."""
        return self._acknowledged()

    cdef bint _acknowledged(self) noexcept:
        cdef Py_ssize_t i
        if not self._has_ack:
            return False
        for i in range(self._nspans):
            if not self._acked(i):
                return False
        return True


def _covered(merged, start, end) -> bool:
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

cdef double _LINK_BITS_PER_BYTE = 10.0
cdef double _LINK_RTO_FACTOR = 2.0


cdef double _serialization_time(double bytes_in_flight, double bits_per_second) except? -1.0:
    if bits_per_second <= 0:
        raise ConfigError("bits_per_second must be positive")
    if bytes_in_flight < 0:
        raise ConfigError("bytes_in_flight must not be negative")
    return bytes_in_flight * _LINK_BITS_PER_BYTE / bits_per_second


cdef double _link_rto_floor(object bytes_in_flight, object bits_per_second) except? -1.0:
    if bits_per_second is None:
        return 0.0
    return _LINK_RTO_FACTOR * _serialization_time(bytes_in_flight, bits_per_second)


def serialization_time(bytes_in_flight, bits_per_second) -> float:
    """Seconds a link of ``bits_per_second`` needs to clock out ``bytes_in_flight`` bytes."""
    return _serialization_time(bytes_in_flight, bits_per_second)


def link_rto_floor(bytes_in_flight, bits_per_second) -> float:
    """The smallest sensible timeout for a flight on this link (0 when the speed is unknown).

    Without it a 9600-baud serial link would time out long before a 3 KB ClientHello has even
    left the UART, and every retransmission would queue behind the first copy.
    """
    return _link_rto_floor(bytes_in_flight, bits_per_second)


@cython.final
cdef class RetransmitTimer:
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

    def __init__(
        self,
        rng,
        *,
        double initial=0.25,
        double maximum=8.0,
        max_attempts=7,
        double jitter=0.25,
    ):
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
        self._max_attempts = _count(max_attempts)
        self._jitter = jitter
        self._floor = 0.0
        self._rto = initial
        self._attempts = 0
        self._running = False
        self._deadline = 0.0

    def scale_for_link(self, bytes_in_flight, bits_per_second) -> None:
        """Stretch the timeouts for a slow link; takes effect at the next arm. Call it with the
        flight's wire size whenever a new flight starts (None means a fast or unknown link)."""
        self._scale_for_link(bytes_in_flight, bits_per_second)

    cdef int _scale_for_link(self, object bytes_in_flight, object bits_per_second) except -1:
        self._floor = _link_rto_floor(bytes_in_flight, bits_per_second)
        return 0

    @property
    def floor(self) -> float:
        return self._floor

    @property
    def deadline(self) -> float | None:
        """When on_timeout is due, or None when the timer is not running."""
        return self._deadline if self._running else None

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
        return self._running

    def due(self, double now) -> bool:
        return self._running and now >= self._deadline

    cdef int _arm(self, double now) except -1:
        cdef double factor = 1.0 + self._jitter * (2.0 * <double>self._rng.random() - 1.0)
        cdef double ceiling = _fmax(self._maximum, self._floor)
        cdef double delay = _fmin(_fmax(self._rto * factor, self._floor), ceiling)
        self._deadline = now + delay
        self._running = True
        return 0

    def start(self, double now) -> None:
        """(Re)start for a new flight."""
        self._start(now)

    cdef int _start(self, double now) except -1:
        self._attempts = 0
        self._rto = _fmax(self._initial, self._floor)
        return self._arm(now)

    def on_timeout(self, double now) -> bool:
        """The deadline passed. True: resend the unacked records (the timer is re-armed).
        False: max_attempts resends went unanswered; give up (ErrorHandshakeTimeout)."""
        if not self._running:
            raise StateError("retransmit timer is not running")
        if now < self._deadline:
            raise StateError("retransmit timer fired before its deadline")
        if self._attempts >= self._max_attempts:
            self._running = False
            return False
        self._attempts += 1
        self._rto = _fmin(self._rto * 2.0, _fmax(self._maximum, self._floor))
        self._arm(now)
        return True

    def stop(self) -> None:
        self._stop()

    cdef void _stop(self) noexcept:
        self._running = False


# --- address validation -------------------------------------------------------------------------


@cython.cdivision(True)
cdef inline bint _mul_fits(long long a, long long b) noexcept nogil:
    """a * b fits a long long (a >= 1). C division truncates toward zero, which is the floor of
    the positive bound and the ceiling of the negative one: exactly the limits b may reach."""
    return LLONG_MIN // a <= b <= LLONG_MAX // a


cdef inline bint _add_fits(long long a, long long b) noexcept nogil:
    return (b >= 0 and a <= LLONG_MAX - b) or (b < 0 and a >= LLONG_MIN - b)


@cython.final
cdef class AmplificationLimiter:
    """At most ``factor`` x the bytes received may go to an address until it is validated."""

    def __init__(self, factor=3):
        if factor < 1:
            raise ConfigError("factor must be at least 1")
        # A factor beyond 2**63 - 1 allows more than any counter can reach: the same as the cap.
        self._factor = LLONG_MAX
        if factor < LLONG_MAX:
            self._factor = factor
        self._received = 0
        self._sent = 0
        self._validated = False

    def on_received(self, long long n) -> None:
        self._on_received(n)

    cdef int _on_received(self, long long n) except -1:
        if not _add_fits(self._received, n):
            raise OverflowError("received byte count out of range")
        self._received += n
        return 0

    def on_sent(self, long long n) -> None:
        self._on_sent(n)

    cdef int _on_sent(self, long long n) except -1:
        if not _add_fits(self._sent, n):
            raise OverflowError("sent byte count out of range")
        self._sent += n
        return 0

    def can_send(self, long long n) -> bool:
        return self._can_send(n)

    cdef bint _can_send(self, long long n) except -1:
        if self._validated:
            return True
        if _add_fits(self._sent, n) and _mul_fits(self._factor, self._received):
            return self._sent + n <= self._factor * self._received
        # Out of C range (only with absurd factors or counts): exact Python integers instead.
        return <object>self._sent + n <= <object>self._factor * self._received

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
        return max(0, <object>self._factor * self._received - self._sent)


COOKIE_LEN = 24  # u64 issue time in milliseconds + 16-byte truncated MAC
COMPACT_COOKIE_LEN = 14  # u32 issue time in seconds + 10-byte MAC: fits a RID's random part
_COOKIE_MAC_LEN = 16
_COMPACT_MAC_LEN = 10
_MIN_COOKIE_SECRET = 32
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")


def _addr_bytes(addr) -> bytes:
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


def _check_secret(secret) -> bytearray:
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

    def __init__(self, secret, lifetime=30.0, *, max_skew=0.0, compact=False):
        if lifetime <= 0:
            raise ConfigError("cookie lifetime must be positive")
        if max_skew < 0:
            raise ConfigError("max_skew must not be negative")
        self._current = _check_secret(secret)
        self._previous = None
        self._lifetime_ms = int(lifetime * 1000)
        self._max_skew_ms = int(max_skew * 1000)
        # Full: u64 milliseconds. Compact: u32 seconds (enough for a 30 s lifetime until 2106).
        self._stamp = _U32 if compact else _U64
        self._mac_len = _COMPACT_MAC_LEN if compact else _COOKIE_MAC_LEN

    @property
    def cookie_len(self) -> int:
        return self._stamp.size + self._mac_len

    def _mac(self, secret, addr_b, context, stamp) -> bytes:
        h = hmac.HMAC(secret, hashes.SHA3_256())
        h.update(addr_b)
        h.update(context)
        h.update(stamp)
        return h.finalize()[: self._mac_len]

    def _ms(self, stamp_value) -> int:
        return stamp_value * 1000 if self._stamp is _U32 else stamp_value

    def make(self, addr, now, context=b"") -> bytes:
        if now < 0:
            raise ConfigError("now must not be negative")
        value = int(now) if self._stamp is _U32 else int(now * 1000)
        stamp = self._stamp.pack(value & (0xFFFFFFFF if self._stamp is _U32 else (1 << 64) - 1))
        return stamp + self._mac(self._current, _addr_bytes(addr), context, stamp)

    def check(self, cookie, addr, now, context=b"") -> bool:
        """True only for an unexpired cookie this issuer made for ``addr``. Never raises on the
        cookie's contents, which come from the peer."""
        if not isinstance(cookie, (bytes, bytearray)) or len(cookie) != self.cookie_len:
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

    def rotate(self, new_secret) -> None:
        """Make ``new_secret`` current; the old current stays acceptable until the next rotate."""
        fresh = _check_secret(new_secret)
        if self._previous is not None:
            self._previous[:] = bytes(len(self._previous))
        self._previous, self._current = self._current, fresh
