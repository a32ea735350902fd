# cython: language_level=3
"""Key schedule of PALISADE v1.2 (spec §6, §11.3; PROFILE §3).

Every derivation is HKDF over HMAC-SHA3-256 from ``cryptography``; nothing here implements a
primitive. Secrets are returned as ``bytearray`` so that the owner can overwrite them when they
are superseded (:func:`wipe`). ``cryptography`` keeps its own copy of a key inside a cipher
context; that copy goes away when the context is released, which the record layer does at the
same moment it wipes its buffer.

    IKM             = label("palisade v1.2 early") ‖ (ss_c XOR ss_s) ‖ client_nonce ‖ server_nonce
    early           = Extract(salt = zeros(32) or PSK, IKM)
    handshake       = Expand(early, label("handshake") ‖ th, 32)
    master          = Expand(handshake, label("master"), 32)
    epoch[0]        = Expand(master, label("epoch 0"), 32)
    epoch[n+1]      = Expand(epoch[n], label("epoch step"), 32)
    key, iv (per d) = Expand(epoch[n], label(d + " key"), 32), Expand(epoch[n], label(d + " iv"), 12)
    hp (per d)      = Expand(master, label(d + " hp"), 32)        # whole session
    resumption      = Expand(master, label("resumption"), 32)
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.string cimport memset

from cryptography.hazmat.primitives.hashes import SHA3_256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

LABEL_PREFIX = b"PALISADE "
DIR_C2S = b"c2s"
DIR_S2C = b"s2c"
SECRET_LEN = 32
KEY_LEN = 32
IV_LEN = 12
HP_LEN = 32

cdef object _SHA3 = SHA3_256()


def label(x: bytes) -> bytes:
    """``label(X) = "PALISADE " ‖ X`` [spec §6.1]."""
    return LABEL_PREFIX + bytes(x)


def wipe(buf) -> None:
    """Overwrite a mutable secret buffer with zeros (no-op for None)."""
    cdef unsigned char[::1] view
    cdef Py_ssize_t i
    if buf is None:
        return
    if type(buf) is bytearray:  # the usual case: no memoryview object needed
        memset(PyByteArray_AS_STRING(buf), 0, <size_t>PyByteArray_GET_SIZE(buf))
        return
    view = buf
    for i in range(view.shape[0]):
        view[i] = 0


def hkdf_expand(prk, info: bytes, int length) -> bytearray:
    """HKDF-Expand(prk, info, length), written straight into a fresh bytearray."""
    out = bytearray(length)
    HKDFExpand(_SHA3, length, info).derive_into(prk, out)
    return out


def hkdf_extract(salt, ikm) -> bytearray:
    """HKDF-Extract(salt, ikm) as a bytearray."""
    prk = HKDF.extract(_SHA3, bytes(salt), ikm)
    return bytearray(prk)


def combine_kem_secrets(ss_c, ss_s) -> bytearray:
    """ss_c XOR ss_s. Both MUST be exactly 32 bytes [spec §6.2.2]."""
    cdef const unsigned char[::1] a = ss_c
    cdef const unsigned char[::1] b = ss_s
    cdef unsigned char[::1] o
    cdef Py_ssize_t i
    if a.shape[0] != 32 or b.shape[0] != 32:
        raise ValueError("both KEM shared secrets must be exactly 32 bytes")
    out = bytearray(32)
    o = out
    for i in range(32):
        o[i] = a[i] ^ b[i]
    return out


_EARLY_LABEL = label(b"palisade v1.2 early")


def early_ikm(ss_c, ss_s, client_nonce: bytes, server_nonce: bytes) -> bytearray:
    """The IKM fed to Extract: label, combined KEM secret, both nonces [spec §6.2.2]."""
    cdef const unsigned char[::1] a = ss_c
    cdef const unsigned char[::1] b = ss_s
    cdef unsigned char[::1] o
    cdef Py_ssize_t i, at = len(_EARLY_LABEL)
    if a.shape[0] != 32 or b.shape[0] != 32:
        raise ValueError("both KEM shared secrets must be exactly 32 bytes")
    # The XOR is written straight into the returned buffer, so the combined KEM secret never
    # exists anywhere else.
    out = bytearray(_EARLY_LABEL) + bytes(32) + client_nonce + server_nonce
    o = out
    for i in range(32):
        o[at + i] = a[i] ^ b[i]
    return out


def handshake_secret(ikm, th: bytes, salt=None) -> bytearray:
    """Expand(Extract(salt, IKM), label("handshake") ‖ th, 32); salt = zeros(32) unless a PSK.

    Extract and Expand run in one HKDF call so the early secret never leaves ``cryptography``.
    """
    out = bytearray(SECRET_LEN)
    salt_bytes = bytes(SECRET_LEN) if salt is None else bytes(salt)
    HKDF(_SHA3, SECRET_LEN, salt_bytes, _L_HANDSHAKE + th).derive_into(ikm, out)
    return out


# The fixed labels, built once (every session derives with them).
cdef bytes _L_HANDSHAKE = label(b"handshake")
cdef bytes _L_MASTER = label(b"master")
cdef bytes _L_EPOCH0 = label(b"epoch 0")
cdef bytes _L_EPOCH_STEP = label(b"epoch step")
cdef bytes _L_RESUMPTION = label(b"resumption")
cdef bytes _L_TICKET_PSK = label(b"ticket psk")
cdef bytes _L_EARLY_DATA = label(b"early data")
cdef bytes _L_EARLY_TRAFFIC = label(b"early traffic")
cdef dict _L_DIRECTION = {
    (d, what): label(d + what)
    for d in (DIR_C2S, DIR_S2C) for what in (b" key", b" iv", b" hp")
}


cdef bytes _direction_label(direction, bytes what):
    cached = _L_DIRECTION.get((direction, what))
    return cached if cached is not None else label(bytes(direction) + what)


def master_secret(hs_secret) -> bytearray:
    return hkdf_expand(hs_secret, _L_MASTER, SECRET_LEN)


def epoch0_secret(master) -> bytearray:
    return hkdf_expand(master, _L_EPOCH0, SECRET_LEN)


def next_epoch_secret(secret) -> bytearray:
    """``epoch[n+1] = Expand(epoch[n], label("epoch step"), 32)`` [spec §11.3]."""
    return hkdf_expand(secret, _L_EPOCH_STEP, SECRET_LEN)


def traffic_key(epoch_secret, direction: bytes) -> bytearray:
    return hkdf_expand(epoch_secret, _direction_label(direction, b" key"), KEY_LEN)


def traffic_iv(epoch_secret, direction: bytes) -> bytearray:
    return hkdf_expand(epoch_secret, _direction_label(direction, b" iv"), IV_LEN)


def header_protection_key(master, direction: bytes) -> bytearray:
    return hkdf_expand(master, _direction_label(direction, b" hp"), HP_LEN)


def resumption_secret(master) -> bytearray:
    return hkdf_expand(master, _L_RESUMPTION, SECRET_LEN)


# -- resumption and 0-RTT [profile §7] ---------------------------------------------------------

def ticket_psk(resumption, bytes ticket_nonce) -> bytearray:
    """The PSK a ticket carries: Expand(resumption_secret, label("ticket psk") ‖ nonce, 32).

    Both sides compute it (the server seals it into the ticket, the client keeps it beside the
    opaque ticket), so neither stores the resumption secret itself."""
    return hkdf_expand(resumption, _L_TICKET_PSK + ticket_nonce, SECRET_LEN)


def finished_key(psk, bytes role) -> bytearray:
    """MAC key for the resumption Finished values: Expand(psk, label(role + " finished"), 32)."""
    return hkdf_expand(psk, label(role + b" finished"), SECRET_LEN)


def early_data_secret(psk, bytes chr_hash) -> bytearray:
    """Expand(Extract(psk, label("early data") ‖ SHA3-256(CHR*)), label("early traffic"), 32).

    The record layer in early mode derives the c2s key, IV and header-protection key from it
    with the usual direction labels."""
    # Extract and Expand in one HKDF call, so the PRK never leaves ``cryptography`` (as in
    # handshake_secret).
    out = bytearray(SECRET_LEN)
    HKDF(_SHA3, SECRET_LEN, bytes(psk), _L_EARLY_TRAFFIC).derive_into(_L_EARLY_DATA + chr_hash,
                                                                      out)
    return out
