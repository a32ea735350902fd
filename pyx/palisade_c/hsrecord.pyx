# cython: language_level=3
"""Handshake records: the cleartext "QH" packets that carry handshake messages (PROFILE §4).

One record on the wire (all integers big-endian)::

    magic "QH" | version 0x12 | msg_type u8 | length u16 | rid[24]      (30-byte header)
    msg_seq u8 | frag_offset u32 | msg_length u32                        (9-byte fragment header)
    fragment bytes

``length`` counts every byte after the 30-byte header, so it is always 9 + len(fragment), and
``rid`` sits at offset 6 exactly as in the encrypted PublicHeader, so a load balancer can route
both packet kinds on the same bytes.

The decoder is strict: every check runs on a pointer and a length before any object is built, and
a peer's bytes can only ever produce :class:`~palisade_c.errors.DecodeError` (code
ErrorMalformedPacket). Local misuse (building a record that could not be decoded) raises
:class:`~palisade_c.errors.ConfigError`, which is also a ``ValueError``.

HandshakeAck (msg_type 0x7E) carries the receiver's view of ONE message so that the sender can
resend exactly the fragments that are missing [profile]::

    acked_type u8 | acked_seq u8 | count u8 (<= 16) | count x (start u32, end u32)

Ranges are half-open byte ranges of the acked message, sorted, merged (neither overlapping nor
touching) and non-empty, so each set of ranges has exactly one encoding (App. D spirit). An ack or
an ErrorResponse always travels unfragmented (frag_offset 0, msg_length = len(body)); an ack
record's own msg_seq is 0 because the body names the message it acknowledges [profile].
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from palisade_c._endian cimport load_u16, load_u32, store_u16, store_u32

from palisade_c.errors import ConfigError, DecodeError, ErrorCode

_MALFORMED = ErrorCode.ErrorMalformedPacket

# The v1.2 record magic, 0x5148 [profile §4].
cdef enum:
    _MAGIC0 = 0x51
    _MAGIC1 = 0x48
    # Offsets of the header fields inside a record.
    _OFF_TYPE = 3
    _OFF_LENGTH = 4
    _OFF_SEQ = 30
    _OFF_FRAG_OFFSET = 31
    _OFF_MSG_LENGTH = 35


cdef bint is_known_type(unsigned int msg_type) noexcept nogil:
    """True for the eight msg_type values of PROFILE §4 and this project's Retry (0x7D)."""
    return (MSG_CLIENT_HELLO <= msg_type <= MSG_CLIENT_FINISHED_RESUME
            or msg_type == MSG_RETRY
            or msg_type == MSG_HANDSHAKE_ACK or msg_type == MSG_ERROR_RESPONSE)


cdef bint is_message_type(unsigned int msg_type) noexcept nogil:
    """Types that are fragmented, reassembled and acknowledged (not acks or errors)."""
    return MSG_CLIENT_HELLO <= msg_type <= MSG_CLIENT_FINISHED_RESUME


cdef str _field_error(unsigned int msg_type, unsigned int msg_seq, uint64_t frag_offset,
                      uint64_t msg_length, uint64_t frag_len):
    """The rule a set of record fields breaks, or None. Shared by the decoder and the builders,
    so anything we can build we can also decode, and the reverse."""
    if not is_known_type(msg_type):
        return "unknown msg_type"
    # Bounded memory for the reassembler: it preallocates msg_length bytes [profile].
    if msg_length > MAX_MESSAGE:
        return "msg_length over the 16 KiB limit"
    # 64-bit sum of two values < 2^32: cannot wrap.
    if frag_offset + frag_len > msg_length:
        return "fragment overruns msg_length"
    # An empty fragment would add nothing; only an empty message may have one.
    if frag_len == 0 and msg_length != 0:
        return "empty fragment of a non-empty message"
    if not is_message_type(msg_type):
        # Acks, retries and ErrorResponses are never reassembled, so never split [profile].
        if frag_offset != 0 or frag_len != msg_length:
            return "acks, retries and error responses must not be fragmented"
        if (msg_type == MSG_HANDSHAKE_ACK or msg_type == MSG_RETRY) and msg_seq != 0:
            return "ack and retry records have msg_seq 0"
    return None


