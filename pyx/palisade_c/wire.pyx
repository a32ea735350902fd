# cython: language_level=3
"""Handshake message codecs: the canonical byte form of every PALISADE v1.2 handshake message.

Messages (PROFILE §2 full handshake, §7 PLUS resumption, §4 ErrorResponse):

* :class:`ClientHello`, :class:`ServerHello`, :class:`ClientFinished`
* :class:`ClientHelloResume`, :class:`ServerHelloResume`, :class:`ClientFinishedResume`
* :class:`ErrorResponse`, and the :class:`Extension` items carried by the hellos.

Encoding rules (spec App. D, restated in PROFILE §2): integers are unsigned big-endian; an
opaque field is a u16 length and then the bytes; an id list is a u16 count and then u16 ids;
nonces and macs are fixed 32-byte fields with no length; an extension list is a u16 count and
then (type u16, length u16, data) items. Each message has exactly one encoding, so equal
messages have equal bytes and the transcript hash is well defined.

Decoding is strict and bounded. Every read is checked against the input length before it
happens, and every count is capped before any loop runs, so the memory a decoder allocates is
bounded by the size of its input. Anything that does not parse (truncation, a length running
past the end, trailing bytes, a count of 0 or over the cap, a duplicate id or extension type, a
malformed known extension) raises :class:`palisade_c.errors.DecodeError` carrying the code
that the handshake puts on the wire; no other exception escapes a decoder fed with bytes.
Constructors validate too and raise ``TypeError``/``ValueError``: that is local misuse, not a
hostile peer.

``transcript_bytes()`` is the form that enters the handshake transcript (PROFILE §3): the
canonical encoding with each signature encoded as an empty opaque and padding kept. The
resumption macs are fixed-size, so there is no "empty" encoding for them; their transcript form
leaves the mac out altogether (see :class:`ServerHelloResume`).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint16_t
from libc.string cimport memcpy

from palisade_c._endian cimport load_u16, store_u16

from palisade_c.errors import DecodeError, ErrorCode

# --- constants (PROFILE §1, §2, §4, §7) -------------------------------------------------------

cdef enum:
    _VERSION = 0x12
    _NONCE_LEN = 32
    _MAC_LEN = 32
    _MAX_IDS = 32            # PROFILE §2: "a sane bound (say 32 ids)"
    _MAX_EXTENSIONS = 32     # [profile] same bound for extension lists
    _MAX_ERROR_DETAILS = 1024  # [profile] keeps ErrorResponse inside one small datagram
    _MAX_OPAQUE = 0xFFFF
    _EXT_PLUS = 0x0001
    _EXT_IGNORABLE = 0x8000

# Error codes used on the C paths (values of palisade_c.errors.ErrorCode).
cdef enum:
    _E_INVALID_VERSION = 0x0100
    _E_INVALID_CH = 0x0104
    _E_INVALID_SH = 0x0105
    _E_INVALID_CF = 0x0109
    _E_UNSUPPORTED_EXT = 0x010B
    _E_MALFORMED = 0x0306

VERSION = _VERSION
NONCE_LEN = _NONCE_LEN
MAC_LEN = _MAC_LEN
MAX_IDS = _MAX_IDS
MAX_EXTENSIONS = _MAX_EXTENSIONS
MAX_ERROR_DETAILS = _MAX_ERROR_DETAILS

KEM_MLKEM768 = 0x0011
KEM_MLKEM1024 = 0x0012
SIG_MLDSA65 = 0x0021
SIG_MLDSA87 = 0x0022
AEAD_CHACHA20POLY1305 = 0x0001

EXT_PLUS = _EXT_PLUS
EXT_IGNORABLE = _EXT_IGNORABLE
PLUS_RESUMPTION = 0x01
PLUS_MIGRATION = 0x02
PLUS_SHAPING = 0x04

# Handshake record msg_type values (PROFILE §4): defined once, by the record framing, and
# re-exported here so each message class can name its type.
from palisade_c.hsrecord import (  # noqa: E402
    MSG_CLIENT_FINISHED,
    MSG_CLIENT_FINISHED_RESUME,
    MSG_CLIENT_HELLO,
    MSG_CLIENT_HELLO_RESUME,
    MSG_ERROR_RESPONSE,
    MSG_HANDSHAKE_ACK,
    MSG_SERVER_HELLO,
    MSG_SERVER_HELLO_RESUME,
)


# --- bounded reader ---------------------------------------------------------------------------
# A cursor over the bytes of one message. ``code`` is the error code that any failure of this
# message carries, so the helpers below need not be told which message they are parsing.

cdef struct Reader:
    const uint8_t* p
    Py_ssize_t n
    Py_ssize_t pos
    int code


cdef int _fail_code(int code, str msg) except -1:
    raise DecodeError(msg, ErrorCode(code))


cdef inline int _fail(Reader* r, str msg) except -1:
    return _fail_code(r.code, msg)


cdef inline int _need(Reader* r, Py_ssize_t k, str what) except -1:
    # Written as a subtraction so that no sum can overflow.
    if k > r.n - r.pos:
        _fail(r, f"{what}: truncated (need {k} bytes at offset {r.pos}, {r.n - r.pos} left)")
    return 0


cdef inline int _u8(Reader* r, str what) except -1:
    _need(r, 1, what)
    r.pos += 1
    return r.p[r.pos - 1]


cdef inline int _u16(Reader* r, str what) except -1:
    _need(r, 2, what)
    r.pos += 2
    return load_u16(r.p + r.pos - 2)


cdef bytes _take(Reader* r, Py_ssize_t k, str what):
    _need(r, k, what)
    cdef bytes b = PyBytes_FromStringAndSize(<const char*>(r.p + r.pos), k)
    r.pos += k
    return b


cdef bytes _opaque(Reader* r, str what, bint required):
    cdef int k = _u16(r, what)
    if k == 0 and required:
        _fail(r, f"{what}: must not be empty")
    return _take(r, k, what)


cdef bint _flag(Reader* r, str what) except -1:
    cdef int v = _u8(r, what)
    if v > 1:
        # One encoding per value (PROFILE §2): a boolean octet is 0 or 1, nothing else.
        _fail(r, f"{what}: must be 0 or 1, got {v}")
    return v == 1


cdef tuple _ids(Reader* r, str what):
    cdef int count = _u16(r, what)
    cdef int seen[_MAX_IDS]
    cdef int i, j, v
    if count < 1 or count > _MAX_IDS:
        _fail(r, f"{what}: count {count} outside 1..{_MAX_IDS}")
    _need(r, 2 * count, what)
    out = []
    for i in range(count):
        v = load_u16(r.p + r.pos)
        r.pos += 2
        for j in range(i):
            if seen[j] == v:
                _fail(r, f"{what}: duplicate id 0x{v:04x}")
        seen[i] = v
        out.append(v)
    return tuple(out)


cdef Extension _new_extension(int ext_type, bytes data):
    cdef Extension e = Extension.__new__(Extension)
    e.type = ext_type
    e.data = data
    return e


cdef tuple _extensions(Reader* r, str what):
    cdef int count = _u16(r, what)
    cdef int seen[_MAX_EXTENSIONS]
    cdef int i, j, t
    cdef bytes data
    if count > _MAX_EXTENSIONS:
        _fail(r, f"{what}: count {count} over {_MAX_EXTENSIONS}")
    _need(r, 4 * count, what)  # each item is at least type + length
    out = []
    for i in range(count):
        t = _u16(r, what)
        data = _opaque(r, what, False)
        for j in range(i):
            if seen[j] == t:
                _fail(r, f"{what}: duplicate extension type 0x{t:04x}")
        seen[i] = t
        if t == _EXT_PLUS and PyBytes_GET_SIZE(data) != 1:
            # A known extension with the wrong shape makes the whole message malformed.
            _fail(r, f"{what}: plus extension data must be 1 byte")
        out.append(_new_extension(t, data))
    return tuple(out)


cdef int _version(Reader* r, str what) except -1:
    # The version byte is checked first, before the rest of the layout is trusted: a hello
    # from another version may have any shape, and the peer must get ErrorInvalidVersion back
    # rather than a generic "malformed" code [profile].
    if r.n == 0:
        _fail(r, f"{what}: empty message")
    if r.p[0] != _VERSION:
        _fail_code(_E_INVALID_VERSION, f"{what}: unsupported version 0x{r.p[0]:02x}")
    r.pos = 1
    return 0


cdef int _end(Reader* r, str what) except -1:
    if r.pos != r.n:
        _fail(r, f"{what}: {r.n - r.pos} trailing bytes")
    return 0


cdef bytes _as_bytes(object data):
    if type(data) is bytes:
        return <bytes>data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"decode() needs bytes, bytearray or memoryview, not {type(data).__name__}")


cdef inline void _reader(Reader* r, bytes buf, int code) noexcept:
    r.p = <const uint8_t*>PyBytes_AS_STRING(buf)
    r.n = PyBytes_GET_SIZE(buf)
    r.pos = 0
    r.code = code


# --- writer -----------------------------------------------------------------------------------
# Encoders size the message first, allocate the bytes object once, then fill it in place.

cdef inline uint8_t* _buf(bytes out) noexcept:
    return <uint8_t*>PyBytes_AS_STRING(out)


cdef inline uint8_t* _put_u8(uint8_t* p, int v) noexcept:
    p[0] = <uint8_t>v
    return p + 1


cdef inline uint8_t* _put_u16(uint8_t* p, int v) noexcept:
    store_u16(p, <uint16_t>v)
    return p + 2


cdef inline uint8_t* _put_raw(uint8_t* p, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), n)
    return p + n


cdef inline uint8_t* _put_opaque(uint8_t* p, bytes b) noexcept:
    return _put_raw(_put_u16(p, <int>PyBytes_GET_SIZE(b)), b)


cdef inline Py_ssize_t _opaque_size(bytes b) noexcept:
    return 2 + PyBytes_GET_SIZE(b)


cdef inline Py_ssize_t _ids_size(tuple ids) noexcept:
    return 2 + 2 * len(ids)


cdef uint8_t* _put_ids(uint8_t* p, tuple ids) except NULL:
    cdef Py_ssize_t i
    p = _put_u16(p, <int>len(ids))
    for i in range(len(ids)):
        p = _put_u16(p, <int>ids[i])
    return p


cdef Py_ssize_t _exts_size(tuple exts) noexcept:
    cdef Py_ssize_t i, n = 2
    for i in range(len(exts)):
        n += 4 + PyBytes_GET_SIZE((<Extension>exts[i]).data)
    return n


cdef uint8_t* _put_exts(uint8_t* p, tuple exts) noexcept:
    cdef Py_ssize_t i
    cdef Extension e
    p = _put_u16(p, <int>len(exts))
    for i in range(len(exts)):
        e = <Extension>exts[i]
        p = _put_opaque(_put_u16(p, e.type), e.data)
    return p


cdef inline int _done(uint8_t* start, uint8_t* end, Py_ssize_t size) except -1:
    if end - start != size:  # only a bug in this file can trigger it
        raise RuntimeError(f"internal encoder size mismatch ({end - start} != {size})")
    return 0


# --- constructor argument checks (local misuse → TypeError / ValueError) -----------------------

cdef int _arg_int(str name, object v, int hi) except -1:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < 0 or v > hi:
        raise ValueError(f"{name} must be in 0..{hi}, got {v!r}")
    return <int>v


cdef bytes _arg_bytes(str name, object v, Py_ssize_t lo, Py_ssize_t hi):
    cdef bytes b
    if type(v) is bytes:
        b = <bytes>v
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
    else:
        raise TypeError(f"{name} must be bytes-like, not {type(v).__name__}")
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    if lo == hi and n != lo:
        raise ValueError(f"{name} must be exactly {lo} bytes, got {n}")
    if n < lo or n > hi:
        raise ValueError(f"{name} must be {lo}..{hi} bytes, got {n}")
    return b


cdef int _arg_version(object v) except -1:
    if _arg_int("version", v, 0xFF) != _VERSION:
        raise ValueError(f"only version 0x{_VERSION:02x} is supported, got 0x{v:02x}")
    return _VERSION


cdef bint _arg_flag(str name, object v) except -1:
    if v is True or v is False:
        return v
    return _arg_int(name, v, 1) == 1


cdef int _check_iterable(str name, object v) except -1:
    # bytes/str iterate as ints/chars: almost certainly a mistake, so refuse them outright.
    if isinstance(v, (str, bytes, bytearray, memoryview, int, Extension)):
        raise TypeError(f"{name} must be an iterable of items, not {type(v).__name__}")
    return 0


cdef tuple _arg_ids(str name, object v):
    _check_iterable(name, v)
    cdef tuple items = tuple(v)
    if not 1 <= len(items) <= _MAX_IDS:
        raise ValueError(f"{name} must hold 1..{_MAX_IDS} ids, got {len(items)}")
    out = []
    for item in items:
        ident = _arg_int(name, item, 0xFFFF)
        if ident in out:
            raise ValueError(f"{name} holds 0x{ident:04x} twice")
        out.append(ident)
    return tuple(out)


cdef tuple _arg_exts(object v):
    _check_iterable("extensions", v)
    cdef tuple items = tuple(v)
    if len(items) > _MAX_EXTENSIONS:
        raise ValueError(f"at most {_MAX_EXTENSIONS} extensions, got {len(items)}")
    types = []
    for item in items:
        if not isinstance(item, Extension):
            raise TypeError(f"extensions must be Extension items, not {type(item).__name__}")
        if (<Extension>item).type in types:
            raise ValueError(f"extension type 0x{(<Extension>item).type:04x} appears twice")
        types.append((<Extension>item).type)
    return items


# --- object protocol helpers ----------------------------------------------------------------

cdef int _uninitialised(object obj) except -1:
    # Only an instance made with __new__ (bypassing __init__ and decode) has None fields, and
    # the encoders must never read through them.
    raise TypeError(f"{type(obj).__name__} is not initialised; use the constructor or decode()")


def _unpickle(cls, data):
    # Pickles carry the canonical encoding, so unpickling is a validated decode().
    return cls.decode(data)


# --- repr helpers (never print key material in full) ----------------------------------------

cdef str _short(bytes b):
    if b is None:
        return "None"
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    if n == 0:
        return "b''"
    if n <= 8:
        return f"<{b.hex()}>"
    return f"<{n} bytes {b[:4].hex()}..>"


cdef str _ids_repr(tuple ids):
    return "[" + ", ".join([f"0x{i:04x}" for i in ids]) + "]"


cdef str _exts_repr(tuple exts):
    return "[" + ", ".join([repr(e) for e in exts]) + "]"


# --- Extension --------------------------------------------------------------------------------

cdef class _Message:
    """What every codec class shares. The encoding is canonical (one per value), so it decides
    equality, hashing and pickling; each class supplies ``_encode``."""

    cdef bytes _encode(self, bint transcript):
        raise NotImplementedError

    def encode(self):
        """Canonical wire bytes."""
        return self._encode(False)

    def __reduce__(self):
        return (_unpickle, (type(self), self._encode(False)))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._encode(False) == (<_Message>other)._encode(False)

    def __hash__(self):
        return hash(self._encode(False))


cdef class Extension(_Message):
    """One handshake extension: ``type u16 | length u16 | data`` (spec §16.1).

    ``EXT_PLUS`` (0x0001) must carry exactly one byte of feature bits (PROFILE §1). Types with
    bit 0x8000 set are ignorable when unknown; other unknown types are left for
    :func:`check_extensions` to refuse, because only the handshake knows what it supports.
    """

    def __init__(self, type, data=b""):
        self.type = _arg_int("type", type, 0xFFFF)
        self.data = _arg_bytes("data", data, 0, _MAX_OPAQUE)
        if self.type == _EXT_PLUS and PyBytes_GET_SIZE(self.data) != 1:
            raise ValueError("the plus extension carries exactly one byte of feature bits")

    @property
    def ignorable(self):
        """True if the type has the 0x8000 bit: a peer that does not know it may skip it."""
        return (self.type & _EXT_IGNORABLE) != 0

    cdef bytes _encode(self, bint transcript):
        if self.data is None:
            _uninitialised(self)
        cdef Py_ssize_t size = 4 + PyBytes_GET_SIZE(self.data)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        _done(start, _put_opaque(_put_u16(start, self.type), self.data), size)
        return out

    def encode(self):
        """The item as it appears inside an extension list."""
        return self._encode(False)

    def transcript_bytes(self):
        """Same as :meth:`encode`; extensions are transcript-bound as sent (spec §16.1)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse exactly one item; failures carry ErrorMalformedPacket."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_MALFORMED)
        cdef int t = _u16(&r, "Extension.type")
        cdef bytes payload = _opaque(&r, "Extension.data", False)
        if t == _EXT_PLUS and PyBytes_GET_SIZE(payload) != 1:
            _fail(&r, "Extension: plus extension data must be 1 byte")
        _end(&r, "Extension")
        return _new_extension(t, payload)

    def __repr__(self):
        return f"Extension(type=0x{self.type:04x}, data={_short(self.data)})"


