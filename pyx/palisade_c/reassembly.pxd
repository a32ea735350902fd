# Declarations of the handshake delivery state (reassembly.pyx), for other compiled modules to
# cimport.

# Every class is final: the table builds Reassemblers without running __init__ and Flight has a
# second constructor (from_message), so a subclass could never count on its own __init__.
cimport cython

from palisade_c.hsrecord cimport ACK_MAX_RANGES, HandshakeAck, HandshakeRecord

# One held (or acked) byte range of a message: half-open [start, end).
ctypedef struct Span:
    Py_ssize_t start
    Py_ssize_t end

# What Reassembler._add did with a fragment (the public add turns REJECTED into DecodeError).
cdef enum:
    ADD_PARTIAL = 0      # new bytes stored, message still incomplete
    ADD_COMPLETE = 1     # this fragment completed the message
    ADD_DUPLICATE = 2    # nothing new (duplicates was incremented)
    ADD_REJECTED = 3     # contradicts what is held; nothing changed (rejected was incremented)

# Spans a Reassembler holds without a heap allocation: in-order delivery only ever needs one.
cdef enum:
    INLINE_SPANS = 4


@cython.final
cdef class Reassembler:
    cdef Py_ssize_t _max_message
    cdef Py_ssize_t _max_fragments
    cdef bint _started              # False: msg_type is None for Python callers
    cdef int _msg_type
    cdef int _msg_seq
    cdef Py_ssize_t _msg_length
    cdef bytes _buf                 # filled in place; the message itself once complete
    cdef Span* _ranges              # sorted, merged; points at _inline or a PyMem block
    cdef Py_ssize_t _nranges
    cdef Py_ssize_t _cap
    cdef Span _inline[INLINE_SPANS]
    cdef Py_ssize_t _fragments
    cdef bint _complete
    cdef str _why                   # reason of the last ADD_REJECTED
    cdef double _created            # set by ReassemblyTable: when it took the first fragment
    cdef public Py_ssize_t duplicates
    cdef public Py_ssize_t rejected

    cdef void _reset(self, Py_ssize_t max_message, Py_ssize_t max_fragments) noexcept
    cdef int _reject(self, str why) noexcept
    cdef int _reserve(self, Py_ssize_t n) except -1
    cdef int _add(self, HandshakeRecord record) except -1
    cdef bytes _message(self)
    cdef HandshakeAck _ack(self)


@cython.final
cdef class ReassemblyTable:
    cdef Py_ssize_t _max_messages
    cdef Py_ssize_t _max_message
    cdef Py_ssize_t _max_fragments
    cdef bint _has_max_age          # False: max_age=None, nothing expires
    cdef double _max_age
    cdef Py_ssize_t _max_completed
    cdef dict _entries              # key -> Reassembler (its _created is the entry's age)
    cdef dict _completed            # key -> (completion time, msg_length); insertion = age order
    cdef public Py_ssize_t refused
    cdef public Py_ssize_t malformed
    cdef public Py_ssize_t expired

    cdef int _mark_completed(self, tuple key, double now, Py_ssize_t msg_length) except -1
    cdef Py_ssize_t _expire(self, double now) except -1
    # add() for compiled callers (the connection's per-fragment path).
    cdef object _add_record(self, HandshakeRecord record, double now, bint ack)


@cython.final
cdef class Flight:
    cdef bytes _rid
    cdef int _msg_type
    cdef int _msg_seq
    cdef Py_ssize_t _msg_length
    cdef tuple _records             # the encoded records, in message order
    cdef Span* _spans               # _spans[i]: the message bytes _records[i] carries (PyMem)
    cdef Py_ssize_t _nspans
    cdef Py_ssize_t _total_bytes
    cdef bint _has_ack              # False: no ack yet (resend everything)
    cdef Span _ack[ACK_MAX_RANGES]  # the latest ack's ranges, sorted and merged
    cdef Py_ssize_t _nack

    cdef int _alloc_spans(self, Py_ssize_t n) except -1
    cdef bint _acked(self, Py_ssize_t i) noexcept
    # on_ack() and acknowledged for compiled callers.
    cdef bint _on_ack(self, HandshakeAck ack) except -1
    cdef bint _acknowledged(self) noexcept


@cython.final
cdef class RetransmitTimer:
    cdef object _rng
    cdef double _initial
    cdef double _maximum
    cdef Py_ssize_t _max_attempts
    cdef double _jitter
    cdef double _floor
    cdef double _rto
    cdef Py_ssize_t _attempts
    cdef bint _running              # False: deadline is None
    cdef double _deadline

    cdef int _arm(self, double now) except -1
    # start(), stop() and scale_for_link() for compiled callers.
    cdef int _start(self, double now) except -1
    cdef void _stop(self) noexcept
    cdef int _scale_for_link(self, object bytes_in_flight, object bits_per_second) except -1


@cython.final
cdef class AmplificationLimiter:
    cdef long long _factor
    cdef long long _received
    cdef long long _sent
    cdef bint _validated

    # on_received(), on_sent() and can_send() for compiled callers.
    cdef int _on_received(self, long long n) except -1
    cdef int _on_sent(self, long long n) except -1
    cdef bint _can_send(self, long long n) except -1
