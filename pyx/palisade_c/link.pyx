# cython: language_level=3
"""Serial link framing for device peers (PROFILE §10, firmware_bridge/LINK.md).

A thin binding over the C codec in ``firmware_bridge/c/pal_link.c``: that file is compiled
into this extension as it is, so the host and the firmware run the very same framing code.

Frame on the wire: ``COBS(channel u8 ‖ payload ‖ CRC-32 LE over channel‖payload) ‖ 0x00``.
Channel 0 carries PALISADE datagrams, 1 device log text, 2 link control (HELLO, PING, PONG;
their payloads are built and parsed here too, and sent with :func:`encode_frame`).

Theory of operation
-------------------
:func:`encode_frame` encodes into a stack buffer (a heap one for payloads too large for it) in
one C call and copies the result into a new ``bytes``. :class:`FrameDecoder` owns one fixed
buffer of ``max_payload + 5`` bytes, allocated when it is made and never grown, whatever it is
fed; ``feed`` hands the whole input to the C decoder, which returns at each good frame, and the
only Python work per frame is the ``(channel, payload)`` tuple. Frames that fail (bad CRC, too
long, cut short) are counted, never raised: a serial line is noisy, and the decoder always
resynchronises at the next 0x00.
"""

from collections import namedtuple as _namedtuple

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t

from palisade_c.errors import ConfigError, DecodeError, PacketTooLargeError

LINK_VERSION = PAL_LINK_VERSION
DEFAULT_MTU = PAL_LINK_DEFAULT_MTU
MIN_MTU = PAL_LINK_MIN_MTU
MAX_PAYLOAD = PAL_LINK_MAX_PAYLOAD
FRAME_OVERHEAD = PAL_LINK_FRAME_OVERHEAD

CHANNEL_DATA = PAL_LINK_CH_DATA
CHANNEL_LOG = PAL_LINK_CH_LOG
CHANNEL_CONTROL = PAL_LINK_CH_CONTROL

CTL_HELLO = PAL_LINK_CTL_HELLO
CTL_PING = PAL_LINK_CTL_PING
CTL_PONG = PAL_LINK_CTL_PONG

NODE_ID_LEN = PAL_LINK_NODE_ID_LEN

Hello = _namedtuple("Hello", ["version", "mtu", "boot_counter", "node_id"],
                    defaults=(None,), module="palisade_c.link")
Hello.__doc__ = ("A parsed HELLO: link version, MTU (payload bytes), boot counter and, from "
                 "version 2, the device's node id (8 bytes) or None.")

cdef enum:
    # Frames up to this size are encoded on the stack; PAL_LINK_ENCODED_MAX(1500) fits.
    _STACK_OUT = 1536


# --- frames -----------------------------------------------------------------------------------

def encode_frame(int channel, data) -> bytes:
    """The wire bytes (delimiter included) of one frame carrying ``data`` on ``channel``."""
    cdef Py_buffer view
    cdef uint8_t stack_out[_STACK_OUT]
    cdef uint8_t* out = stack_out
    cdef size_t cap
    cdef int32_t n
    if channel < 0 or channel > 255:
        raise ValueError(f"channel must be 0..255, got {channel}")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if <size_t>view.len > PAL_LINK_MAX_PAYLOAD:
            raise PacketTooLargeError(
                f"link payload of {view.len} bytes exceeds {PAL_LINK_MAX_PAYLOAD}"
            )
        cap = pal_link_encoded_max(<size_t>view.len)
        if cap > _STACK_OUT:
            out = <uint8_t*>PyMem_Malloc(cap)
            if out == NULL:
                raise MemoryError()
        n = pal_link_encode(<uint8_t>channel, <const uint8_t*>view.buf, <size_t>view.len,
                            out, cap)
        # The buffer is the worst case, so the codec cannot fail; check anyway, cheaply.
        if n < 0:
            raise AssertionError(f"pal_link_encode failed with {n}")
        return PyBytes_FromStringAndSize(<char*>out, n)
    finally:
        if out != stack_out:
            PyMem_Free(out)
        PyBuffer_Release(&view)


def encoded_max(Py_ssize_t payload_len) -> int:
    """Worst-case wire size (delimiter included) of a frame with ``payload_len`` bytes."""
    if payload_len < 0 or payload_len > PAL_LINK_MAX_PAYLOAD:
        raise ValueError(f"payload length must be 0..{PAL_LINK_MAX_PAYLOAD}")
    return pal_link_encoded_max(<size_t>payload_len)