def make_plus_extension(features):
    """The PLUS extension offering (or accepting) ``features`` (PLUS_* bits, PROFILE §1)."""
    return Extension(_EXT_PLUS, bytes((_arg_int("features", features, 0xFF),)))


def check_extensions(extensions):
    """Apply the extension policy of spec §16.1 to a decoded message's extensions.

    Raises :class:`DecodeError` with ``ErrorUnsupportedExtension`` for an unknown type whose
    0x8000 bit is clear, skips unknown ignorable types, and returns the PLUS feature byte
    (0 when the PLUS extension is absent). The byte is returned as sent, unknown bits
    included: masking it with what this endpoint supports is negotiation, which is the
    handshake's job, not the codec's.
    """
    cdef int plus = 0
    cdef Extension e
    seen = set()
    for item in extensions:
        if not isinstance(item, Extension):
            raise TypeError(f"expected Extension, not {type(item).__name__}")
        e = <Extension>item
        if e.type in seen:
            raise ValueError(f"extension type 0x{e.type:04x} appears twice")
        seen.add(e.type)
        if e.type == _EXT_PLUS:
            if e.data is None or len(e.data) != 1:  # unreachable for constructed/decoded items
                raise ValueError("the plus extension carries exactly one byte")
            plus = e.data[0]
        elif not (e.type & _EXT_IGNORABLE):
            _fail_code(_E_UNSUPPORTED_EXT, f"unsupported extension 0x{e.type:04x}")
    return plus


