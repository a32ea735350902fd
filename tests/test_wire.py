"""Tests of the handshake message codecs (palisade_c.wire; PROFILE §2, §4, §7).

Covers: the spec's worked ClientHello rebuilt byte for byte, round trips of every message with
generated fields, transcript forms, constructor validation, the extension policy, and strict
decoding under fuzzing (random bytes, every truncation, trailing bytes, every single-bit flip,
overlong lengths): a decoder either returns a message that re-encodes to exactly its input, or
raises DecodeError with the code for that message, and nothing else.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palisade_c import wire
from palisade_c.errors import DecodeError, ErrorCode
from palisade_c.wire import (
    ClientFinished,
    ClientFinishedResume,
    ClientHello,
    ClientHelloResume,
    ErrorResponse,
    Extension,
    ServerHello,
    ServerHelloResume,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

V = ErrorCode.ErrorInvalidVersion
CH = ErrorCode.ErrorInvalidClientHello
SH = ErrorCode.ErrorInvalidServerHello
CF = ErrorCode.ErrorInvalidClientFinished
MAL = ErrorCode.ErrorMalformedPacket

# The codes each decoder may raise: version first (hellos only), then the message's own code.
CODES: dict[type, set[ErrorCode]] = {
    ClientHello: {V, CH},
    ServerHello: {V, SH},
    ClientFinished: {CF},
    ClientHelloResume: {V, CH},
    ServerHelloResume: {V, SH},
    ClientFinishedResume: {CF},
    ErrorResponse: {MAL},
    Extension: {MAL},
}
OWN_CODE: dict[type, ErrorCode] = {
    ClientHello: CH,
    ServerHello: SH,
    ClientFinished: CF,
    ClientHelloResume: CH,
    ServerHelloResume: SH,
    ClientFinishedResume: CF,
    ErrorResponse: MAL,
    Extension: MAL,
}

Message = Any  # any of the codec classes (they share encode/decode/transcript_bytes)


def cls_name(cls: type) -> str:
    return cls.__name__


def check_decode(cls: Any, data: bytes, codes: set[ErrorCode] | None = None) -> Message | None:
    """Decode ``data``; it must parse canonically or fail with an allowed DecodeError code."""
    try:
        msg = cls.decode(data)
    except DecodeError as exc:
        assert exc.code in (codes if codes is not None else CODES[cls]), (exc.code, str(exc))
        return None
    # One encoding per value (PROFILE §2): whatever parses re-encodes to the same bytes.
    assert msg.encode() == data
    return msg


def expect_error(cls: Any, data: bytes, code: ErrorCode) -> None:
    with pytest.raises(DecodeError) as info:
        cls.decode(data)
    assert info.value.code == code, str(info.value)


# --- samples ----------------------------------------------------------------------------------

NONCE = bytes(range(1, 33))


def sample_ch(**kw: Any) -> ClientHello:
    fields: dict[str, Any] = dict(
        supported_kems=[wire.KEM_MLKEM768, wire.KEM_MLKEM1024],
        supported_sigs=[wire.SIG_MLDSA65],
        supported_aeads=[wire.AEAD_CHACHA20POLY1305],
        client_nonce=NONCE,
        k_c=b"\x11" * 40,
        client_certificate=b"\x22" * 30,
        client_signature=b"\x33" * 20,
        padding=b"\x00" * 5,
        extensions=[wire.make_plus_extension(wire.PLUS_RESUMPTION), Extension(0x8001, b"ab")],
    )
    fields.update(kw)
    return ClientHello(**fields)


def sample_sh(**kw: Any) -> ServerHello:
    fields: dict[str, Any] = dict(
        kem_choice=wire.KEM_MLKEM768,
        sig_choice=wire.SIG_MLDSA65,
        aead_choice=wire.AEAD_CHACHA20POLY1305,
        server_nonce=b"\x44" * 32,
        k_s=b"\x55" * 40,
        ct_c=b"\x66" * 36,
        server_certificate=b"\x77" * 30,
        server_signature=b"\x88" * 20,
        padding=b"\x00" * 3,
        extensions=[wire.make_plus_extension(wire.PLUS_RESUMPTION | wire.PLUS_SHAPING)],
    )
    fields.update(kw)
    return ServerHello(**fields)


def sample_cf() -> ClientFinished:
    return ClientFinished(ct_s=b"\x99" * 36, client_signature=b"\xaa" * 20, padding=b"\x00" * 4)


def sample_chr() -> ClientHelloResume:
    return ClientHelloResume(
        ticket=b"\xbb" * 48,
        k_c=b"\xcc" * 40,
        resume_nonce=b"\xdd" * 32,
        early_data_offered=True,
        padding=b"\x00" * 2,
        extensions=[wire.make_plus_extension(wire.PLUS_RESUMPTION)],
    )


def sample_shr() -> ServerHelloResume:
    return ServerHelloResume(
        accept_0rtt=True,
        server_nonce=b"\xee" * 32,
        k_s=b"\x12" * 40,
        ct_c=b"\x13" * 36,
        mac=b"\x14" * 32,
        padding=b"\x00" * 2,
        extensions=[Extension(0x8002, b"")],
    )


def sample_cfr() -> ClientFinishedResume:
    return ClientFinishedResume(ct_s=b"\x15" * 36, mac=b"\x16" * 32)


def sample_err() -> ErrorResponse:
    return ErrorResponse(error_code=ErrorCode.ErrorSignatureVerifyFailed, details="bad sig")


SAMPLES: list[Callable[[], Message]] = [
    sample_ch,
    sample_sh,
    sample_cf,
    sample_chr,
    sample_shr,
    sample_cfr,
    sample_err,
    lambda: Extension(0x0042, b"xyz"),
]
SAMPLE_IDS = ["CH", "SH", "CF", "CHR", "SHR", "CFR", "ERR", "EXT"]


# --- the build --------------------------------------------------------------------------------


def test_wire_is_compiled_extension() -> None:
    assert wire.__file__ is not None
    assert wire.__file__.endswith(".so")


# --- spec worked example (PROFILE §2) --------------------------------------------------------


def test_worked_client_hello_byte_for_byte() -> None:
    # Real key sizes: an ML-KEM-768 encapsulation key and an ML-DSA-65 public key.
    k_c = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
    cert = mldsa.MLDSA65PrivateKey.generate().public_key().public_bytes_raw()
    assert (len(k_c), len(cert)) == (1184, 1952)

    # Expected bytes built by hand from the example's logical inputs, not by the codec.
    expected = (
        bytes.fromhex("12 0001 0011 0001 0021 0001 0001")
        + NONCE
        + bytes.fromhex("04a0")
        + k_c
        + bytes.fromhex("07a0")
        + cert
        + bytes.fromhex("0000 0000 0000")  # signature absent, padding absent, 0 extensions
    )

    ch = ClientHello(
        version=0x12,
        supported_kems=[0x0011],
        supported_sigs=[0x0021],
        supported_aeads=[0x0001],
        client_nonce=NONCE,
        k_c=k_c,
        client_certificate=cert,
    )
    assert ch.encode() == expected
    assert len(expected) == 1 + 3 * 4 + 32 + 2 + 1184 + 2 + 1952 + 6
    decoded = ClientHello.decode(expected)
    assert decoded == ch
    assert decoded.k_c == k_c and decoded.client_certificate == cert
    assert decoded.supported_kems == (0x0011,)
    # Nothing to blank: the transcript form of an unsigned hello is the hello itself.
    assert ch.transcript_bytes() == expected


def test_worked_client_hello_bit_flips_never_escape() -> None:
    k_c = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
    cert = mldsa.MLDSA65PrivateKey.generate().public_key().public_bytes_raw()
    data = sample_ch(k_c=k_c, client_certificate=cert).encode()
    buf = bytearray(data)
    for bit in range(len(data) * 8):
        buf[bit >> 3] ^= 1 << (bit & 7)
        check_decode(ClientHello, bytes(buf))
        buf[bit >> 3] ^= 1 << (bit & 7)


# --- round trips ------------------------------------------------------------------------------

ids = st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=wire.MAX_IDS, unique=True)
nonce = st.binary(min_size=32, max_size=32)
required = st.binary(min_size=1, max_size=80)
optional = st.binary(max_size=80)
ext_item = st.one_of(
    st.integers(0, 0xFF).map(wire.make_plus_extension),
    st.builds(
        Extension,
        st.integers(0, 0xFFFF).filter(lambda t: t != wire.EXT_PLUS),
        st.binary(max_size=16),
    ),
)
exts = st.lists(ext_item, max_size=6, unique_by=lambda e: e.type)


def roundtrip(msg: Message) -> None:
    data = msg.encode()
    again = type(msg).decode(data)
    assert again == msg
    assert hash(again) == hash(msg)
    assert again.encode() == data
    # Other buffer types decode the same.
    assert type(msg).decode(bytearray(data)) == msg
    assert type(msg).decode(memoryview(data)) == msg


@FAST
@given(ids, ids, ids, nonce, required, required, optional, optional, exts)
def test_client_hello_roundtrip(
    kems: list[int],
    sigs: list[int],
    aeads: list[int],
    n: bytes,
    k_c: bytes,
    cert: bytes,
    sig: bytes,
    pad: bytes,
    ex: list[Extension],
) -> None:
    msg = ClientHello(
        supported_kems=kems,
        supported_sigs=sigs,
        supported_aeads=aeads,
        client_nonce=n,
        k_c=k_c,
        client_certificate=cert,
        client_signature=sig,
        padding=pad,
        extensions=ex,
    )
    roundtrip(msg)
    assert msg.supported_kems == tuple(kems) and msg.extensions == tuple(ex)


u16 = st.integers(0, 0xFFFF)


@FAST
@given(u16, u16, u16, nonce, required, required, required, optional, optional, exts)
def test_server_hello_roundtrip(
    kem: int,
    sig_id: int,
    aead: int,
    n: bytes,
    k_s: bytes,
    ct_c: bytes,
    cert: bytes,
    sig: bytes,
    pad: bytes,
    ex: list[Extension],
) -> None:
    roundtrip(
        ServerHello(
            kem_choice=kem,
            sig_choice=sig_id,
            aead_choice=aead,
            server_nonce=n,
            k_s=k_s,
            ct_c=ct_c,
            server_certificate=cert,
            server_signature=sig,
            padding=pad,
            extensions=ex,
        )
    )


@FAST
@given(required, optional, optional)
def test_client_finished_roundtrip(ct_s: bytes, sig: bytes, pad: bytes) -> None:
    roundtrip(ClientFinished(ct_s=ct_s, client_signature=sig, padding=pad))


@FAST
@given(u16, st.binary(max_size=wire.MAX_ERROR_DETAILS))
def test_error_response_roundtrip(code: int, details: bytes) -> None:
    roundtrip(ErrorResponse(error_code=code, details=details))


@FAST
@given(required, required, nonce, st.booleans(), optional, exts)
def test_client_hello_resume_roundtrip(
    ticket: bytes, k_c: bytes, n: bytes, early: bool, pad: bytes, ex: list[Extension]
) -> None:
    msg = ClientHelloResume(
        ticket=ticket,
        k_c=k_c,
        resume_nonce=n,
        early_data_offered=early,
        padding=pad,
        extensions=ex,
    )
    roundtrip(msg)
    assert msg.transcript_bytes() == msg.encode()  # no signature, no mac


@FAST
@given(st.booleans(), nonce, required, required, nonce, optional, exts)
def test_server_hello_resume_roundtrip(
    accept: bool, n: bytes, k_s: bytes, ct_c: bytes, mac: bytes, pad: bytes, ex: list[Extension]
) -> None:
    roundtrip(
        ServerHelloResume(
            accept_0rtt=accept,
            server_nonce=n,
            k_s=k_s,
            ct_c=ct_c,
            mac=mac,
            padding=pad,
            extensions=ex,
        )
    )


@FAST
@given(required, nonce)
def test_client_finished_resume_roundtrip(ct_s: bytes, mac: bytes) -> None:
    roundtrip(ClientFinishedResume(ct_s=ct_s, mac=mac))


@FAST
@given(ext_item)
def test_extension_roundtrip(ext: Extension) -> None:
    roundtrip(ext)


def test_large_fields_roundtrip() -> None:
    big = bytes(range(256)) * 255 + b"\x01" * 255  # exactly 0xFFFF bytes
    roundtrip(sample_ch(k_c=big, padding=big))
    with pytest.raises(ValueError):
        sample_ch(k_c=big + b"\x00")


def test_decode_message_dispatch() -> None:
    for make in SAMPLES[:-1]:
        msg = make()
        assert wire.decode_message(msg.msg_type, msg.encode()) == msg
        assert wire.MESSAGE_CLASSES[msg.msg_type] is type(msg)
    assert isinstance(sample_cf(), wire.HandshakeMessage)
    with pytest.raises(DecodeError) as info:
        wire.decode_message(wire.MSG_HANDSHAKE_ACK, b"")
    assert info.value.code == MAL


# --- transcript forms (PROFILE §3, §7) --------------------------------------------------------


def test_transcript_drops_signatures_keeps_padding() -> None:
    ch = sample_ch()
    assert ch.transcript_bytes() == ch.replace(client_signature=b"").encode()
    assert ch.transcript_bytes() != ch.encode()
    assert ch.client_signature not in ch.transcript_bytes()
    assert ch.transcript_bytes() != ch.replace(padding=b"").transcript_bytes()

    sh = sample_sh()
    assert sh.transcript_bytes() == sh.replace(server_signature=b"").encode()
    assert sh.server_signature not in sh.transcript_bytes()
    assert sh.transcript_bytes() != sh.replace(padding=b"").transcript_bytes()

    cf = sample_cf()
    assert cf.transcript_bytes() == cf.replace(client_signature=b"").encode()
    assert cf.transcript_bytes() != cf.replace(padding=b"").transcript_bytes()


def test_transcript_independent_of_signature_value() -> None:
    # The signer can hash the unsigned message, sign, then fill the signature in.
    unsigned = sample_sh(server_signature=b"")
    signed = unsigned.replace(server_signature=b"\x01" * 3309)
    assert unsigned.transcript_bytes() == signed.transcript_bytes()


def test_resumption_transcripts_omit_mac() -> None:
    shr = sample_shr()
    data = shr.encode()
    mac_at = 1 + 1 + 32 + 2 + len(shr.k_s) + 2 + len(shr.ct_c)
    assert data[mac_at : mac_at + 32] == shr.mac
    assert shr.transcript_bytes() == data[:mac_at] + data[mac_at + 32 :]
    assert shr.replace(mac=bytes(32)).transcript_bytes() == shr.transcript_bytes()

    cfr = sample_cfr()
    assert cfr.transcript_bytes() == len(cfr.ct_s).to_bytes(2, "big") + cfr.ct_s
    assert cfr.encode() == cfr.transcript_bytes() + cfr.mac


def test_transcript_hash_is_stable() -> None:
    ch, sh = sample_ch(), sample_sh()
    th1 = hashlib.sha3_256(ch.transcript_bytes() + sh.transcript_bytes()).digest()
    ch2, sh2 = ClientHello.decode(ch.encode()), ServerHello.decode(sh.encode())
    th2 = hashlib.sha3_256(ch2.transcript_bytes() + sh2.transcript_bytes()).digest()
    assert th1 == th2


# --- strict decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("make", SAMPLES, ids=SAMPLE_IDS)
def test_every_truncation_fails(make: Callable[[], Message]) -> None:
    msg = make()
    cls = type(msg)
    data = msg.encode()
    for cut in range(len(data)):
        with pytest.raises(DecodeError) as info:
            cls.decode(data[:cut])
        # With the version byte intact, a short hello is malformed, not a version mismatch.
        assert info.value.code == OWN_CODE[cls], (cut, str(info.value))


@pytest.mark.parametrize("make", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("extra", [b"\x00", b"\xff\xff", b"\x00" * 100])
def test_trailing_bytes_fail(make: Callable[[], Message], extra: bytes) -> None:
    msg = make()
    expect_error(type(msg), msg.encode() + extra, OWN_CODE[type(msg)])


@pytest.mark.parametrize("make", SAMPLES, ids=SAMPLE_IDS)
def test_every_bit_flip_decodes_or_fails_cleanly(make: Callable[[], Message]) -> None:
    msg = make()
    buf = bytearray(msg.encode())
    for bit in range(len(buf) * 8):
        buf[bit >> 3] ^= 1 << (bit & 7)
        check_decode(type(msg), bytes(buf))
        buf[bit >> 3] ^= 1 << (bit & 7)


@pytest.mark.parametrize("make", SAMPLES, ids=SAMPLE_IDS)
def test_every_u16_overwritten_decodes_or_fails_cleanly(make: Callable[[], Message]) -> None:
    # Any 16-bit field (lengths and counts included) set to a large or off-by-one value.
    msg = make()
    data = msg.encode()
    for at in range(len(data) - 1):
        old = int.from_bytes(data[at : at + 2], "big")
        for value in (0xFFFF, 0x8000, (old + 1) & 0xFFFF, (old - 1) & 0xFFFF, 0):
            check_decode(type(msg), data[:at] + value.to_bytes(2, "big") + data[at + 2 :])


def _opaque_offsets(ch: ClientHello) -> list[int]:
    """Offsets of the four opaque length fields of a ClientHello, from the App. D layout."""
    at = 1 + sum(2 + 2 * len(x) for x in (ch.supported_kems, ch.supported_sigs))
    at += 2 + 2 * len(ch.supported_aeads) + 32
    out = []
    for field in (ch.k_c, ch.client_certificate, ch.client_signature, ch.padding):
        out.append(at)
        at += 2 + len(field)
    return out


def test_overlong_lengths_fail() -> None:
    ch = sample_ch()
    data = ch.encode()
    for at in _opaque_offsets(ch):
        length = int.from_bytes(data[at : at + 2], "big")
        for bad in (length + 1, 0xFFFF):
            expect_error(ClientHello, data[:at] + bad.to_bytes(2, "big") + data[at + 2 :], CH)
    # An overlong ErrorResponse details length, and one over the 1024-byte cap.
    expect_error(ErrorResponse, bytes.fromhex("0106 0005") + b"abcd", MAL)
    expect_error(ErrorResponse, bytes.fromhex("0106 0401") + b"a" * 1025, MAL)
    expect_error(ClientFinished, bytes.fromhex("0010") + b"x" * 15, CF)


@pytest.mark.parametrize(
    "cls", [ClientHello, ServerHello, ClientHelloResume, ServerHelloResume], ids=cls_name
)
@pytest.mark.parametrize("version", [0x00, 0x11, 0x13, 0x20, 0xFF])
def test_bad_version_is_invalid_version(cls: Any, version: int) -> None:
    makers: dict[type, Callable[[], Message]] = {
        ClientHello: sample_ch,
        ServerHello: sample_sh,
        ClientHelloResume: sample_chr,
        ServerHelloResume: sample_shr,
    }
    data = makers[cls]().encode()
    expect_error(cls, bytes([version]) + data[1:], V)
    # Checked before the layout: a future version's hello of any shape gets the same answer.
    expect_error(cls, bytes([version]), V)
    expect_error(cls, bytes([version]) + b"\x00" * 7, V)


@pytest.mark.parametrize("cls", [ClientHello, ServerHello, ClientHelloResume], ids=cls_name)
def test_empty_input_is_malformed_not_version(cls: Any) -> None:
    expect_error(cls, b"", OWN_CODE[cls])


def _ch_with_lists(kems: bytes, rest_exts: bytes = b"\x00\x00") -> bytes:
    ch = sample_ch(extensions=())
    head = bytes([0x12]) + kems
    tail = ch.encode()[1 + 2 + 2 * len(ch.supported_kems) : -2]
    return head + tail + rest_exts


def test_id_list_bounds() -> None:
    expect_error(ClientHello, _ch_with_lists(b"\x00\x00"), CH)  # count 0
    over = (33).to_bytes(2, "big") + b"".join(i.to_bytes(2, "big") for i in range(33))
    expect_error(ClientHello, _ch_with_lists(over), CH)
    dup = bytes.fromhex("0002 0011 0011")
    expect_error(ClientHello, _ch_with_lists(dup), CH)
    ok = (32).to_bytes(2, "big") + b"".join(i.to_bytes(2, "big") for i in range(32))
    assert len(ClientHello.decode(_ch_with_lists(ok)).supported_kems) == 32


def test_extension_list_bounds() -> None:
    kems = bytes.fromhex("0001 0011")

    def item(ext_type: int, data: bytes) -> bytes:
        return ext_type.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data

    def many(n: int) -> bytes:
        return n.to_bytes(2, "big") + b"".join(item(0x8000 + i, b"") for i in range(n))

    assert len(ClientHello.decode(_ch_with_lists(kems, many(32))).extensions) == 32
    expect_error(ClientHello, _ch_with_lists(kems, many(33)), CH)
    dup = (2).to_bytes(2, "big") + item(0x8001, b"a") + item(0x8001, b"b")
    expect_error(ClientHello, _ch_with_lists(kems, dup), CH)
    for bad_plus in (b"", b"\x01\x02"):
        expect_error(ClientHello, _ch_with_lists(kems, b"\x00\x01" + item(1, bad_plus)), CH)
    # A count promising more items than the bytes can hold.
    expect_error(ClientHello, _ch_with_lists(kems, b"\x00\x05" + item(0x8001, b"")), CH)


def test_required_fields_may_not_be_empty() -> None:
    expect_error(ClientFinished, bytes.fromhex("0000 0000 0000"), CF)
    expect_error(ClientFinishedResume, bytes.fromhex("0000") + b"\x00" * 32, CF)
    data = sample_ch().encode()
    k_c_at = _opaque_offsets(sample_ch())[0]
    k_c_len = len(sample_ch().k_c)
    expect_error(ClientHello, data[:k_c_at] + b"\x00\x00" + data[k_c_at + 2 + k_c_len :], CH)


def test_flags_are_zero_or_one() -> None:
    data = bytearray(sample_shr().encode())
    assert data[1] == 1
    data[1] = 2
    expect_error(ServerHelloResume, bytes(data), SH)
    chr_msg = sample_chr()
    data = bytearray(chr_msg.encode())
    at = 1 + 2 + len(chr_msg.ticket) + 2 + len(chr_msg.k_c) + 32
    assert data[at] == 1
    data[at] = 0x80
    expect_error(ClientHelloResume, bytes(data), CH)


@pytest.mark.parametrize("cls", list(CODES), ids=cls_name)
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_bytes_never_escape(cls: Any, data: bytes) -> None:
    check_decode(cls, data)
    check_decode(cls, bytes([0x12]) + data)  # past the version check


@FAST
@given(st.data())
def test_mutated_messages_never_escape(data: st.DataObject) -> None:
    make = data.draw(st.sampled_from(SAMPLES))
    encoded = bytearray(make().encode())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(encoded) - 1))
        encoded[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del encoded[data.draw(st.integers(0, len(encoded))) :]
    check_decode(type(make()), bytes(encoded))


def test_decode_rejects_non_bytes() -> None:
    for bad in ("12", 5, None, [0x12]):
        with pytest.raises(TypeError):
            ClientHello.decode(bad)  # type: ignore[arg-type]


# --- extension policy (spec §16.1, PROFILE §1) ------------------------------------------------


def test_unknown_extension_decodes_but_check_rejects() -> None:
    ch = sample_ch(extensions=[Extension(0x0042, b"?")])
    decoded = ClientHello.decode(ch.encode())  # not a decode error
    with pytest.raises(DecodeError) as info:
        wire.check_extensions(decoded.extensions)
    assert info.value.code == ErrorCode.ErrorUnsupportedExtension


def test_check_extensions_returns_plus_byte() -> None:
    assert wire.check_extensions([]) == 0
    assert wire.check_extensions([Extension(0x8042, b"skip me")]) == 0
    plus = wire.make_plus_extension(wire.PLUS_RESUMPTION | wire.PLUS_MIGRATION)
    assert wire.check_extensions([Extension(0xFFFF), plus]) == 0x03
    assert plus.encode() == bytes.fromhex("0001 0001 03")
    assert Extension(0x8000).ignorable and not plus.ignorable
    with pytest.raises(ValueError):
        wire.check_extensions([plus, plus])


# --- constructor validation (local misuse) -----------------------------------------------------


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        sample_ch(client_nonce=b"\x00" * 31)
    with pytest.raises(TypeError):
        sample_ch(client_nonce="x" * 32)
    with pytest.raises(ValueError):
        sample_ch(supported_kems=[])
    with pytest.raises(ValueError):
        sample_ch(supported_kems=range(33))
    with pytest.raises(ValueError):
        sample_ch(supported_kems=[0x11, 0x11])
    with pytest.raises(TypeError):
        sample_ch(supported_kems=b"\x00\x11")
    with pytest.raises(TypeError):
        sample_ch(supported_kems=[True])
    with pytest.raises(ValueError):
        sample_ch(supported_kems=[0x10000])
    with pytest.raises(ValueError):
        sample_ch(version=0x13)
    with pytest.raises(ValueError):
        sample_ch(k_c=b"")
    with pytest.raises(ValueError):
        sample_ch(extensions=[Extension(5), Extension(5, b"x")])
    with pytest.raises(TypeError):
        sample_ch(extensions=[(1, b"\x01")])
    with pytest.raises(ValueError):
        Extension(wire.EXT_PLUS, b"\x01\x02")
    with pytest.raises(ValueError):
        ErrorResponse(error_code=1, details=b"x" * 1025)
    with pytest.raises(ValueError):
        ClientFinishedResume(ct_s=b"x", mac=b"\x00" * 31)
    with pytest.raises(ValueError):
        flag: Any = 2
        ClientHelloResume(ticket=b"t", k_c=b"k", resume_nonce=NONCE, early_data_offered=flag)
    with pytest.raises(TypeError):
        sample_cf().replace(bogus=1)
    with pytest.raises(TypeError):
        ClientFinished(b"ct")  # type: ignore[call-arg]  # keyword-only


def test_fields_are_read_only() -> None:
    ch = sample_ch()
    with pytest.raises(AttributeError):
        ch.k_c = b"x"  # type: ignore[misc]


def test_repr_does_not_dump_key_material() -> None:
    k_c = bytes(range(256)) * 4
    ch = sample_ch(k_c=k_c)
    text = repr(ch)
    assert k_c.hex() not in text and k_c[:32].hex() not in text
    assert "1024 bytes" in text and len(text) < 800
    assert "bad sig" in repr(sample_err())
    for make in SAMPLES:
        assert len(repr(make())) < 800


@pytest.mark.parametrize("make", SAMPLES, ids=SAMPLE_IDS)
def test_pickle_and_copy_go_through_the_codec(make: Callable[[], Message]) -> None:
    msg = make()
    assert pickle.loads(pickle.dumps(msg)) == msg
    assert copy.deepcopy(msg) == msg


@pytest.mark.parametrize("cls", list(CODES), ids=cls_name)
def test_uninitialised_instance_cannot_encode(cls: Any) -> None:
    # __new__ bypasses __init__; the encoders must refuse rather than read missing fields.
    with pytest.raises(TypeError):
        cls.__new__(cls).encode()