cdef bytes _encode_raw(unsigned int msg_type, const unsigned char* rid, unsigned int msg_seq,
                       uint32_t frag_offset, uint32_t msg_length,
                       const unsigned char* frag, Py_ssize_t frag_len):
    """Write one record; the caller has validated every field with _field_error."""
    cdef Py_ssize_t total = HS_RECORD_OVERHEAD + frag_len
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    p[0] = _MAGIC0
    p[1] = _MAGIC1
    p[2] = HS_VERSION
    p[_OFF_TYPE] = <unsigned char>msg_type
    store_u16(p + _OFF_LENGTH, <uint16_t>(FRAG_HEADER_LEN + frag_len))
    memcpy(p + RID_OFFSET, rid, RID_LEN)
    p[_OFF_SEQ] = <unsigned char>msg_seq
    store_u32(p + _OFF_FRAG_OFFSET, frag_offset)
    store_u32(p + _OFF_MSG_LENGTH, msg_length)
    if frag_len:
        memcpy(p + HS_RECORD_OVERHEAD, frag, <size_t>frag_len)
    return out


cdef inline object _malformed(str why):
    return DecodeError("handshake record: " + why, _MALFORMED)


cdef HandshakeRecord decode_ptr(const unsigned char* p, Py_ssize_t n):
    """Decode exactly ``n`` bytes at ``p`` as one record, or raise DecodeError."""
    cdef uint32_t length, frag_offset, msg_length
    cdef Py_ssize_t frag_len
    cdef str why
    if n < HS_RECORD_OVERHEAD:
        raise _malformed("shorter than the 39-byte header")
    if p[0] != _MAGIC0 or p[1] != _MAGIC1:
        raise _malformed("bad magic")
    if p[2] != HS_VERSION:
        raise _malformed("unsupported record version")
    length = load_u16(p + _OFF_LENGTH)
    # The length field must describe this datagram exactly: no truncation, no trailing bytes.
    if <Py_ssize_t>length != n - HS_HEADER_LEN:
        raise _malformed("length field does not match the datagram")
    frag_len = n - HS_RECORD_OVERHEAD
    frag_offset = load_u32(p + _OFF_FRAG_OFFSET)
    msg_length = load_u32(p + _OFF_MSG_LENGTH)
    why = _field_error(p[_OFF_TYPE], p[_OFF_SEQ], frag_offset, msg_length, <uint64_t>frag_len)
    if why is not None:
        raise _malformed(why)
    cdef HandshakeRecord rec = HandshakeRecord.__new__(HandshakeRecord)
    rec.msg_type = p[_OFF_TYPE]
    rec.rid = PyBytes_FromStringAndSize(<const char*>(p + RID_OFFSET), RID_LEN)
    rec.msg_seq = p[_OFF_SEQ]
    rec.frag_offset = frag_offset
    rec.msg_length = msg_length
    rec.fragment = PyBytes_FromStringAndSize(<const char*>(p + HS_RECORD_OVERHEAD), frag_len)
    return rec