# --- full handshake (PROFILE §2) --------------------------------------------------------------

cdef class ClientHello(_Message):
    """First message of the full handshake (spec §7.1; layout spec App. D).

    ``version u8 | kems | sigs | aeads | client_nonce[32] | K_c | client_certificate |
    client_signature | padding | extensions``. K_c and the certificate may not be empty
    (spec §7.1 makes both mandatory); the signature is empty in the profile's flow, because
    the client signs the transcript in ClientFinished (PROFILE §3).
    """

    msg_type = MSG_CLIENT_HELLO

    def __init__(self, *, supported_kems, supported_sigs, supported_aeads, client_nonce, k_c,
                 client_certificate, client_signature=b"", padding=b"", extensions=(),
                 version=_VERSION):
        self.version = _arg_version(version)
        self.supported_kems = _arg_ids("supported_kems", supported_kems)
        self.supported_sigs = _arg_ids("supported_sigs", supported_sigs)
        self.supported_aeads = _arg_ids("supported_aeads", supported_aeads)
        self.client_nonce = _arg_bytes("client_nonce", client_nonce, _NONCE_LEN, _NONCE_LEN)
        self.k_c = _arg_bytes("k_c", k_c, 1, _MAX_OPAQUE)
        self.client_certificate = _arg_bytes("client_certificate", client_certificate, 1,
                                             _MAX_OPAQUE)
        self.client_signature = _arg_bytes("client_signature", client_signature, 0, _MAX_OPAQUE)
        self.padding = _arg_bytes("padding", padding, 0, _MAX_OPAQUE)
        self.extensions = _arg_exts(extensions)

    cdef bytes _encode(self, bint transcript):
        if self.extensions is None:
            _uninitialised(self)
        cdef bytes sig = b"" if transcript else self.client_signature
        cdef Py_ssize_t size = (
            1 + _ids_size(self.supported_kems) + _ids_size(self.supported_sigs)
            + _ids_size(self.supported_aeads) + PyBytes_GET_SIZE(self.client_nonce)
            + _opaque_size(self.k_c)
            + _opaque_size(self.client_certificate) + _opaque_size(sig)
            + _opaque_size(self.padding) + _exts_size(self.extensions))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_u8(start, self.version)
        p = _put_ids(p, self.supported_kems)
        p = _put_ids(p, self.supported_sigs)
        p = _put_ids(p, self.supported_aeads)
        p = _put_raw(p, self.client_nonce)
        p = _put_opaque(p, self.k_c)
        p = _put_opaque(p, self.client_certificate)
        p = _put_opaque(p, sig)
        p = _put_opaque(p, self.padding)
        p = _put_exts(p, self.extensions)
        _done(start, p, size)
        return out

    def encode(self):
        """Canonical wire bytes (spec App. D)."""
        return self._encode(False)

    def transcript_bytes(self):
        """CH*: the encoding with client_signature empty, padding kept (PROFILE §3)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ClientHello. Errors: ErrorInvalidVersion, else ErrorInvalidClientHello."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_CH)
        _version(&r, "ClientHello")
        cdef ClientHello m = ClientHello.__new__(ClientHello)
        m.version = _VERSION
        m.supported_kems = _ids(&r, "ClientHello.supported_kems")
        m.supported_sigs = _ids(&r, "ClientHello.supported_sigs")
        m.supported_aeads = _ids(&r, "ClientHello.supported_aeads")
        m.client_nonce = _take(&r, _NONCE_LEN, "ClientHello.client_nonce")
        m.k_c = _opaque(&r, "ClientHello.k_c", True)
        m.client_certificate = _opaque(&r, "ClientHello.client_certificate", True)
        m.client_signature = _opaque(&r, "ClientHello.client_signature", False)
        m.padding = _opaque(&r, "ClientHello.padding", False)
        m.extensions = _extensions(&r, "ClientHello.extensions")
        _end(&r, "ClientHello")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(
            version=self.version, supported_kems=self.supported_kems,
            supported_sigs=self.supported_sigs, supported_aeads=self.supported_aeads,
            client_nonce=self.client_nonce, k_c=self.k_c,
            client_certificate=self.client_certificate,
            client_signature=self.client_signature, padding=self.padding,
            extensions=self.extensions)
        fields.update(changes)
        return ClientHello(**fields)

    def __repr__(self):
        return (f"ClientHello(version=0x{self.version:02x}, "
                f"supported_kems={_ids_repr(self.supported_kems)}, "
                f"supported_sigs={_ids_repr(self.supported_sigs)}, "
                f"supported_aeads={_ids_repr(self.supported_aeads)}, "
                f"client_nonce={_short(self.client_nonce)}, k_c={_short(self.k_c)}, "
                f"client_certificate={_short(self.client_certificate)}, "
                f"client_signature={_short(self.client_signature)}, "
                f"padding=<{len(self.padding)} bytes>, "
                f"extensions={_exts_repr(self.extensions)})")


cdef class ServerHello(_Message):
    """Second message of the full handshake (spec §7.2; field order is PROFILE §2).

    ``version u8 | kem_choice u16 | sig_choice u16 | aead_choice u16 | server_nonce[32] | K_s |
    CT_c | server_certificate | server_signature | padding | extensions``. K_s, CT_c and the
    certificate may not be empty. The signature may be empty here so that the server can build
    the message, take its transcript form, sign, and then :meth:`replace` the signature in;
    the handshake layer refuses an unsigned ServerHello.
    """

    msg_type = MSG_SERVER_HELLO

    def __init__(self, *, kem_choice, sig_choice, aead_choice, server_nonce, k_s, ct_c,
                 server_certificate, server_signature=b"", padding=b"", extensions=(),
                 version=_VERSION):
        self.version = _arg_version(version)
        self.kem_choice = _arg_int("kem_choice", kem_choice, 0xFFFF)
        self.sig_choice = _arg_int("sig_choice", sig_choice, 0xFFFF)
        self.aead_choice = _arg_int("aead_choice", aead_choice, 0xFFFF)
        self.server_nonce = _arg_bytes("server_nonce", server_nonce, _NONCE_LEN, _NONCE_LEN)
        self.k_s = _arg_bytes("k_s", k_s, 1, _MAX_OPAQUE)
        self.ct_c = _arg_bytes("ct_c", ct_c, 1, _MAX_OPAQUE)
        self.server_certificate = _arg_bytes("server_certificate", server_certificate, 1,
                                             _MAX_OPAQUE)
        self.server_signature = _arg_bytes("server_signature", server_signature, 0, _MAX_OPAQUE)
        self.padding = _arg_bytes("padding", padding, 0, _MAX_OPAQUE)
        self.extensions = _arg_exts(extensions)

    cdef bytes _encode(self, bint transcript):
        if self.extensions is None:
            _uninitialised(self)
        cdef bytes sig = b"" if transcript else self.server_signature
        cdef Py_ssize_t size = (
            7 + PyBytes_GET_SIZE(self.server_nonce) + _opaque_size(self.k_s)
            + _opaque_size(self.ct_c)
            + _opaque_size(self.server_certificate) + _opaque_size(sig)
            + _opaque_size(self.padding) + _exts_size(self.extensions))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_u8(start, self.version)
        p = _put_u16(p, self.kem_choice)
        p = _put_u16(p, self.sig_choice)
        p = _put_u16(p, self.aead_choice)
        p = _put_raw(p, self.server_nonce)
        p = _put_opaque(p, self.k_s)
        p = _put_opaque(p, self.ct_c)
        p = _put_opaque(p, self.server_certificate)
        p = _put_opaque(p, sig)
        p = _put_opaque(p, self.padding)
        p = _put_exts(p, self.extensions)
        _done(start, p, size)
        return out

    def transcript_bytes(self):
        """SH*: the encoding with server_signature empty, padding kept (PROFILE §3)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ServerHello. Errors: ErrorInvalidVersion, else ErrorInvalidServerHello."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_SH)
        _version(&r, "ServerHello")
        cdef ServerHello m = ServerHello.__new__(ServerHello)
        m.version = _VERSION
        m.kem_choice = _u16(&r, "ServerHello.kem_choice")
        m.sig_choice = _u16(&r, "ServerHello.sig_choice")
        m.aead_choice = _u16(&r, "ServerHello.aead_choice")
        m.server_nonce = _take(&r, _NONCE_LEN, "ServerHello.server_nonce")
        m.k_s = _opaque(&r, "ServerHello.k_s", True)
        m.ct_c = _opaque(&r, "ServerHello.ct_c", True)
        m.server_certificate = _opaque(&r, "ServerHello.server_certificate", True)
        m.server_signature = _opaque(&r, "ServerHello.server_signature", False)
        m.padding = _opaque(&r, "ServerHello.padding", False)
        m.extensions = _extensions(&r, "ServerHello.extensions")
        _end(&r, "ServerHello")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(
            version=self.version, kem_choice=self.kem_choice, sig_choice=self.sig_choice,
            aead_choice=self.aead_choice, server_nonce=self.server_nonce, k_s=self.k_s,
            ct_c=self.ct_c, server_certificate=self.server_certificate,
            server_signature=self.server_signature, padding=self.padding,
            extensions=self.extensions)
        fields.update(changes)
        return ServerHello(**fields)

    def __repr__(self):
        return (f"ServerHello(version=0x{self.version:02x}, kem_choice=0x{self.kem_choice:04x}, "
                f"sig_choice=0x{self.sig_choice:04x}, aead_choice=0x{self.aead_choice:04x}, "
                f"server_nonce={_short(self.server_nonce)}, k_s={_short(self.k_s)}, "
                f"ct_c={_short(self.ct_c)}, "
                f"server_certificate={_short(self.server_certificate)}, "
                f"server_signature={_short(self.server_signature)}, "
                f"padding=<{len(self.padding)} bytes>, "
                f"extensions={_exts_repr(self.extensions)})")


