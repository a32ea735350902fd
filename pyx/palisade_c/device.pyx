# cython: language_level=3
"""The C device peer (firmware_bridge/c/pal_device.c) on the host, with its crypto port bound
to ``cryptography``.

Theory of operation
-------------------
pal_device.c is the portable C99 implementation of the device (server) side of a CORE
session that firmware compiles in. Every primitive it uses is a ``pal_crypto_*`` function
(firmware_bridge/c/pal_crypto.h); this module defines them as ``cdef public`` functions that
call the same ``cryptography`` primitives the Python peer uses, so the host build needs nothing
new and the C peer can be tested against the Python client byte for byte.

:class:`Device` wraps one ``pal_device`` context with the sans-IO surface of
:class:`palisade_c.connection.Connection` (``receive_datagram`` / ``datagrams_to_send`` /
``get_timer`` / ``handle_timer`` / ``next_event``; time in seconds, converted to the
milliseconds the C side takes), and reports the same event classes. Like a device, it holds
one session: once that session is CLOSED, the next ClientHello starts a fresh one.

The port's ``void *port`` argument is the :class:`Device` itself, so each instance draws its
randomness from its own ``rng`` (seedable in tests). ML-KEM key generation goes through
``from_seed_bytes`` with bytes from that rng; encapsulation and signing draw from the OS inside
``cryptography``. Nothing in the port raises into C: any exception becomes a non-zero return,
which the core turns into the protocol's error code.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import os
from collections import deque

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.ciphers.modes import ECB

from palisade_c.errors import ConfigError, PacketTooLargeError, StateError
from palisade_c.events import ConnectionClosed, DataReceived, EpochChanged, HandshakeCompleted


cdef extern from "pal_crypto.h":
    ctypedef struct pal_sha3_ctx:
        pass
    enum:
        PAL_MLKEM768_PK_BYTES
        PAL_MLKEM768_CT_BYTES
        PAL_MLKEM768_SK_BYTES
        PAL_MLDSA65_PK_BYTES
        PAL_MLDSA65_SIG_BYTES
        PAL_CRYPTO_SHA3_CTX_BYTES


cdef extern from "pal_device.h":
    enum:
        PAL_DEVICE_MAX_MESSAGE
        PAL_DEVICE_MIN_MTU
        PAL_DROP_N
        PAL_EV_HANDSHAKE_DONE
        PAL_EV_DATA
        PAL_EV_EPOCH
        PAL_EV_CLOSED
        PAL_DEV_CLOSED
        PAL_DEV_ESTABLISHED
        PAL_DEV_CLOSING
    ctypedef struct pal_device_config:
        void* port
        const uint8_t* identity_pk
        const uint8_t* identity_sk
        size_t identity_sk_len
        const uint8_t (*pinned)[32]
        size_t pinned_count
        uint8_t node_id[8]
        uint8_t has_node_id
        uint32_t mtu
        uint32_t link_bps
        uint32_t initial_rto_ms
        uint32_t max_rto_ms
        uint32_t handshake_timeout_ms
        uint32_t idle_timeout_ms
        uint32_t keepalive_ms
        uint32_t close_drain_ms
        uint32_t rekey_after_ms
        uint32_t rekey_retransmit_ms
        uint32_t max_transition_ms
        uint32_t commit_threshold
        uint64_t rekey_after_bytes
    ctypedef struct pal_device_event:
        uint8_t type
        uint8_t stream
        uint8_t by_peer
        uint16_t code
        uint32_t epoch
        uint32_t pin_index
        const uint8_t* data
        size_t len
        const char* reason
    ctypedef struct pal_tkey:
        uint32_t epoch
    ctypedef struct pal_device:
        pal_tkey tx_cur
        uint8_t rx_state
        uint8_t rekey_attempt
        uint32_t drops[1]
        uint32_t packets_in
        uint32_t packets_out
    int pal_device_init(pal_device* d, const pal_device_config* cfg, uint64_t now)
    void pal_device_input(pal_device* d, uint8_t* buf, size_t len, uint64_t now)
    size_t pal_device_output(pal_device* d, uint64_t now, uint8_t* out, size_t cap)
    int pal_device_next_deadline(const pal_device* d, uint64_t* deadline)
    void pal_device_handle_timer(pal_device* d, uint64_t now)
    int pal_device_poll_event(pal_device* d, pal_device_event* ev)
    int pal_device_send(pal_device* d, uint8_t stream, const uint8_t* data, size_t len,
                        uint64_t now, uint8_t* out, size_t cap, size_t* out_len)
    int pal_device_close(pal_device* d, uint16_t code, const char* reason, size_t reason_len,
                         uint64_t now)
    int pal_device_rekey(pal_device* d, uint64_t now)
    void pal_device_wipe(pal_device* d)
    int pal_device_state(const pal_device* d)
    const char* pal_device_state_name(int state)
    const char* pal_device_drop_name(int reason)
    uint32_t pal_device_epoch(const pal_device* d)
    int pal_device_hkdf_expand(void* port, const uint8_t* prk, const uint8_t* info,
                               size_t info_len, uint8_t* out, size_t out_len)
    int pal_device_master_secret(void* port, const uint8_t* ss_c, const uint8_t* ss_s,
                                 const uint8_t* client_nonce, const uint8_t* server_nonce,
                                 const uint8_t* th, uint8_t* master)
    int pal_device_install_master(pal_device* d, const uint8_t* master, const uint8_t* rid,
                                  uint64_t now)
    int pal_device_step_epoch_for_test(pal_device* d)


# ---------------------------------------------------------------------------------------------
# The port: pal_crypto.h bound to cryptography. ``port`` is the Device (or None).
# ---------------------------------------------------------------------------------------------

cdef object _SHA3 = hashes.SHA3_256()
cdef object _ECB = ECB()


cdef inline bytes _b(const uint8_t* p, size_t n):
    return PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>n)


cdef inline int _put(uint8_t* out, bytes data, size_t n) except -1:
    if len(data) != <Py_ssize_t>n:
        raise ValueError("port: wrong output length")
    memcpy(out, <const char*>data, n)
    return 0


cdef object _rng_of(void* port):
    if port == NULL:
        return os.urandom
    return (<Device>port)._rng


cdef public int pal_crypto_random(void* port, uint8_t* out, size_t n) noexcept:
    try:
        _put(out, bytes(_rng_of(port)(n)), n)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_mlkem768_keygen(void* port, uint8_t* pk, uint8_t* sk) noexcept:
    # The host keeps the 64-byte FIPS 203 seed (d || z) in the first bytes of sk.
    try:
        seed = bytes(_rng_of(port)(64))
        key = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)
        _put(pk, key.public_key().public_bytes_raw(), PAL_MLKEM768_PK_BYTES)
        memset(sk, 0, PAL_MLKEM768_SK_BYTES)
        _put(sk, seed, 64)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_mlkem768_encaps(void* port, const uint8_t* pk, uint8_t* ct,
                                           uint8_t* ss) noexcept:
    try:
        pub = mlkem.MLKEM768PublicKey.from_public_bytes(_b(pk, PAL_MLKEM768_PK_BYTES))
        secret, ciphertext = pub.encapsulate()
        _put(ct, ciphertext, PAL_MLKEM768_CT_BYTES)
        _put(ss, secret, 32)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_mlkem768_decaps(void* port, const uint8_t* sk, const uint8_t* ct,
                                           uint8_t* ss) noexcept:
    try:
        key = mlkem.MLKEM768PrivateKey.from_seed_bytes(_b(sk, 64))
        _put(ss, key.decapsulate(_b(ct, PAL_MLKEM768_CT_BYTES)), 32)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_mldsa65_sign(void* port, const uint8_t* sk, size_t sk_len,
                                        const uint8_t* msg, size_t msg_len,
                                        const uint8_t* ctx, size_t ctx_len,
                                        uint8_t* sig) noexcept:
    try:
        key = mldsa.MLDSA65PrivateKey.from_seed_bytes(_b(sk, sk_len))
        _put(sig, key.sign(_b(msg, msg_len), context=_b(ctx, ctx_len)),
             PAL_MLDSA65_SIG_BYTES)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_mldsa65_verify(void* port, const uint8_t* pk, const uint8_t* msg,
                                          size_t msg_len, const uint8_t* ctx, size_t ctx_len,
                                          const uint8_t* sig, size_t sig_len) noexcept:
    try:
        key = mldsa.MLDSA65PublicKey.from_public_bytes(_b(pk, PAL_MLDSA65_PK_BYTES))
        key.verify(_b(sig, sig_len), _b(msg, msg_len), context=_b(ctx, ctx_len))
        return 0
    except BaseException:
        return 1


# The SHA3 context holds one reference to a cryptography Hash object.
cdef inline PyObject* _hash_get(const pal_sha3_ctx* h) noexcept:
    cdef PyObject* obj
    memcpy(&obj, h, sizeof(PyObject*))
    return obj


cdef inline void _hash_set(pal_sha3_ctx* h, object value) noexcept:
    cdef PyObject* obj = <PyObject*>value
    Py_INCREF(value)
    memcpy(h, &obj, sizeof(PyObject*))


cdef public void pal_crypto_sha3_256_init(void* port, pal_sha3_ctx* h) noexcept:
    try:
        _hash_set(h, hashes.Hash(_SHA3))
    except BaseException:
        _hash_set(h, None)


cdef public void pal_crypto_sha3_256_update(void* port, pal_sha3_ctx* h, const uint8_t* data,
                                            size_t n) noexcept:
    try:
        (<object>_hash_get(h)).update(_b(data, n))
    except BaseException:
        pass


cdef public void pal_crypto_sha3_256_clone(void* port, pal_sha3_ctx* dst,
                                           const pal_sha3_ctx* src) noexcept:
    try:
        _hash_set(dst, (<object>_hash_get(src)).copy())
    except BaseException:
        _hash_set(dst, None)


cdef public void pal_crypto_sha3_256_final(void* port, pal_sha3_ctx* h, uint8_t* out) noexcept:
    cdef PyObject* obj = _hash_get(h)
    try:
        _put(out, (<object>obj).finalize(), 32)
    except BaseException:
        memset(out, 0, 32)
    Py_DECREF(<object>obj)
    memset(h, 0, sizeof(PyObject*))


cdef public int pal_crypto_hmac_sha3_256(void* port, const uint8_t* key, size_t key_len,
                                         const uint8_t* msg, size_t msg_len,
                                         uint8_t* out) noexcept:
    try:
        mac = hmac.HMAC(_b(key, key_len), _SHA3)
        mac.update(_b(msg, msg_len))
        _put(out, mac.finalize(), 32)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_chacha20poly1305_seal(void* port, const uint8_t* key,
                                                 const uint8_t* nonce, const uint8_t* aad,
                                                 size_t aad_len, const uint8_t* pt,
                                                 size_t pt_len, uint8_t* out) noexcept:
    try:
        sealed = ChaCha20Poly1305(_b(key, 32)).encrypt(
            _b(nonce, 12), _b(pt, pt_len) if pt_len else b"", _b(aad, aad_len))
        _put(out, sealed, pt_len + 16)
        return 0
    except BaseException:
        return -1


cdef public int pal_crypto_chacha20poly1305_open(void* port, const uint8_t* key,
                                                 const uint8_t* nonce, const uint8_t* aad,
                                                 size_t aad_len, const uint8_t* ct,
                                                 size_t ct_len, uint8_t* out) noexcept:
    if ct_len < 16:
        return 1
    try:
        plain = ChaCha20Poly1305(_b(key, 32)).decrypt(_b(nonce, 12), _b(ct, ct_len),
                                                     _b(aad, aad_len))
        _put(out, plain, ct_len - 16)
        return 0
    except BaseException:
        return 1


cdef public int pal_crypto_aes256_encrypt_block(void* port, const uint8_t* key,
                                                const uint8_t* inp, uint8_t* out) noexcept:
    try:
        enc = Cipher(AES(_b(key, 32)), _ECB).encryptor()
        _put(out, enc.update(_b(inp, 16)), 16)
        return 0
    except BaseException:
        return -1


# ---------------------------------------------------------------------------------------------
# Building blocks exposed for the known-answer vectors
# ---------------------------------------------------------------------------------------------

def hkdf_expand(prk, info, int length) -> bytes:
    """The C core's HKDF-Expand over HMAC-SHA3-256 (length <= 64)."""
    cdef bytes p = bytes(prk), i = bytes(info)
    cdef uint8_t out[64]
    if len(p) != 32 or length < 0 or length > 64 or len(i) > 64:
        raise ValueError("prk must be 32 bytes, info at most 64, length 0..64")
    if pal_device_hkdf_expand(NULL, <const uint8_t*><const char*>p, <const uint8_t*><const char*>i,
                              len(i), out, length) != 0:
        raise ValueError("hkdf failed")
    return _b(out, length)


