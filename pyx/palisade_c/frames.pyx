# cython: language_level=3
"""Control-frame codec (spec §14, PROFILE §5).

A control packet (flags bit0 = 1) carries one or more frames, each
``ctrl_type u8 | length u24 | ctrl_data[length]``, packed back to back; a frame never spans
packets [spec §14.2]. ``decode_frames`` is strict about framing (truncation, a length that
overruns, more than ``MAX_FRAMES_PER_PACKET``) but not about types: unknown types come back as
plain :class:`ControlFrame` objects for the caller to ignore [spec §14.3].

The typed payload codecs (REKEY, CLOSE, MIGRATE, PATH_*) are equally strict: exact sizes,
reserved bytes zero, enumerations in range. A malformed payload raises ControlFrameError; the
connection drops such a frame and counts it.
"""

cimport cython
from libc.stdint cimport uint8_t, uint32_t

from palisade_c.errors import ControlFrameError

from palisade_c._endian cimport load_u24, store_u24

CTRL_REKEY = 0x01
CTRL_MIGRATE = 0x02
CTRL_CLOSE = 0x03
# PLUS-only range [profile]; older peers ignore these types by §14.3.
CTRL_NEW_TICKET = 0x10
CTRL_PATH_CHALLENGE = 0x11
CTRL_PATH_RESPONSE = 0x12

KNOWN_TYPES = frozenset({CTRL_REKEY, CTRL_MIGRATE, CTRL_CLOSE, CTRL_NEW_TICKET,
                         CTRL_PATH_CHALLENGE, CTRL_PATH_RESPONSE})

REKEY_ANNOUNCE = 0
REKEY_REQUEST = 1
REKEY_ACK = 2

MAX_FRAME_DATA = 0xFFFFFF
MAX_FRAMES_PER_PACKET = 16
MAX_CLOSE_REASON = 64
MIGRATE_FRAME_LEN = 40
MIGRATE_REASON_SOFT = 0x01
PATH_DATA_LEN = 32


@cython.final
cdef class ControlFrame:
    """One frame: ``ctrl_type`` and its raw ``data``."""

    def __init__(self, int ctrl_type, data=b""):
        if not 0 <= ctrl_type <= 0xFF:
            raise ValueError("ctrl_type must be 0..255")
        data = bytes(data)
        if len(data) > MAX_FRAME_DATA:
            raise ValueError("control frame data exceeds the u24 length field")
        self.ctrl_type = ctrl_type
        self.data = data

    def encode(self) -> bytes:
        cdef uint8_t hdr[4]
        hdr[0] = <uint8_t>self.ctrl_type
        store_u24(hdr + 1, <uint32_t>len(self.data))
        return (<char*>hdr)[:4] + self.data

    def __eq__(self, other):
        if not isinstance(other, ControlFrame):
            return NotImplemented
        return (self.ctrl_type == (<ControlFrame>other).ctrl_type
                and self.data == (<ControlFrame>other).data)

    def __repr__(self) -> str:
        return f"ControlFrame(type=0x{self.ctrl_type:02x}, {len(self.data)} bytes)"


def encode_frames(frames) -> bytes:
    """Concatenate frames into one control-packet payload."""
    frames = list(frames)
    if not frames or len(frames) > MAX_FRAMES_PER_PACKET:
        raise ValueError(f"a control packet carries 1..{MAX_FRAMES_PER_PACKET} frames")
    return b"".join((<ControlFrame?>f).encode() for f in frames)


def decode_frames(payload) -> list:
    """Split a control-packet payload into frames; ControlFrameError if the framing is bad."""
    cdef const uint8_t[::1] buf = bytes(payload)
    cdef Py_ssize_t n = buf.shape[0], off = 0
    cdef uint32_t length
    cdef int ctype
    out = []
    if n == 0:
        raise ControlFrameError("empty control packet")
    while off < n:
        if len(out) >= MAX_FRAMES_PER_PACKET:
            raise ControlFrameError("too many control frames in one packet")
        if n - off < 4:
            raise ControlFrameError("truncated control frame header")
        ctype = buf[off]
        length = load_u24(&buf[off + 1])
        off += 4
        if length > n - off:
            raise ControlFrameError("control frame length overruns the packet")
        out.append(ControlFrame(ctype, bytes(buf[off:off + length])))
        off += length
    return out


# -- typed payloads -----------------------------------------------------------------------------