cdef class ClientFinished(_Message):
    """Third message of the full handshake [profile, PROFILE §2]: ``CT_s | client_signature |
    padding``. It has no version byte and no extensions; CT_s may not be empty.
    """

    msg_type = MSG_CLIENT_FINISHED

    def __init__(self, *, ct_s, client_signature=b"", padding=b""):
        self.ct_s = _arg_bytes("ct_s", ct_s, 1, _MAX_OPAQUE)
        self.client_signature = _arg_bytes("client_signature", client_signature, 0, _MAX_OPAQUE)
        self.padding = _arg_bytes("padding", padding, 0, _MAX_OPAQUE)

    cdef bytes _encode(self, bint transcript):
        if self.ct_s is None:
            _uninitialised(self)
        cdef bytes sig = b"" if transcript else self.client_signature
        cdef Py_ssize_t size = (_opaque_size(self.ct_s) + _opaque_size(sig)
                                + _opaque_size(self.padding))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_opaque(start, self.ct_s)
        p = _put_opaque(p, sig)
        p = _put_opaque(p, self.padding)
        _done(start, p, size)
        return out

    def transcript_bytes(self):
        """CF*: the encoding with client_signature empty, padding kept (PROFILE §3)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ClientFinished; any failure carries ErrorInvalidClientFinished."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_CF)
        cdef ClientFinished m = ClientFinished.__new__(ClientFinished)
        m.ct_s = _opaque(&r, "ClientFinished.ct_s", True)
        m.client_signature = _opaque(&r, "ClientFinished.client_signature", False)
        m.padding = _opaque(&r, "ClientFinished.padding", False)
        _end(&r, "ClientFinished")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(ct_s=self.ct_s, client_signature=self.client_signature,
                      padding=self.padding)
        fields.update(changes)
        return ClientFinished(**fields)

    def __repr__(self):
        return (f"ClientFinished(ct_s={_short(self.ct_s)}, "
                f"client_signature={_short(self.client_signature)}, "
                f"padding=<{len(self.padding)} bytes>)")


# --- ErrorResponse (spec §14.1, PROFILE §4) ---------------------------------------------------

cdef class ErrorResponse(_Message):
    """``error_code u16 | details_len u16 | details``; details are at most 1024 bytes [profile].

    ``details`` is kept as bytes (the peer chose them); :attr:`text` is a lossy UTF-8 view for
    logs. A ``str`` passed to the constructor is encoded as UTF-8.
    """

    msg_type = MSG_ERROR_RESPONSE

    def __init__(self, *, error_code, details=b""):
        self.error_code = _arg_int("error_code", error_code, 0xFFFF)
        if isinstance(details, str):
            details = details.encode("utf-8")
        self.details = _arg_bytes("details", details, 0, _MAX_ERROR_DETAILS)

    @property
    def text(self):
        """The details decoded as UTF-8, undecodable bytes replaced."""
        return self.details.decode("utf-8", "replace")

    cdef bytes _encode(self, bint transcript):
        if self.details is None:
            _uninitialised(self)
        cdef Py_ssize_t size = 2 + _opaque_size(self.details)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        _done(start, _put_opaque(_put_u16(start, self.error_code), self.details), size)
        return out

    def transcript_bytes(self):
        """Same as :meth:`encode` (an ErrorResponse never enters a transcript)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse an ErrorResponse; any failure carries ErrorMalformedPacket."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_MALFORMED)
        cdef ErrorResponse m = ErrorResponse.__new__(ErrorResponse)
        m.error_code = _u16(&r, "ErrorResponse.error_code")
        cdef int n = _u16(&r, "ErrorResponse.details_len")
        if n > _MAX_ERROR_DETAILS:
            _fail(&r, f"ErrorResponse.details: {n} bytes, over {_MAX_ERROR_DETAILS}")
        m.details = _take(&r, n, "ErrorResponse.details")
        _end(&r, "ErrorResponse")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(error_code=self.error_code, details=self.details)
        fields.update(changes)
        return ErrorResponse(**fields)

    def __repr__(self):
        text = self.text
        if len(text) > 64:
            text = text[:64] + "..."
        return f"ErrorResponse(error_code=0x{self.error_code:04x}, details={text!r})"


