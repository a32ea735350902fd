from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    # Ring words for the largest window (4096 packets = 64 words) plus one spare (replay.pyx).
    REPLAY_MAX_WORDS = 65
    REPLAY_MIN_SIZE = 64
    REPLAY_MAX_SIZE = 4096
    REPLAY_DEFAULT_SIZE = 1024


cdef class ReplayWindow:
    cdef uint64_t _bits[REPLAY_MAX_WORDS]
    cdef readonly uint32_t size
    cdef uint32_t _nwords
    cdef uint64_t _top
    cdef bint _empty

    cdef bint check(self, uint64_t seq) noexcept
    cdef void mark(self, uint64_t seq) noexcept
    cdef void clear(self) noexcept