def crc32(data, uint32_t value=0) -> int:
    """CRC-32 of ``data`` as the link computes it; same results as :func:`zlib.crc32`."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return pal_link_crc32(value, <const uint8_t*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)


cdef class FrameDecoder:
    """Byte-stream to frames, in bounded memory.

    ``feed`` accepts any amount of input, in pieces of any size, and returns the good frames
    it completed as ``(channel, payload)`` tuples. Frames longer than ``max_payload`` bytes of
    payload, with a bad CRC, or broken by lost bytes are dropped and counted; decoding picks up
    again at the next 0x00.
    """

    def __cinit__(self, Py_ssize_t max_payload=PAL_LINK_DEFAULT_MTU):
        cdef size_t cap
        if max_payload < 0 or max_payload > PAL_LINK_MAX_PAYLOAD:
            raise ConfigError(f"max_payload must be 0..{PAL_LINK_MAX_PAYLOAD}, got {max_payload}")
        cap = <size_t>max_payload + PAL_LINK_FRAME_OVERHEAD
        self._buf = <uint8_t*>PyMem_Malloc(cap)
        if self._buf == NULL:
            raise MemoryError()
        self.max_payload = max_payload
        pal_link_dec_init(&self._dec, self._buf, cap)

    def __dealloc__(self):
        PyMem_Free(self._buf)

    cdef int feed_into(self, const uint8_t* data, size_t n, list out) except -1:
        cdef pal_link_frame_t frame
        cdef size_t used
        while n > 0:
            if pal_link_dec_feed(&self._dec, data, n, &used, &frame):
                out.append(
                    (frame.channel, PyBytes_FromStringAndSize(<const char*>frame.payload,
                                                              <Py_ssize_t>frame.len))
                )
            data += used
            n -= used
        return 0

    def feed(self, data) -> list:
        """Decode ``data`` (any bytes-like object); returns the frames it completed."""
        cdef Py_buffer view
        cdef list out = []
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self.feed_into(<const uint8_t*>view.buf, <size_t>view.len, out)
        finally:
            PyBuffer_Release(&view)
        return out

    def reset(self) -> None:
        """Drop any partial frame (for example after reopening the port). Counters stay."""
        pal_link_dec_reset(&self._dec)

    @property
    def pending(self) -> int:
        """Decoded bytes of the frame in progress (never more than ``max_payload + 5``)."""
        return self._dec.len

    @property
    def frames(self) -> int:
        """Good frames delivered."""
        return self._dec.stats.frames

    @property
    def crc_errors(self) -> int:
        """Frames dropped because their CRC did not match."""
        return self._dec.stats.crc_errors

    @property
    def oversize(self) -> int:
        """Frames dropped for being longer than ``max_payload``."""
        return self._dec.stats.oversize

    @property
    def cobs_errors(self) -> int:
        """Frames dropped because a delimiter cut a COBS block short (bytes were lost)."""
        return self._dec.stats.cobs_errors

    @property
    def short_frames(self) -> int:
        """Non-empty frames too short to hold a channel byte and a CRC."""
        return self._dec.stats.short_frames

    def counters(self) -> dict:
        """All counters by name (the property names)."""
        cdef pal_link_stats_t* s = &self._dec.stats
        return {
            "frames": s.frames,
            "crc_errors": s.crc_errors,
            "oversize": s.oversize,
            "cobs_errors": s.cobs_errors,
            "short_frames": s.short_frames,
        }


# --- link control (channel 2) -----------------------------------------------------------------

def encode_hello(version, mtu, boot_counter, node_id=None) -> bytes:
    """HELLO control payload (send it on CHANNEL_CONTROL).

    With ``node_id`` (8 bytes) it is the 16-byte version 2 form that announces the device's
    node id to a gateway (LINK.md §6.1); the version byte is then at least 2.
    """
    cdef pal_link_hello_t h
    cdef uint8_t out[PAL_LINK_HELLO_NODE_LEN]
    cdef const uint8_t* node
    if version < 1 or version > 255:
        raise ValueError(f"link version must be 1..255, got {version}")
    if mtu < PAL_LINK_MIN_MTU or mtu > PAL_LINK_MAX_PAYLOAD:
        raise ValueError(f"link MTU must be {PAL_LINK_MIN_MTU}..{PAL_LINK_MAX_PAYLOAD}, got {mtu}")
    if boot_counter < 0 or boot_counter > 0xFFFFFFFF:
        raise ValueError(f"boot counter must fit in 32 bits, got {boot_counter}")
    h.version = <uint8_t>version
    h.mtu = <uint16_t>mtu
    h.boot_counter = <uint32_t>boot_counter
    h.has_node_id = 0
    if node_id is None:
        return PyBytes_FromStringAndSize(<char*>out, <Py_ssize_t>pal_link_hello_build(out, &h))
    node_id = bytes(node_id)
    if len(node_id) != PAL_LINK_NODE_ID_LEN:
        raise ValueError(f"node id must be {PAL_LINK_NODE_ID_LEN} bytes, got {len(node_id)}")
    node = <const uint8_t*><const char*>node_id
    return PyBytes_FromStringAndSize(<char*>out,
                                     <Py_ssize_t>pal_link_hello_build_node(out, &h, node))


def parse_hello(payload) -> Hello:
    """Parse a HELLO payload; raises DecodeError if it is malformed."""
    cdef Py_buffer view
    cdef pal_link_hello_t h
    cdef int rc
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        rc = pal_link_hello_parse(<const uint8_t*>view.buf, <size_t>view.len, &h)
    finally:
        PyBuffer_Release(&view)
    if rc == PAL_LINK_ERR_VERSION:
        raise DecodeError("HELLO announces link version 0")
    if rc == PAL_LINK_ERR_MTU:
        raise DecodeError(f"HELLO announces an MTU below {PAL_LINK_MIN_MTU}")
    if rc != 0:
        raise DecodeError("not a HELLO payload (wrong type or too short)")
    return Hello(h.version, h.mtu, h.boot_counter,
                 PyBytes_FromStringAndSize(<char*>h.node_id, PAL_LINK_NODE_ID_LEN)
                 if h.has_node_id else None)


cdef bytes _token_message(uint8_t kind, token):
    cdef uint8_t out[PAL_LINK_PING_LEN]
    if token < 0 or token > 0xFFFFFFFF:
        raise ValueError(f"token must fit in 32 bits, got {token}")
    if kind == PAL_LINK_CTL_PING:
        pal_link_ping_build(out, <uint32_t>token)
    else:
        pal_link_pong_build(out, <uint32_t>token)
    return PyBytes_FromStringAndSize(<char*>out, PAL_LINK_PING_LEN)


def encode_ping(token) -> bytes:
    """PING control payload carrying a 32-bit token."""
    return _token_message(PAL_LINK_CTL_PING, token)


def encode_pong(token) -> bytes:
    """PONG control payload; answers a PING by echoing its token."""
    return _token_message(PAL_LINK_CTL_PONG, token)


def parse_token(payload) -> int:
    """Token of a PING or PONG payload (see :func:`control_type` for which)."""
    cdef Py_buffer view
    cdef uint32_t token = 0
    cdef int rc
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        rc = pal_link_token_parse(<const uint8_t*>view.buf, <size_t>view.len, &token)
    finally:
        PyBuffer_Release(&view)
    if rc != 0:
        raise DecodeError("not a PING or PONG payload (wrong type or too short)")
    return token


def control_type(payload) -> int:
    """Message type of a control payload (CTL_*); unknown types are for the caller to ignore."""
    cdef Py_buffer view
    cdef int rc
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        rc = pal_link_ctl_type(<const uint8_t*>view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    if rc < 0:
        raise DecodeError("empty control payload")
    return rc


def negotiate_mtu(ours, theirs) -> int:
    """The link MTU after a HELLO exchange: the smaller of the two announcements."""
    if not (PAL_LINK_MIN_MTU <= ours <= PAL_LINK_MAX_PAYLOAD
            and PAL_LINK_MIN_MTU <= theirs <= PAL_LINK_MAX_PAYLOAD):
        raise ValueError(f"MTUs must be {PAL_LINK_MIN_MTU}..{PAL_LINK_MAX_PAYLOAD}")
    return pal_link_negotiate_mtu(<uint16_t>ours, <uint16_t>theirs)