# --- PLUS resumption (PROFILE §7) -------------------------------------------------------------

cdef class ClientHelloResume(_Message):
    """``version u8 | ticket | K'_c | resume_nonce[32] | early_data_offered u8 | padding |
    extensions`` (PROFILE §7). The ticket and K'_c may not be empty; early_data_offered is
    0 or 1. There is no signature (resumption authenticates with the ticket PSK, spec §12.1),
    so the transcript form equals the encoding.
    """

    msg_type = MSG_CLIENT_HELLO_RESUME

    def __init__(self, *, ticket, k_c, resume_nonce, early_data_offered=False, padding=b"",
                 extensions=(), version=_VERSION):
        self.version = _arg_version(version)
        self.ticket = _arg_bytes("ticket", ticket, 1, _MAX_OPAQUE)
        self.k_c = _arg_bytes("k_c", k_c, 1, _MAX_OPAQUE)
        self.resume_nonce = _arg_bytes("resume_nonce", resume_nonce, _NONCE_LEN, _NONCE_LEN)
        self.early_data_offered = _arg_flag("early_data_offered", early_data_offered)
        self.padding = _arg_bytes("padding", padding, 0, _MAX_OPAQUE)
        self.extensions = _arg_exts(extensions)

    cdef bytes _encode(self, bint transcript):
        if self.extensions is None:
            _uninitialised(self)
        cdef Py_ssize_t size = (
            1 + _opaque_size(self.ticket) + _opaque_size(self.k_c)
            + PyBytes_GET_SIZE(self.resume_nonce) + 1
            + _opaque_size(self.padding) + _exts_size(self.extensions))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_u8(start, self.version)
        p = _put_opaque(p, self.ticket)
        p = _put_opaque(p, self.k_c)
        p = _put_raw(p, self.resume_nonce)
        p = _put_u8(p, 1 if self.early_data_offered else 0)
        p = _put_opaque(p, self.padding)
        p = _put_exts(p, self.extensions)
        _done(start, p, size)
        return out

    def transcript_bytes(self):
        """CHR*: identical to the encoding (the message has no signature or mac)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ClientHelloResume. Errors: ErrorInvalidVersion, else ErrorInvalidClientHello."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_CH)
        _version(&r, "ClientHelloResume")
        cdef ClientHelloResume m = ClientHelloResume.__new__(ClientHelloResume)
        m.version = _VERSION
        m.ticket = _opaque(&r, "ClientHelloResume.ticket", True)
        m.k_c = _opaque(&r, "ClientHelloResume.k_c", True)
        m.resume_nonce = _take(&r, _NONCE_LEN, "ClientHelloResume.resume_nonce")
        m.early_data_offered = _flag(&r, "ClientHelloResume.early_data_offered")
        m.padding = _opaque(&r, "ClientHelloResume.padding", False)
        m.extensions = _extensions(&r, "ClientHelloResume.extensions")
        _end(&r, "ClientHelloResume")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(version=self.version, ticket=self.ticket, k_c=self.k_c,
                      resume_nonce=self.resume_nonce,
                      early_data_offered=self.early_data_offered, padding=self.padding,
                      extensions=self.extensions)
        fields.update(changes)
        return ClientHelloResume(**fields)

    def __repr__(self):
        return (f"ClientHelloResume(version=0x{self.version:02x}, ticket={_short(self.ticket)}, "
                f"k_c={_short(self.k_c)}, resume_nonce={_short(self.resume_nonce)}, "
                f"early_data_offered={self.early_data_offered}, "
                f"padding=<{len(self.padding)} bytes>, "
                f"extensions={_exts_repr(self.extensions)})")


cdef class ServerHelloResume(_Message):
    """``version u8 | accept_0rtt u8 | server_nonce'[32] | K'_s | CT'_c | mac[32] | padding |
    extensions`` (PROFILE §7). K'_s and CT'_c may not be empty; accept_0rtt is 0 or 1.

    Transcript form [profile]: the mac is a fixed 32-byte field, so it cannot be "encoded
    empty" the way an opaque signature is without changing the layout. Its transcript form
    therefore omits the mac entirely; every other field keeps its wire encoding. The mac
    covers the transcript, so it cannot be part of it; build the message with a placeholder
    mac, compute the mac over the transcript, then :meth:`replace` it in.
    """

    msg_type = MSG_SERVER_HELLO_RESUME

    def __init__(self, *, server_nonce, k_s, ct_c, mac, accept_0rtt=False, padding=b"",
                 extensions=(), version=_VERSION):
        self.version = _arg_version(version)
        self.accept_0rtt = _arg_flag("accept_0rtt", accept_0rtt)
        self.server_nonce = _arg_bytes("server_nonce", server_nonce, _NONCE_LEN, _NONCE_LEN)
        self.k_s = _arg_bytes("k_s", k_s, 1, _MAX_OPAQUE)
        self.ct_c = _arg_bytes("ct_c", ct_c, 1, _MAX_OPAQUE)
        self.mac = _arg_bytes("mac", mac, _MAC_LEN, _MAC_LEN)
        self.padding = _arg_bytes("padding", padding, 0, _MAX_OPAQUE)
        self.extensions = _arg_exts(extensions)

    cdef bytes _encode(self, bint transcript):
        if self.extensions is None:
            _uninitialised(self)
        cdef Py_ssize_t size = (
            2 + PyBytes_GET_SIZE(self.server_nonce) + _opaque_size(self.k_s)
            + _opaque_size(self.ct_c) + (0 if transcript else PyBytes_GET_SIZE(self.mac))
            + _opaque_size(self.padding)
            + _exts_size(self.extensions))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_u8(start, self.version)
        p = _put_u8(p, 1 if self.accept_0rtt else 0)
        p = _put_raw(p, self.server_nonce)
        p = _put_opaque(p, self.k_s)
        p = _put_opaque(p, self.ct_c)
        if not transcript:
            p = _put_raw(p, self.mac)
        p = _put_opaque(p, self.padding)
        p = _put_exts(p, self.extensions)
        _done(start, p, size)
        return out

    def transcript_bytes(self):
        """SHR*: the encoding without the mac field (see the class docstring)."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ServerHelloResume. Errors: ErrorInvalidVersion, else ErrorInvalidServerHello."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_SH)
        _version(&r, "ServerHelloResume")
        cdef ServerHelloResume m = ServerHelloResume.__new__(ServerHelloResume)
        m.version = _VERSION
        m.accept_0rtt = _flag(&r, "ServerHelloResume.accept_0rtt")
        m.server_nonce = _take(&r, _NONCE_LEN, "ServerHelloResume.server_nonce")
        m.k_s = _opaque(&r, "ServerHelloResume.k_s", True)
        m.ct_c = _opaque(&r, "ServerHelloResume.ct_c", True)
        m.mac = _take(&r, _MAC_LEN, "ServerHelloResume.mac")
        m.padding = _opaque(&r, "ServerHelloResume.padding", False)
        m.extensions = _extensions(&r, "ServerHelloResume.extensions")
        _end(&r, "ServerHelloResume")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(version=self.version, accept_0rtt=self.accept_0rtt,
                      server_nonce=self.server_nonce, k_s=self.k_s, ct_c=self.ct_c,
                      mac=self.mac, padding=self.padding, extensions=self.extensions)
        fields.update(changes)
        return ServerHelloResume(**fields)

    def __repr__(self):
        return (f"ServerHelloResume(version=0x{self.version:02x}, "
                f"accept_0rtt={self.accept_0rtt}, server_nonce={_short(self.server_nonce)}, "
                f"k_s={_short(self.k_s)}, ct_c={_short(self.ct_c)}, mac={_short(self.mac)}, "
                f"padding=<{len(self.padding)} bytes>, "
                f"extensions={_exts_repr(self.extensions)})")