def master_secret(ss_c, ss_s, client_nonce, server_nonce, th) -> bytes:
    """The C core's key schedule from the KEM secrets, nonces and transcript hash."""
    cdef bytes a = bytes(ss_c), b = bytes(ss_s), c = bytes(client_nonce)
    cdef bytes s = bytes(server_nonce), t = bytes(th)
    cdef uint8_t out[32]
    for v in (a, b, c, s, t):
        if len(v) != 32:
            raise ValueError("every input is 32 bytes")
    if pal_device_master_secret(NULL, <const uint8_t*><const char*>a,
                                <const uint8_t*><const char*>b, <const uint8_t*><const char*>c,
                                <const uint8_t*><const char*>s,
                                <const uint8_t*><const char*>t, out) != 0:
        raise ValueError("key schedule failed")
    return _b(out, 32)


# ---------------------------------------------------------------------------------------------
# The sans-IO wrapper
# ---------------------------------------------------------------------------------------------

cdef uint64_t _ms(double now) except? 0xFFFFFFFFFFFFFFFF:
    if now < 0:
        raise ValueError("now must not be negative")
    # Rounded, so that a deadline reported as seconds and fed back is never a millisecond
    # early (which would leave the timer due forever).
    return <uint64_t>(now * 1000.0 + 0.5)


