# cython: language_level=3
"""Record layer: encrypted packets on the wire (spec §8-§10, PROFILE §4).

Packet layout::

    PublicHeader (30, clear)      magic "QP" | version 0x12 | flags | length u16 | rid[24]
    EncryptedHeader (15, masked)  epoch_id u32 | seq u64 | stream_id u8 | pad_len u16
    AEAD output                   ChaCha20-Poly1305(payload ‖ zeros(pad_len)) ‖ tag[16]

Theory of operation
-------------------
``seal`` writes the whole packet into one freshly allocated ``bytes`` object: headers first
(unmasked, because the AAD is the unmasked 45 bytes), then the AEAD output straight into place
with ``encrypt_into``, then the header-protection mask, computed by a long-lived AES-256-ECB
context over the first 16 bytes of AEAD output, is XORed over the EncryptedHeader.

``open`` runs the cheap checks first and in a fixed order (size, magic, version, reserved flag
bits, length, RID), so a hostile packet costs no cryptography. It then unmasks a copy of the
header, asks the epoch machine which key(s) may open it (at most two attempts, the indicated
key_phase first), checks the replay window, and decrypts straight into the payload object.
Only after the AEAD accepted does the packet touch any state: replay marking and the commit
counters of the epoch machine. Every rejection returns None and bumps one counter; nothing a
peer sends can raise out of ``open``.

The ``cryptography`` calls receive ``BufferWindow`` objects: small reusable views over C memory
that the layer re-points for each call, so the per-packet path allocates only the packet (seal)
or the payload and its ``Record`` (open).
"""

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
# Imported by name: cryptography wraps the algorithms and modes modules to warn about deprecated
# names, and every attribute read through the wrapper raises and catches an AttributeError.
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import ECB

from palisade_c.errors import (
    ConfigError,
    PacketTooLargeError,
    SequenceExhaustedError,
    StateError,
    DecodeError,
)
from palisade_c.keyschedule import DIR_C2S, DIR_S2C, header_protection_key, wipe
from palisade_c.epoch import SEQ_HARD_LIMIT

from palisade_c._endian cimport load_u16, load_u32, load_u64, store_u16, store_u32, store_u64
from palisade_c.epoch cimport EpochMachine, TrafficKey

MAGIC = b"QP"
VERSION = 0x12
FLAG_CONTROL = 0x01
FLAG_KEY_PHASE = 0x04
FLAGS_RESERVED = 0xFA        # bit 1 and bits 3-7 [spec §8.1.1]
STREAM_KEEPALIVE = 0xFE      # empty payload, delivers nothing [profile]
STREAM_DUMMY = 0xFF          # shaping filler, discarded after decryption [spec §10]
EARLY_DATA_EPOCH = 0xFFFFFFFF
DEFAULT_MAX_PACKET_SIZE = PUBLIC_HEADER_LEN + MAX_LENGTH_FIELD
MAX_PAD = 0xFFFF

cdef uint64_t _SEQ_HARD_LIMIT = SEQ_HARD_LIMIT
cdef char* _FORMAT_B = "B"
cdef object _ECB = ECB()   # stateless mode object, shared by every context

# Counter names; the spec's error names where one exists (PROFILE §9, negative vectors).
DROP_REASON_NAMES = (
    "truncated",
    "ErrorPacketTooLarge",
    "bad-magic",
    "ErrorInvalidVersion",
    "reserved-bits",
    "bad-length",
    "unknown-rid",
    "bad-padding",
    "ErrorInvalidKeyPhase",
    "ErrorInvalidEpoch",
    "replay",
    "ErrorAEADDecryptFailed",
    "erased",
)
assert len(DROP_REASON_NAMES) == DROP_N_REASONS


# ---------------------------------------------------------------------------------------------
# RID and PublicHeader codecs (off the hot path: tools, tests, the endpoint's demultiplexer)
# ---------------------------------------------------------------------------------------------

def make_rid(bytes steering_prefix, int rotation_epoch, bytes random14) -> bytes:
    """RID = steering_prefix[8] ‖ rotation_epoch u16 ‖ 14 random bytes [spec §8.1.2]."""
    if len(steering_prefix) != 8:
        raise ValueError("steering_prefix must be 8 bytes")
    if not 0 <= rotation_epoch <= 0xFFFF:
        raise ValueError("rotation_epoch must fit in u16")
    if len(random14) != 14:
        raise ValueError("the random part of a RID is 14 bytes")
    return steering_prefix + rotation_epoch.to_bytes(2, "big") + random14


