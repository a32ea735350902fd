from libc.stdint cimport uint8_t, uint32_t, uint64_t

from palisade_c.epoch cimport EpochMachine, TrafficKey

cdef enum:
    PUBLIC_HEADER_LEN = 30
    ENC_HEADER_LEN = 15
    HEADER_LEN = 45          # PublicHeader + EncryptedHeader
    TAG_LEN = 16
    SAMPLE_LEN = 16
    RID_LEN = 24
    MIN_PACKET_LEN = 61      # headers + tag: the smallest packet that carries a sample
    MAX_LENGTH_FIELD = 65535

cdef enum:  # drop reasons, index into DROP_REASON_NAMES
    DROP_TRUNCATED = 0
    DROP_TOO_LARGE
    DROP_BAD_MAGIC
    DROP_BAD_VERSION
    DROP_RESERVED_BITS
    DROP_BAD_LENGTH
    DROP_UNKNOWN_RID
    DROP_BAD_PADDING
    DROP_KEY_PHASE
    DROP_EPOCH
    DROP_REPLAY
    DROP_AEAD
    DROP_ERASED
    DROP_N_REASONS


cdef class BufferWindow:
    cdef uint8_t* ptr
    cdef Py_ssize_t n
    cdef bint ro
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    cdef inline void point(self, const uint8_t* ptr, Py_ssize_t n, bint ro) noexcept


cdef class Record:
    cdef readonly bytes payload
    cdef readonly int stream_id
    cdef readonly uint32_t epoch
    cdef readonly uint64_t seq
    cdef readonly bint control


cdef class RecordLayer:
    cdef readonly EpochMachine epochs
    cdef readonly bint is_client
    cdef readonly bint early
    cdef uint8_t _rid[RID_LEN]
    cdef object _hp_tx_ctx
    cdef object _hp_rx_ctx
    cdef object _hp_tx
    cdef object _hp_rx
    cdef uint8_t _mask[32]
    cdef uint8_t _nonce[12]
    cdef uint8_t _aad[HEADER_LEN]
    cdef BufferWindow _w_nonce
    cdef BufferWindow _w_aad
    cdef BufferWindow _w_mask
    cdef BufferWindow _w_sample
    cdef BufferWindow _w_in
    cdef BufferWindow _w_out
    cdef bytearray _scratch
    cdef readonly Py_ssize_t max_packet_size
    cdef uint64_t _drops[DROP_N_REASONS]
    cdef readonly uint64_t packets_sealed
    cdef readonly uint64_t packets_opened
    cdef readonly uint64_t bytes_sealed
    cdef readonly uint64_t bytes_opened
    cdef readonly uint64_t dummies_received

    cdef bytes _seal(self, object payload, int stream_id, bint control, Py_ssize_t pad, double now)
    cdef Record _open(self, bytes data, double now)
    cdef Record _drop(self, int reason)
    cdef Record _open_other(self, object data, double now)
    cdef inline void _protect(self, uint8_t* pkt, object hp) except *
