# Declarations of the handshake-record codec (PROFILE §4), for other compiled modules to cimport.

# Both classes are final: the decoders build instances without running __init__, so a subclass
# could never count on its own constructor having run.
cimport cython
from libc.stdint cimport uint8_t, uint32_t

# Anonymous cpdef enum: each name is a C constant here and a plain int for Python callers.
cpdef enum:
    # Record layout [profile §4]: the 30-byte outer header, then the 9-byte fragment header.
    HS_HEADER_LEN = 30
    FRAG_HEADER_LEN = 9
    HS_RECORD_OVERHEAD = 39
    HS_VERSION = 0x12
    RID_LEN = 24
    RID_OFFSET = 6
    # Largest handshake message a receiver will reassemble [profile].
    MAX_MESSAGE = 16384
    # msg_type values [profile §4].
    MSG_CLIENT_HELLO = 1
    MSG_SERVER_HELLO = 2
    MSG_CLIENT_FINISHED = 3
    MSG_CLIENT_HELLO_RESUME = 4
    MSG_SERVER_HELLO_RESUME = 5
    MSG_CLIENT_FINISHED_RESUME = 6
    MSG_RETRY = 0x7D          # stateless cookie retry [profile]
    MSG_HANDSHAKE_ACK = 0x7E
    MSG_ERROR_RESPONSE = 0x7F
    # HandshakeAck body: acked_type u8 | acked_seq u8 | count u8 | count x (start u32, end u32).
    ACK_HEADER_LEN = 3
    ACK_RANGE_LEN = 8
    ACK_MAX_RANGES = 16


@cython.final
cdef class HandshakeRecord:
    cdef readonly uint8_t msg_type
    cdef readonly bytes rid
    cdef readonly uint8_t msg_seq
    cdef readonly uint32_t frag_offset
    cdef readonly uint32_t msg_length
    cdef readonly bytes fragment

    cpdef bytes encode(self)


@cython.final
cdef class HandshakeAck:
    cdef readonly uint8_t acked_type
    cdef readonly uint8_t acked_seq
    cdef readonly tuple ranges

    cpdef bytes encode(self)


cdef bint is_known_type(unsigned int msg_type) noexcept nogil
# Types that are fragmented, reassembled and acknowledged (not acks, errors or retries).
cdef bint is_message_type(unsigned int msg_type) noexcept nogil
cdef HandshakeRecord decode_ptr(const unsigned char* p, Py_ssize_t n)
cdef HandshakeAck decode_ack_ptr(const unsigned char* p, Py_ssize_t n)