def split_rid(rid) -> tuple:
    """Inverse of :func:`make_rid`: ``(steering_prefix, rotation_epoch, random14)``."""
    rid = bytes(rid)
    if len(rid) != RID_LEN:
        raise DecodeError(f"RID must be {RID_LEN} bytes, got {len(rid)}")
    return rid[:8], int.from_bytes(rid[8:10], "big"), rid[10:]


@cython.final
cdef class PublicHeader:
    """The 30-byte cleartext header of an encrypted packet [spec §8.1.1]."""

    cdef readonly int flags
    cdef readonly int length
    cdef readonly bytes rid

    def __init__(self, int flags, int length, rid):
        if flags & ~0xFF or flags & FLAGS_RESERVED:
            raise ValueError("flags has reserved bits set")
        if not 0 <= length <= MAX_LENGTH_FIELD:
            raise ValueError("length must fit in u16")
        rid = bytes(rid)
        if len(rid) != RID_LEN:
            raise ValueError("rid must be 24 bytes")
        self.flags = flags
        self.length = length
        self.rid = rid

    @property
    def control(self) -> bool:
        return bool(self.flags & FLAG_CONTROL)

    @property
    def key_phase(self) -> int:
        return (self.flags >> 2) & 1

    def encode(self) -> bytes:
        return MAGIC + bytes((VERSION, self.flags)) + self.length.to_bytes(2, "big") + self.rid

    @staticmethod
    def decode(data) -> PublicHeader:
        """Parse exactly 30 bytes; any deviation raises DecodeError."""
        data = bytes(data)
        if len(data) != PUBLIC_HEADER_LEN:
            raise DecodeError(f"PublicHeader is {PUBLIC_HEADER_LEN} bytes, got {len(data)}")
        if data[:2] != MAGIC:
            raise DecodeError("bad magic")
        if data[2] != VERSION:
            raise DecodeError(f"unsupported version 0x{data[2]:02x}")
        if data[3] & FLAGS_RESERVED:
            raise DecodeError("reserved flag bits set")
        return PublicHeader(data[3], int.from_bytes(data[4:6], "big"), data[6:])

    def __eq__(self, other):
        if not isinstance(other, PublicHeader):
            return NotImplemented
        return self.encode() == (<PublicHeader>other).encode()

    def __repr__(self) -> str:
        return f"PublicHeader(flags=0x{self.flags:02x}, length={self.length}, rid={self.rid.hex()})"


# ---------------------------------------------------------------------------------------------
# Per-packet machinery
# ---------------------------------------------------------------------------------------------

@cython.final
cdef class BufferWindow:
    """A re-pointable buffer-protocol view over C memory owned by someone else.

    The owner guarantees the memory outlives every call the window is passed to; windows never
    escape the record layer.
    """

    cdef inline void point(self, const uint8_t* ptr, Py_ssize_t n, bint ro) noexcept:
        self.ptr = <uint8_t*>ptr
        self.n = n
        self.ro = ro

    def __getbuffer__(self, Py_buffer* view, int flags):
        if (flags & PyBUF_WRITABLE) and self.ro:
            raise BufferError("read-only window")
        self.shape[0] = self.n
        self.strides[0] = 1
        view.buf = self.ptr
        view.len = self.n
        view.readonly = self.ro
        view.itemsize = 1
        view.format = _FORMAT_B if (flags & PyBUF_FORMAT) else NULL
        view.ndim = 1
        view.shape = self.shape if (flags & PyBUF_ND) else NULL
        view.strides = self.strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL
        view.obj = self

    def __releasebuffer__(self, Py_buffer* view):
        pass


@cython.final
cdef class Record:
    """One opened packet: ``payload``, ``stream_id``, ``epoch``, ``seq``, ``control``."""

    @property
    def keepalive(self) -> bool:
        return self.stream_id == STREAM_KEEPALIVE and not self.payload

    def __repr__(self) -> str:
        kind = "control" if self.control else f"stream={self.stream_id}"
        return f"Record({kind}, epoch={self.epoch}, seq={self.seq}, {len(self.payload)} bytes)"


cdef inline BufferWindow _window():
    return BufferWindow.__new__(BufferWindow)