cdef class ClientFinishedResume(_Message):
    """``CT'_s | mac[32]`` (PROFILE §7). CT'_s may not be empty.

    Transcript form [profile]: CT'_s alone, the fixed-size mac omitted (as for
    :class:`ServerHelloResume`).
    """

    msg_type = MSG_CLIENT_FINISHED_RESUME

    def __init__(self, *, ct_s, mac):
        self.ct_s = _arg_bytes("ct_s", ct_s, 1, _MAX_OPAQUE)
        self.mac = _arg_bytes("mac", mac, _MAC_LEN, _MAC_LEN)

    cdef bytes _encode(self, bint transcript):
        if self.ct_s is None:
            _uninitialised(self)
        cdef Py_ssize_t size = (_opaque_size(self.ct_s)
                                + (0 if transcript else PyBytes_GET_SIZE(self.mac)))
        cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
        cdef uint8_t* start = _buf(out)
        cdef uint8_t* p = _put_opaque(start, self.ct_s)
        if not transcript:
            p = _put_raw(p, self.mac)
        _done(start, p, size)
        return out

    def transcript_bytes(self):
        """CFR*: the encoding without the mac field."""
        return self._encode(True)

    @classmethod
    def decode(cls, data):
        """Parse a ClientFinishedResume; any failure carries ErrorInvalidClientFinished."""
        cdef bytes buf = _as_bytes(data)
        cdef Reader r
        _reader(&r, buf, _E_INVALID_CF)
        cdef ClientFinishedResume m = ClientFinishedResume.__new__(ClientFinishedResume)
        m.ct_s = _opaque(&r, "ClientFinishedResume.ct_s", True)
        m.mac = _take(&r, _MAC_LEN, "ClientFinishedResume.mac")
        _end(&r, "ClientFinishedResume")
        return m

    def replace(self, **changes):
        """A copy with some fields changed (validated like the constructor)."""
        fields = dict(ct_s=self.ct_s, mac=self.mac)
        fields.update(changes)
        return ClientFinishedResume(**fields)

    def __repr__(self):
        return f"ClientFinishedResume(ct_s={_short(self.ct_s)}, mac={_short(self.mac)})"


