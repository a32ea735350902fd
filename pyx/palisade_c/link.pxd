# Declarations of the C link codec (firmware_bridge/c/pal_link.h) and of the FrameDecoder
# class, for Cython modules that want to drive the decoder without Python calls per frame.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t


cdef extern from "pal_link.h" nogil:
    enum:
        PAL_LINK_VERSION
        PAL_LINK_DEFAULT_MTU
        PAL_LINK_MIN_MTU
        PAL_LINK_MAX_PAYLOAD
        PAL_LINK_CH_DATA
        PAL_LINK_CH_LOG
        PAL_LINK_CH_CONTROL
        PAL_LINK_FRAME_OVERHEAD
        PAL_LINK_CTL_HELLO
        PAL_LINK_CTL_PING
        PAL_LINK_CTL_PONG
        PAL_LINK_HELLO_LEN
        PAL_LINK_HELLO_NODE_LEN
        PAL_LINK_NODE_ID_LEN
        PAL_LINK_PING_LEN
        PAL_LINK_ERR_SPACE
        PAL_LINK_ERR_TOO_LONG
        PAL_LINK_ERR_MALFORMED
        PAL_LINK_ERR_VERSION
        PAL_LINK_ERR_MTU

    ctypedef struct pal_link_stats_t:
        uint32_t frames
        uint32_t crc_errors
        uint32_t oversize
        uint32_t cobs_errors
        uint32_t short_frames

    ctypedef struct pal_link_frame_t:
        const uint8_t* payload
        size_t len
        uint8_t channel

    ctypedef struct pal_link_dec_t:
        size_t cap
        size_t len
        pal_link_stats_t stats

    ctypedef struct pal_link_hello_t:
        uint8_t version
        uint16_t mtu
        uint32_t boot_counter
        uint8_t has_node_id
        uint8_t node_id[8]

    uint32_t pal_link_crc32(uint32_t crc, const uint8_t* data, size_t len)
    int32_t pal_link_encode(uint8_t channel, const uint8_t* payload, size_t len, uint8_t* out,
                            size_t cap)
    size_t pal_link_encoded_max(size_t payload_len)
    void pal_link_dec_init(pal_link_dec_t* d, uint8_t* buf, size_t cap)
    void pal_link_dec_reset(pal_link_dec_t* d)
    int pal_link_dec_feed(pal_link_dec_t* d, const uint8_t* data, size_t len, size_t* consumed,
                          pal_link_frame_t* frame)
    size_t pal_link_hello_build(uint8_t* out, const pal_link_hello_t* hello)
    size_t pal_link_hello_build_node(uint8_t* out, const pal_link_hello_t* hello,
                                     const uint8_t* node_id)
    size_t pal_link_ping_build(uint8_t* out, uint32_t token)
    size_t pal_link_pong_build(uint8_t* out, uint32_t token)
    int pal_link_ctl_type(const uint8_t* payload, size_t len)
    int pal_link_hello_parse(const uint8_t* payload, size_t len, pal_link_hello_t* hello)
    int pal_link_token_parse(const uint8_t* payload, size_t len, uint32_t* token)
    uint16_t pal_link_negotiate_mtu(uint16_t ours, uint16_t theirs)


cdef class FrameDecoder:
    cdef pal_link_dec_t _dec
    cdef uint8_t* _buf
    cdef readonly Py_ssize_t max_payload

    # Decodes n bytes and appends a (channel, payload) tuple to `out` for each good frame.
    cdef int feed_into(self, const uint8_t* data, size_t n, list out) except -1