cdef HandshakeRecord _decode_obj(object data):
    cdef Py_buffer view
    # Any bytes-like object; a non-buffer argument is a caller bug (TypeError), never peer input.
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return decode_ptr(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def decode(data) -> HandshakeRecord:
    """Decode one whole datagram as a handshake record. Raises only DecodeError for bad bytes."""
    return _decode_obj(data)


cdef uint64_t _as_u32(object value, str name) except? 0xFFFFFFFFFFFFFFFF:
    if not isinstance(value, int) or value < 0 or value > 0xFFFFFFFF:
        raise ConfigError(f"{name} must be an int in 0..2**32-1")
    return <uint64_t>value


cdef unsigned int _as_u8(object value, str name) except? 0xFFFF:
    if not isinstance(value, int) or value < 0 or value > 0xFF:
        raise ConfigError(f"{name} must be an int in 0..255")
    return <unsigned int>value


cdef inline void _check_rid(bytes rid) except *:
    if PyBytes_GET_SIZE(rid) != RID_LEN:
        raise ConfigError("rid must be exactly 24 bytes")


@cython.final
cdef class HandshakeRecord:
    """One decoded (or to-be-sent) handshake record. Immutable; see the module docstring."""

    def __init__(self, msg_type, bytes rid not None, msg_seq, frag_offset, msg_length,
                 bytes fragment not None):
        cdef unsigned int t = _as_u8(msg_type, "msg_type")
        cdef unsigned int s = _as_u8(msg_seq, "msg_seq")
        cdef uint64_t off = _as_u32(frag_offset, "frag_offset")
        cdef uint64_t mlen = _as_u32(msg_length, "msg_length")
        _check_rid(rid)
        why = _field_error(t, s, off, mlen, <uint64_t>PyBytes_GET_SIZE(fragment))
        if why is not None:
            raise ConfigError("handshake record: " + why)
        self.msg_type = <uint8_t>t
        self.rid = rid
        self.msg_seq = <uint8_t>s
        self.frag_offset = <uint32_t>off
        self.msg_length = <uint32_t>mlen
        self.fragment = fragment

    cpdef bytes encode(self):
        """The wire form of this record (39 + len(fragment) bytes)."""
        return _encode_raw(self.msg_type, <const unsigned char*>PyBytes_AS_STRING(self.rid),
                           self.msg_seq, self.frag_offset, self.msg_length,
                           <const unsigned char*>PyBytes_AS_STRING(self.fragment),
                           PyBytes_GET_SIZE(self.fragment))

    @staticmethod
    def decode(data) -> HandshakeRecord:
        """Same as the module-level :func:`decode`."""
        return _decode_obj(data)

    @property
    def frag_end(self) -> int:
        """One past the last message byte this fragment carries."""
        return self.frag_offset + PyBytes_GET_SIZE(self.fragment)

    @property
    def is_complete_message(self) -> bool:
        """True when this single record carries the whole message (no reassembly needed)."""
        return self.frag_offset == 0 and PyBytes_GET_SIZE(self.fragment) == self.msg_length

    def _key(self):
        return (self.msg_type, self.rid, self.msg_seq, self.frag_offset, self.msg_length,
                self.fragment)

    def __eq__(self, other):
        if not isinstance(other, HandshakeRecord):
            return NotImplemented
        return self._key() == (<HandshakeRecord>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (f"HandshakeRecord(msg_type=0x{self.msg_type:02x}, rid={self.rid.hex()}, "
                f"msg_seq={self.msg_seq}, frag_offset={self.frag_offset}, "
                f"msg_length={self.msg_length}, fragment=<{len(self.fragment)} bytes>)")


def fragment_message(msg_type, bytes rid not None, msg_seq, message, max_datagram) -> list:
    """Split ``message`` into encoded records, each at most ``max_datagram`` bytes long.

    Fragments are filled greedily in order; an empty message becomes one record with an empty
    fragment. Acks and ErrorResponses must fit in one record. Raises ConfigError (a ValueError)
    when ``max_datagram`` leaves no room for a payload byte or ``message`` exceeds 16 KiB.
    """
    cdef unsigned int t = _as_u8(msg_type, "msg_type")
    cdef unsigned int s = _as_u8(msg_seq, "msg_seq")
    cdef Py_buffer view
    cdef Py_ssize_t n, off, chunk, take
    cdef const unsigned char* src
    cdef const unsigned char* r
    cdef list out = []
    _check_rid(rid)
    if not isinstance(max_datagram, int):
        raise ConfigError("max_datagram must be an int")
    if max_datagram <= HS_RECORD_OVERHEAD:
        raise ConfigError("max_datagram leaves no room for a fragment byte (need > 39)")
    if not is_known_type(t):
        raise ConfigError("unknown msg_type")
    # The u16 length field bounds one record's fragment; MAX_MESSAGE is far below it anyway.
    chunk = <Py_ssize_t>min(max_datagram - HS_RECORD_OVERHEAD, MAX_MESSAGE)
    PyObject_GetBuffer(message, &view, PyBUF_SIMPLE)
    try:
        n = view.len
        src = <const unsigned char*>view.buf
        if n > MAX_MESSAGE:
            raise ConfigError("handshake message larger than 16 KiB")
        if not is_message_type(t):
            why = _field_error(t, s, 0, <uint64_t>n, <uint64_t>n)
            if why is not None:
                raise ConfigError("handshake record: " + why)
            if n > chunk:
                raise ConfigError("acks and error responses must fit in one datagram")
        r = <const unsigned char*>PyBytes_AS_STRING(rid)
        if n == 0:
            out.append(_encode_raw(t, r, s, 0, 0, src, 0))
            return out
        off = 0
        while off < n:
            take = min(chunk, n - off)
            out.append(_encode_raw(t, r, s, <uint32_t>off, <uint32_t>n, src + off, take))
            off += take
        return out
    finally:
        PyBuffer_Release(&view)


# --- HandshakeAck --------------------------------------------------------------------------

cdef str _ranges_error(unsigned int acked_type, object ranges):
    """Why a list of (start, end) pairs is not a canonical ack, or None."""
    cdef uint64_t prev_end = 0
    cdef bint first = True
    if not is_message_type(acked_type):
        return "acked_type is not a reassembled message type"
    if len(ranges) > ACK_MAX_RANGES:
        return "more than 16 ranges"
    for start, end in ranges:
        if not (isinstance(start, int) and isinstance(end, int)):
            return "range bounds must be ints"
        if start < 0 or start >= end or end > MAX_MESSAGE:
            return "range is empty, negative or beyond 16 KiB"
        # Strictly greater: touching ranges must have been merged (one encoding per set).
        if not first and <uint64_t>start <= prev_end:
            return "ranges not sorted and merged"
        prev_end = <uint64_t>end
        first = False
    return None


cdef HandshakeAck decode_ack_ptr(const unsigned char* p, Py_ssize_t n):
    """Decode an ack body (the fragment of a 0x7E record), or raise DecodeError."""
    cdef Py_ssize_t count, i
    cdef uint32_t start, end, prev_end = 0
    if n < ACK_HEADER_LEN:
        raise _malformed("ack body shorter than 3 bytes")
    if not is_message_type(p[0]):
        raise _malformed("ack names a type that is never acknowledged")
    count = p[2]
    if count > ACK_MAX_RANGES:
        raise _malformed("ack carries more than 16 ranges")
    if n != ACK_HEADER_LEN + count * ACK_RANGE_LEN:
        raise _malformed("ack body length does not match its range count")
    cdef list ranges = []
    for i in range(count):
        start = load_u32(p + ACK_HEADER_LEN + i * ACK_RANGE_LEN)
        end = load_u32(p + ACK_HEADER_LEN + i * ACK_RANGE_LEN + 4)
        if start >= end or end > MAX_MESSAGE:
            raise _malformed("ack range empty or beyond 16 KiB")
        if i and start <= prev_end:
            raise _malformed("ack ranges not sorted and merged")
        prev_end = end
        ranges.append((start, end))
    cdef HandshakeAck ack = HandshakeAck.__new__(HandshakeAck)
    ack.acked_type = p[0]
    ack.acked_seq = p[1]
    ack.ranges = tuple(ranges)
    return ack


def decode_ack(data) -> HandshakeAck:
    """Decode a HandshakeAck body. Raises only DecodeError for bad bytes."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return decode_ack_ptr(<const unsigned char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


@cython.final
cdef class HandshakeAck:
    """What a receiver holds of one message: half-open byte ranges, sorted and merged."""

    def __init__(self, acked_type, acked_seq, ranges=()):
        cdef unsigned int t = _as_u8(acked_type, "acked_type")
        cdef unsigned int s = _as_u8(acked_seq, "acked_seq")
        cdef tuple rs = tuple((r[0], r[1]) for r in ranges)
        why = _ranges_error(t, rs)
        if why is not None:
            raise ConfigError("handshake ack: " + why)
        self.acked_type = <uint8_t>t
        self.acked_seq = <uint8_t>s
        self.ranges = rs

    cpdef bytes encode(self):
        """The ack body (3 + 8 x count bytes)."""
        cdef Py_ssize_t count = len(self.ranges)
        cdef Py_ssize_t i = 0
        cdef bytes out = PyBytes_FromStringAndSize(NULL, ACK_HEADER_LEN + count * ACK_RANGE_LEN)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
        p[0] = self.acked_type
        p[1] = self.acked_seq
        p[2] = <unsigned char>count
        for start, end in self.ranges:
            store_u32(p + ACK_HEADER_LEN + i * ACK_RANGE_LEN, <uint32_t>start)
            store_u32(p + ACK_HEADER_LEN + i * ACK_RANGE_LEN + 4, <uint32_t>end)
            i += 1
        return out

    def to_record(self, bytes rid not None) -> bytes:
        """This ack wrapped in its 0x7E record, ready to send (msg_seq 0, unfragmented)."""
        cdef bytes body = self.encode()
        _check_rid(rid)
        return _encode_raw(MSG_HANDSHAKE_ACK, <const unsigned char*>PyBytes_AS_STRING(rid), 0,
                           0, <uint32_t>PyBytes_GET_SIZE(body),
                           <const unsigned char*>PyBytes_AS_STRING(body),
                           PyBytes_GET_SIZE(body))

    @staticmethod
    def decode(data) -> HandshakeAck:
        """Same as the module-level :func:`decode_ack`."""
        return decode_ack(data)

    def covers(self, start, end) -> bool:
        """True when the bytes [start, end) all lie inside one acked range. Ranges are merged,
        so a span held by the receiver always sits inside a single range."""
        for rs, re in self.ranges:
            if rs <= start and end <= re:
                return True
        return False

    def __eq__(self, other):
        if not isinstance(other, HandshakeAck):
            return NotImplemented
        cdef HandshakeAck o = <HandshakeAck>other
        return (self.acked_type == o.acked_type and self.acked_seq == o.acked_seq
                and self.ranges == o.ranges)

    def __hash__(self):
        return hash((self.acked_type, self.acked_seq, self.ranges))

    def __repr__(self):
        return (f"HandshakeAck(acked_type={self.acked_type}, acked_seq={self.acked_seq}, "
                f"ranges={list(self.ranges)!r})")