def encode_rekey(uint32_t next_epoch, int kind) -> ControlFrame:
    """CTRL_REKEY = next_epoch u32 | kind u8 (0 announce, 1 request, 2 ack) [profile]."""
    if kind not in (REKEY_ANNOUNCE, REKEY_REQUEST, REKEY_ACK):
        raise ValueError("rekey kind must be 0, 1 or 2")
    return ControlFrame(CTRL_REKEY, next_epoch.to_bytes(4, "big") + bytes((kind,)))


def decode_rekey(ControlFrame frame) -> tuple:
    """``(next_epoch, kind)``."""
    d = frame.data
    if frame.ctrl_type != CTRL_REKEY or len(d) != 5:
        raise ControlFrameError("CTRL_REKEY payload must be 5 bytes")
    if d[4] > REKEY_ACK:
        raise ControlFrameError(f"unknown rekey kind {d[4]}")
    return int.from_bytes(d[:4], "big"), d[4]


def encode_close(int error_code, bint hard, str reason="") -> ControlFrame:
    """CTRL_CLOSE = error_code u16 | hard u8 | reason_len u8 | reason (UTF-8, ≤ 64) [profile]."""
    if not 0 <= error_code <= 0xFFFF:
        raise ValueError("error_code must fit in u16")
    r = reason.encode("utf-8")
    if len(r) > MAX_CLOSE_REASON:
        # Cut on a character boundary rather than refuse: a close must always be sendable.
        r = r[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return ControlFrame(CTRL_CLOSE, error_code.to_bytes(2, "big") + bytes((hard, len(r))) + r)


def decode_close(ControlFrame frame) -> tuple:
    """``(error_code, hard, reason)``."""
    d = frame.data
    if frame.ctrl_type != CTRL_CLOSE or len(d) < 4:
        raise ControlFrameError("CTRL_CLOSE payload too short")
    if d[2] > 1:
        raise ControlFrameError("CTRL_CLOSE hard flag must be 0 or 1")
    if d[3] > MAX_CLOSE_REASON or len(d) != 4 + d[3]:
        raise ControlFrameError("CTRL_CLOSE reason length mismatch")
    try:
        reason = d[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise ControlFrameError("CTRL_CLOSE reason is not UTF-8") from None
    return int.from_bytes(d[:2], "big"), bool(d[2]), reason


def encode_migrate(bytes migrate_nonce, uint32_t peer_epoch_observed,
                   int reason=MIGRATE_REASON_SOFT) -> ControlFrame:
    """MigrateFrame = nonce[32] | peer_epoch_observed u32 | reason u8 | reserved[3] [spec §13.2.1]."""
    if len(migrate_nonce) != 32:
        raise ValueError("migrate_nonce must be 32 bytes")
    if not 0 <= reason <= 0xFF:
        raise ValueError("reason must fit in u8")
    return ControlFrame(CTRL_MIGRATE, migrate_nonce + peer_epoch_observed.to_bytes(4, "big")
                        + bytes((reason, 0, 0, 0)))


def decode_migrate(ControlFrame frame) -> tuple:
    """``(migrate_nonce, peer_epoch_observed, reason)``; reserved bytes must be zero."""
    d = frame.data
    if frame.ctrl_type != CTRL_MIGRATE or len(d) != MIGRATE_FRAME_LEN:
        raise ControlFrameError("MigrateFrame must be 40 bytes")
    if d[37] or d[38] or d[39]:
        raise ControlFrameError("MigrateFrame reserved bytes must be zero")
    return d[:32], int.from_bytes(d[32:36], "big"), d[36]


def encode_path(int ctrl_type, bytes data) -> ControlFrame:
    """PATH_CHALLENGE / PATH_RESPONSE carry 32 bytes [profile]."""
    if ctrl_type not in (CTRL_PATH_CHALLENGE, CTRL_PATH_RESPONSE):
        raise ValueError("not a path frame type")
    if len(data) != PATH_DATA_LEN:
        raise ValueError("path challenge data must be 32 bytes")
    return ControlFrame(ctrl_type, data)


def decode_path(ControlFrame frame) -> bytes:
    if frame.ctrl_type not in (CTRL_PATH_CHALLENGE, CTRL_PATH_RESPONSE):
        raise ControlFrameError("not a path frame")
    if len(frame.data) != PATH_DATA_LEN:
        raise ControlFrameError("path frame data must be 32 bytes")
    return frame.data