def context_size() -> int:
    """sizeof(pal_device): the RAM one session needs (reassembly buffer included)."""
    return sizeof(pal_device)


def _ms_arg(name, value) -> int:
    if value is None:
        return 0
    ms = int(round(float(value) * 1000))
    if ms <= 0 or ms > 0xFFFFFFFF:
        raise ConfigError(f"{name} must be positive and below 49 days")
    return ms


@cython.final
cdef class Device:
    """One device session (the C peer), with Connection's sans-IO surface."""

    cdef pal_device* _d
    cdef pal_device_config _cfg
    cdef bytes _pk
    cdef bytes _sk
    cdef bytes _pins
    cdef object _rng
    cdef list _out
    cdef object _events
    cdef bytearray _buf
    cdef uint8_t* _obuf
    cdef size_t _ocap
    cdef double _now
    cdef readonly object peer_addr
    cdef readonly str name
    cdef readonly list pinned_fingerprints
    cdef readonly int sessions

    def __cinit__(self):
        self._d = <pal_device*>PyMem_Malloc(sizeof(pal_device))
        if self._d == NULL:
            raise MemoryError()
        memset(self._d, 0, sizeof(pal_device))
        self._obuf = NULL

    def __dealloc__(self):
        if self._d != NULL:
            pal_device_wipe(self._d)  # releases the port's hash object, if any
            PyMem_Free(self._d)
            self._d = NULL
        if self._obuf != NULL:
            PyMem_Free(self._obuf)

    def __init__(self, identity, trusted_fingerprints, *, node_id=None, mtu=1200,
                 link_bps=None, rng=os.urandom, name="device", initial_rto=None,
                 max_rto=None, handshake_timeout=None, idle_timeout=None,
                 keepalive_interval=None, close_drain_time=None, rekey_after_seconds=None,
                 rekey_retransmit=None, max_transition_time=None, commit_threshold=None,
                 rekey_after_bytes=None, double now=0.0):
        """``identity`` is a palisade_c.Identity (its seed is what the port signs with);
        ``trusted_fingerprints`` the hex SHA3-256 fingerprints of the client keys it
        accepts; ``node_id`` the RID steering prefix (None keeps the client's). Timers are in seconds like Config's; None keeps the C default."""
        self._rng = rng
        self.name = name
        self._pk = bytes(identity.public_key)
        self._sk = bytes(identity._key.private_bytes_raw())
        fps = [bytes.fromhex(fp) for fp in trusted_fingerprints]
        if any(len(fp) != 32 for fp in fps):
            raise ConfigError("fingerprints are 32-byte SHA3-256 hex strings")
        self.pinned_fingerprints = [fp.hex() for fp in fps]
        self._pins = b"".join(fps) or bytes(32)
        if node_id is not None and len(bytes(node_id)) != 8:
            raise ConfigError("node_id must be 8 bytes")
        if not PAL_DEVICE_MIN_MTU <= mtu <= 65535:
            raise ConfigError(f"mtu must be {PAL_DEVICE_MIN_MTU}..65535")
        memset(&self._cfg, 0, sizeof(self._cfg))
        self._cfg.port = <void*>self
        self._cfg.identity_pk = <const uint8_t*><const char*>self._pk
        self._cfg.identity_sk = <const uint8_t*><const char*>self._sk
        self._cfg.identity_sk_len = len(self._sk)
        self._cfg.pinned = <const uint8_t (*)[32]><const char*>self._pins
        self._cfg.pinned_count = len(fps)
        cdef bytes node = bytes(node_id) if node_id is not None else bytes(8)
        memcpy(self._cfg.node_id, <const char*>node, 8)
        self._cfg.has_node_id = node_id is not None
        self._cfg.mtu = mtu
        self._cfg.link_bps = int(link_bps or 0)
        self._cfg.initial_rto_ms = _ms_arg("initial_rto", initial_rto)
        self._cfg.max_rto_ms = _ms_arg("max_rto", max_rto)
        self._cfg.handshake_timeout_ms = _ms_arg("handshake_timeout", handshake_timeout)
        self._cfg.idle_timeout_ms = _ms_arg("idle_timeout", idle_timeout)
        self._cfg.keepalive_ms = _ms_arg("keepalive_interval", keepalive_interval)
        self._cfg.close_drain_ms = _ms_arg("close_drain_time", close_drain_time)
        self._cfg.rekey_after_ms = _ms_arg("rekey_after_seconds", rekey_after_seconds)
        self._cfg.rekey_retransmit_ms = _ms_arg("rekey_retransmit", rekey_retransmit)
        self._cfg.max_transition_ms = _ms_arg("max_transition_time", max_transition_time)
        self._cfg.commit_threshold = int(commit_threshold or 0)
        self._cfg.rekey_after_bytes = int(rekey_after_bytes or 0)
        if self._obuf != NULL:
            PyMem_Free(self._obuf)
        self._ocap = mtu
        self._obuf = <uint8_t*>PyMem_Malloc(self._ocap)
        if self._obuf == NULL:
            raise MemoryError()
        self._out = []
        self._events = deque()
        self.peer_addr = None
        self.sessions = 0
        self._now = now
        self._start(now)

    cdef int _start(self, double now) except -1:
        pal_device_wipe(self._d)
        if pal_device_init(self._d, &self._cfg, _ms(now)) != 0:
            raise ConfigError("the C device refused its configuration")
        self.sessions += 1
        return 0

    # -- sans-IO ------------------------------------------------------------------------------

    def receive_datagram(self, data, addr, double now):
        """Feed one datagram. Never raises for anything in ``data``."""
        cdef bytearray buf = bytearray(data)
        cdef Py_ssize_t n = len(buf)
        self._now = now
        if pal_device_state(self._d) == PAL_DEV_CLOSED and n >= 39 \
                and buf[0] == 0x51 and buf[1] == 0x48 and buf[3] == 1:
            # A new ClientHello after the session ended: the device serves the next client.
            self._drain(now)
            self._start(now)
        if self.peer_addr is None or (pal_device_state(self._d) != PAL_DEV_ESTABLISHED
                                      and pal_device_state(self._d) != PAL_DEV_CLOSING
                                      and n >= 39 and buf[0] == 0x51 and buf[3] == 1):
            self.peer_addr = addr
        if n == 0:
            pal_device_input(self._d, NULL, 0, _ms(now))
        else:
            pal_device_input(self._d, <uint8_t*><char*>buf, n, _ms(now))
        self._collect()
        self._drain(now)

    cdef int _collect(self) except -1:
        cdef pal_device_event ev
        while pal_device_poll_event(self._d, &ev):
            if ev.type == PAL_EV_HANDSHAKE_DONE:
                fp = self.pinned_fingerprints[ev.pin_index] \
                    if ev.pin_index < len(self.pinned_fingerprints) else ""
                self._events.append(HandshakeCompleted(fp))
            elif ev.type == PAL_EV_DATA:
                self._events.append(DataReceived(ev.stream, _b(ev.data, ev.len)))
            elif ev.type == PAL_EV_EPOCH:
                self._events.append(EpochChanged(ev.epoch))
            elif ev.type == PAL_EV_CLOSED:
                reason = (<bytes>ev.reason).decode("utf-8", "replace") if ev.reason else ""
                self._events.append(ConnectionClosed(ev.code, reason, bool(ev.by_peer)))
        return 0

    cdef int _drain(self, double now) except -1:
        cdef size_t n
        while True:
            n = pal_device_output(self._d, _ms(now), self._obuf, self._ocap)
            if n == 0:
                break
            self._out.append((_b(self._obuf, n), self.peer_addr))
        return 0

    def datagrams_to_send(self, now=None):
        """Everything queued for the transport, as (datagram, address) pairs."""
        self._drain(self._now if now is None else now)
        out, self._out = self._out, []
        return out

    def get_timer(self):
        cdef uint64_t t
        if pal_device_next_deadline(self._d, &t):
            return t / 1000.0
        return None

    def handle_timer(self, double now):
        self._now = now
        pal_device_handle_timer(self._d, _ms(now))
        self._collect()
        self._drain(now)

    def next_event(self):
        return self._events.popleft() if self._events else None

    # -- application --------------------------------------------------------------------------

    def send_data(self, data, stream_id=0, now=None):
        """Seal ``data`` on ``stream_id``; ``now`` as for Connection.send_data (without it,
        the last time the device saw)."""
        cdef bytes payload = bytes(data)
        cdef size_t n = 0
        cdef int rc
        if not 0 <= stream_id <= 253:
            raise ValueError("stream_id must be 0..253")
        if now is not None:
            self._now = now
        rc = pal_device_send(self._d, stream_id, <const uint8_t*><const char*>payload,
                             len(payload), _ms(self._now), self._obuf, self._ocap, &n)
        if rc == -2:
            raise PacketTooLargeError("payload does not fit in one datagram")
        if rc != 0:
            raise StateError(f"cannot send in state {self.state}")
        self._out.append((_b(self._obuf, n), self.peer_addr))

    def close(self, error_code=0, reason=""):
        cdef bytes r = str(reason).encode("utf-8")
        pal_device_close(self._d, error_code, r, len(r), _ms(self._now))
        self._collect()

    def request_rekey(self):
        if pal_device_rekey(self._d, _ms(self._now)) != 0:
            raise StateError(f"cannot rekey now (state {self.state})")

    def install_master(self, master, rid, double now=0.0):
        """Test hook: install the record layer as after a handshake (vectors only)."""
        cdef bytes m = bytes(master), r = bytes(rid)
        if len(m) != 32 or len(r) != 24:
            raise ValueError("master is 32 bytes, rid 24")
        if pal_device_install_master(self._d, <const uint8_t*><const char*>m,
                                     <const uint8_t*><const char*>r, _ms(now)) != 0:
            raise StateError("install_master needs a fresh device")

    def step_epoch(self):
        """Test hook: move both halves to the next epoch at once (vectors only)."""
        if pal_device_step_epoch_for_test(self._d) != 0:
            raise StateError("cannot step the epoch now")

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return pal_device_state_name(pal_device_state(self._d)).decode()

    @property
    def established(self) -> bool:
        return pal_device_state(self._d) == PAL_DEV_ESTABLISHED

    @property
    def closed(self) -> bool:
        return pal_device_state(self._d) == PAL_DEV_CLOSED

    @property
    def epoch(self) -> int:
        return pal_device_epoch(self._d)

    @property
    def rx_state_name(self) -> str:
        """The receiver's epoch state, STEADY or TRANSITION (docs/protocol.md §5.1)."""
        return "TRANSITION" if self._d.rx_state else "STEADY"

    @property
    def send_epoch(self) -> int:
        """The epoch the device seals under (ahead of ``epoch`` until its receiver commits)."""
        return self._d.tx_cur.epoch

    @property
    def rekey_attempt(self) -> int:
        """The attempt of the running rekey (1..4), 0 when none runs (§9)."""
        return self._d.rekey_attempt

    @property
    def drop_counts(self) -> dict:
        cdef int i
        return {pal_device_drop_name(i).decode(): self._d.drops[i]
                for i in range(PAL_DROP_N) if self._d.drops[i]}

    @property
    def packets_in(self) -> int:
        return self._d.packets_in

    @property
    def packets_out(self) -> int:
        return self._d.packets_out