# --- dispatch by record msg_type ---------------------------------------------------------------

# Any message body this module decodes; a real union, so it also works with isinstance().
HandshakeMessage = (ClientHello | ServerHello | ClientFinished | ClientHelloResume
                    | ServerHelloResume | ClientFinishedResume | ErrorResponse)

MESSAGE_CLASSES = {
    MSG_CLIENT_HELLO: ClientHello,
    MSG_SERVER_HELLO: ServerHello,
    MSG_CLIENT_FINISHED: ClientFinished,
    MSG_CLIENT_HELLO_RESUME: ClientHelloResume,
    MSG_SERVER_HELLO_RESUME: ServerHelloResume,
    MSG_CLIENT_FINISHED_RESUME: ClientFinishedResume,
    MSG_ERROR_RESPONSE: ErrorResponse,
}


def decode_message(msg_type, data):
    """Decode a reassembled handshake message body by its record ``msg_type`` (PROFILE §4).

    An unknown type (HandshakeAck included: it is a record-layer item with no body codec here)
    raises DecodeError with ErrorMalformedPacket.
    """
    cls = MESSAGE_CLASSES.get(msg_type)
    if cls is None:
        _fail_code(_E_MALFORMED, f"no handshake message has msg_type {msg_type!r}")
    return cls.decode(data)