@cython.final
cdef class RecordLayer:
    """Seal and open PALISADE packets for one session (one RID, both directions).

    ``master_secret`` is the handshake's master secret; the layer derives epoch 0 and the
    header-protection keys from it and keeps no copy. ``now`` arguments are seconds on any
    monotonic clock; the layer never reads a clock itself.

    With ``early=True`` the layer protects 0-RTT early data instead: ``master_secret`` is the
    early-data secret, every packet carries epoch 0xFFFFFFFF, sequence numbers start at 1, and
    the layer has its own replay window and never rekeys.
    """

    def __init__(self, master_secret, bint is_client, rid, *,
                 uint32_t replay_window=1024,
                 uint32_t commit_threshold=16,
                 double max_transition_time=2.0,
                 Py_ssize_t max_packet_size=DEFAULT_MAX_PACKET_SIZE,
                 bint early=False):
        rid = bytes(rid)
        if len(rid) != RID_LEN:
            raise ConfigError("rid must be 24 bytes")
        if max_packet_size < MIN_PACKET_LEN or max_packet_size > DEFAULT_MAX_PACKET_SIZE:
            raise ConfigError(
                f"max_packet_size must be {MIN_PACKET_LEN}..{DEFAULT_MAX_PACKET_SIZE}"
            )
        self.is_client = is_client
        self.max_packet_size = max_packet_size
        memcpy(self._rid, PyBytes_AS_STRING(rid), RID_LEN)
        self.epochs = EpochMachine(master_secret, is_client, replay_window=replay_window,
                                   commit_threshold=commit_threshold,
                                   max_transition_time=max_transition_time, early=early)
        self.early = early
        tx_dir = DIR_C2S if is_client else DIR_S2C
        rx_dir = DIR_S2C if is_client else DIR_C2S
        hp_tx = header_protection_key(master_secret, tx_dir)
        hp_rx = header_protection_key(master_secret, rx_dir)
        # One ECB context per direction for the whole session (PROFILE §4): ECB has no state
        # between blocks, so reuse is safe and saves a cipher setup per packet.
        self._hp_tx_ctx = Cipher(AES(hp_tx), _ECB).encryptor()
        self._hp_rx_ctx = Cipher(AES(hp_rx), _ECB).encryptor()
        wipe(hp_tx)
        wipe(hp_rx)
        self._hp_tx = self._hp_tx_ctx.update_into
        self._hp_rx = self._hp_rx_ctx.update_into
        self._w_nonce = _window()
        self._w_nonce.point(self._nonce, 12, True)
        self._w_aad = _window()
        self._w_mask = _window()
        self._w_mask.point(self._mask, 32, False)   # update_into wants len(sample) + 15
        self._w_sample = _window()
        self._w_in = _window()
        self._w_out = _window()
        self._scratch = bytearray(0)
        memset(self._drops, 0, sizeof(self._drops))

    # -- sealing -----------------------------------------------------------------------------

    cdef inline void _protect(self, uint8_t* pkt, object hp) except *:
        """XOR the header-protection mask (from the AEAD sample) over the EncryptedHeader."""
        cdef int i
        self._w_sample.point(pkt + HEADER_LEN, SAMPLE_LEN, True)
        hp(self._w_sample, self._w_mask)
        for i in range(ENC_HEADER_LEN):
            pkt[PUBLIC_HEADER_LEN + i] ^= self._mask[i]

    cdef bytes _seal(self, object payload, int stream_id, bint control, Py_ssize_t pad,
                     double now):
        cdef EpochMachine em = self.epochs
        cdef TrafficKey key = em.tx_cur
        cdef Py_ssize_t plen
        cdef Py_ssize_t ct_len, total
        cdef uint8_t* p
        cdef uint8_t flags
        cdef object data_obj
        if self._hp_tx is None:
            raise StateError("the record layer was erased")
        if type(payload) is not bytes:
            payload = memoryview(payload).cast("B")   # byte length, not item count
        plen = len(payload)
        if stream_id < 0 or stream_id > 0xFF:
            raise ValueError("stream_id must be 0..255")
        if pad < 0 or pad > MAX_PAD:
            raise ValueError("pad must be 0..65535")
        if em.tx_seq >= _SEQ_HARD_LIMIT:
            raise SequenceExhaustedError(
                "send sequence exhausted for this epoch; rekey before sending more")
        ct_len = plen + pad + TAG_LEN
        total = HEADER_LEN + ct_len
        if total - PUBLIC_HEADER_LEN > MAX_LENGTH_FIELD or total > self.max_packet_size:
            raise PacketTooLargeError(
                f"packet of {total} bytes exceeds the limit of {self.max_packet_size}")
        if pad:
            if len(self._scratch) < plen + pad:
                self._scratch = bytearray(plen + pad)
            # Assign through a byte view so plen counts bytes whatever the payload's item size.
            self._scratch[:plen] = payload
            memset(<uint8_t*>(<char*>self._scratch) + plen, 0, pad)
            self._w_in.point(<uint8_t*>(<char*>self._scratch), plen + pad, True)
            data_obj = self._w_in
        else:
            data_obj = payload

        out = PyBytes_FromStringAndSize(NULL, total)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        flags = 0
        if control:
            flags |= FLAG_CONTROL
        if em.tx_state:
            flags |= FLAG_KEY_PHASE
        p[0] = 0x51
        p[1] = 0x50
        p[2] = VERSION
        p[3] = flags
        store_u16(p + 4, <uint16_t>(total - PUBLIC_HEADER_LEN))
        memcpy(p + 6, self._rid, RID_LEN)
        store_u32(p + 30, key.epoch)
        store_u64(p + 34, em.tx_seq)
        p[42] = <uint8_t>stream_id
        store_u16(p + 43, <uint16_t>pad)
        key.nonce(key.epoch, em.tx_seq, self._nonce)
        self._w_aad.point(p, HEADER_LEN, True)
        self._w_out.point(p + HEADER_LEN, ct_len, False)
        key.encrypt_into(self._w_nonce, data_obj, self._w_aad, self._w_out)
        self._protect(p, self._hp_tx)
        em.on_sent(now)
        self.packets_sealed += 1
        self.bytes_sealed += total
        return out

    def seal(self, payload, int stream_id=0, bint control=False, Py_ssize_t pad=0,
             now=None) -> bytes:
        """Encrypt ``payload`` into one complete packet (``pad`` zero bytes hidden inside).

        Raises PacketTooLargeError, SequenceExhaustedError or ValueError on local misuse.
        """
        return self._seal(payload, stream_id, control, pad, -1.0 if now is None else now)

    def seal_many(self, payloads, int stream_id=0, now=None) -> list:
        """``seal`` for a batch of payloads on one stream (saves the per-call overhead)."""
        cdef double t = -1.0 if now is None else now
        return [self._seal(pl, stream_id, False, 0, t) for pl in payloads]

    # -- opening -----------------------------------------------------------------------------

    cdef Record _drop(self, int reason):
        self._drops[reason] += 1
        return None

    cdef Record _open(self, bytes data, double now):
        cdef EpochMachine em = self.epochs
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(data)
        cdef uint8_t flags
        cdef uint32_t epoch_id
        cdef uint64_t seq
        cdef int stream_id, attempt, phase, i
        cdef Py_ssize_t ct_len, pt_len, pad_len
        cdef TrafficKey key
        cdef bint tried = False
        cdef Record rec
        cdef const uint8_t* q

        if self._hp_rx is None:
            return self._drop(DROP_ERASED)
        if n < MIN_PACKET_LEN:
            return self._drop(DROP_TRUNCATED)
        if n > self.max_packet_size:
            return self._drop(DROP_TOO_LARGE)
        if p[0] != 0x51 or p[1] != 0x50:
            return self._drop(DROP_BAD_MAGIC)
        if p[2] != VERSION:
            return self._drop(DROP_BAD_VERSION)
        flags = p[3]
        if flags & FLAGS_RESERVED:
            return self._drop(DROP_RESERVED_BITS)   # before any crypto [spec §8.1.1]
        if load_u16(p + 4) != n - PUBLIC_HEADER_LEN:
            return self._drop(DROP_BAD_LENGTH)
        if memcmp(p + 6, self._rid, RID_LEN) != 0:
            return self._drop(DROP_UNKNOWN_RID)

        # Unmask a private copy of the header; it is also the AAD.
        self._w_sample.point(p + HEADER_LEN, SAMPLE_LEN, True)
        self._hp_rx(self._w_sample, self._w_mask)
        memcpy(self._aad, p, PUBLIC_HEADER_LEN)
        for i in range(ENC_HEADER_LEN):
            self._aad[PUBLIC_HEADER_LEN + i] = p[PUBLIC_HEADER_LEN + i] ^ self._mask[i]
        epoch_id = load_u32(self._aad + 30)
        seq = load_u64(self._aad + 34)
        stream_id = self._aad[42]
        pad_len = load_u16(self._aad + 43)
        ct_len = n - HEADER_LEN
        pt_len = ct_len - TAG_LEN
        if pad_len > pt_len:
            return self._drop(DROP_BAD_PADDING)
        if self.early and seq == 0:
            return self._drop(DROP_EPOCH)   # early data starts at seq 1 [spec]

        em.poll(now, False)   # time-based commit, opportunistically [event tables]
        phase = (flags >> 2) & 1
        self._w_aad.point(self._aad, HEADER_LEN, True)
        self._w_in.point(p + HEADER_LEN, ct_len, True)
        for attempt in range(2):   # at most two decryption attempts [seed §3]
            key = em.rx_key(phase, epoch_id, attempt)
            if key is None:
                continue
            if not key.window.check(seq):
                return self._drop(DROP_REPLAY)
            tried = True
            key.nonce(epoch_id, seq, self._nonce)
            out = PyBytes_FromStringAndSize(NULL, pt_len)
            self._w_out.point(<uint8_t*>PyBytes_AS_STRING(out), pt_len, False)
            try:
                key.decrypt_into(self._w_nonce, self._w_in, self._w_aad, self._w_out)
            except InvalidTag:
                continue
            if pad_len:
                q = <const uint8_t*>PyBytes_AS_STRING(out)
                for i in range(pt_len - pad_len, pt_len):
                    if q[i]:
                        return self._drop(DROP_BAD_PADDING)
                out = out[:pt_len - pad_len]
            em.on_authenticated(key, seq, now, phase)
            self.packets_opened += 1
            self.bytes_opened += n
            if stream_id == STREAM_DUMMY and not (flags & FLAG_CONTROL):
                self.dummies_received += 1
                return None
            rec = Record.__new__(Record)
            rec.payload = out
            rec.stream_id = stream_id
            rec.epoch = epoch_id
            rec.seq = seq
            rec.control = flags & FLAG_CONTROL
            return rec
        if tried:
            return self._drop(DROP_AEAD)
        if em.rx_state == 0 and phase == 1:
            return self._drop(DROP_KEY_PHASE)    # STEADY accepts key_phase 0 only
        return self._drop(DROP_EPOCH)

    def open(self, data, now=None):
        """Authenticate and decrypt one packet. Returns a Record, or None if it was dropped
        (the reason is counted in ``drop_counts``) or was a dummy packet."""
        cdef double t = -1.0 if now is None else now
        if type(data) is bytes:
            return self._open(data, t)
        return self._open_other(data, t)

    cdef Record _open_other(self, object data, double now):
        """Accept any bytes-like object; anything else is dropped, never raised."""
        try:
            view = memoryview(data)
        except TypeError:
            return self._drop(DROP_TRUNCATED)
        if view.nbytes > self.max_packet_size:
            return self._drop(DROP_TOO_LARGE)   # checked before copying anything
        return self._open(view.tobytes(), now)

    def open_many(self, packets, now=None) -> list:
        """``open`` for a batch; the result has one entry (Record or None) per packet."""
        cdef double t = -1.0 if now is None else now
        return [self._open(d, t) if type(d) is bytes else self._open_other(d, t)
                for d in packets]

    # -- epoch operations (delegated; see epoch.pyx) ----------------------------------------

    def arm_next_epoch(self, now=None, expected_epoch=None) -> int:
        return self.epochs.arm_next_epoch(now, expected_epoch)

    def install_next_epoch(self, now=None) -> int:
        return self.epochs.install_next_epoch(now)

    def commit_epoch_transition(self) -> int:
        return self.epochs.commit_epoch_transition()

    def abandon_next_epoch(self) -> int:
        return self.epochs.abandon_next_epoch()

    def complete_transition(self) -> int:
        return self.epochs.complete_transition()

    def erase(self) -> None:
        """Erase all keys (close or abort). Sealing or opening afterwards is a local error."""
        self.epochs.erase_all()
        self._hp_tx_ctx = None
        self._hp_rx_ctx = None
        self._hp_tx = None
        self._hp_rx = None

    @property
    def erased(self) -> bool:
        return self.epochs.erased

    def get_timer(self):
        return self.epochs.get_timer()

    def handle_timer(self, double now) -> None:
        self.epochs.handle_timer(now)

    # -- introspection -------------------------------------------------------------------------

    @property
    def rid(self) -> bytes:
        return PyBytes_FromStringAndSize(<char*>self._rid, RID_LEN)

    @property
    def epoch(self) -> int:
        return self.epochs.epoch

    @property
    def send_epoch(self) -> int:
        return self.epochs.send_epoch

    @property
    def send_seq(self) -> int:
        return self.epochs.tx_seq

    @property
    def needs_rekey(self) -> bool:
        return self.epochs.needs_rekey

    @property
    def drop_counts(self) -> dict:
        """Dropped packets by reason name (only reasons that occurred)."""
        return {DROP_REASON_NAMES[i]: self._drops[i]
                for i in range(DROP_N_REASONS) if self._drops[i]}

    @property
    def dropped(self) -> int:
        cdef uint64_t total = 0
        cdef int i
        for i in range(DROP_N_REASONS):
            total += self._drops[i]
        return total
