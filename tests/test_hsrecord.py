"""Handshake-record codec (PROFILE §4): layout, round trips and strict rejection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_c import hsrecord as hs
from palisade_c.errors import ConfigError, DecodeError, ErrorCode

RID = bytes(range(24))
MESSAGE_TYPES = (1, 2, 3, 4, 5, 6)
KNOWN_TYPES = (*MESSAGE_TYPES, 0x7D, 0x7E, 0x7F)

FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def assert_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        hs.decode(data)
    assert info.value.code == ErrorCode.ErrorMalformedPacket


def assert_ack_malformed(data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        hs.decode_ack(data)
    assert info.value.code == ErrorCode.ErrorMalformedPacket


def wire(
    msg_type: int = 2,
    msg_seq: int = 7,
    frag_offset: int = 100,
    msg_length: int = 200,
    fragment: bytes = b"hello",
    length: int | None = None,
    magic: bytes = b"QH",
    version: int = 0x12,
) -> bytes:
    """A record assembled by hand, field by field, independent of the codec under test."""
    if length is None:
        length = 9 + len(fragment)
    return (
        magic
        + bytes([version, msg_type])
        + length.to_bytes(2, "big")
        + RID
        + bytes([msg_seq])
        + frag_offset.to_bytes(4, "big")
        + msg_length.to_bytes(4, "big")
        + fragment
    )


@st.composite
def records(draw: st.DrawFn) -> hs.HandshakeRecord:
    rid = draw(st.binary(min_size=24, max_size=24))
    msg_type = draw(st.sampled_from(KNOWN_TYPES))
    if msg_type in MESSAGE_TYPES:
        msg_seq = draw(st.integers(0, 255))
        msg_length = draw(st.integers(0, hs.MAX_MESSAGE))
        if msg_length == 0:
            return hs.HandshakeRecord(msg_type, rid, msg_seq, 0, 0, b"")
        offset = draw(st.integers(0, msg_length - 1))
        size = draw(st.integers(1, min(msg_length - offset, 1500)))
        fragment = draw(st.binary(min_size=size, max_size=size))
        return hs.HandshakeRecord(msg_type, rid, msg_seq, offset, msg_length, fragment)
    body = draw(st.binary(max_size=300))
    single = msg_type in (hs.MSG_HANDSHAKE_ACK, hs.MSG_RETRY)
    msg_seq = 0 if single else draw(st.integers(0, 255))
    return hs.HandshakeRecord(msg_type, rid, msg_seq, 0, len(body), body)


@st.composite
def ack_ranges(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Sorted, merged, non-empty ranges: distinct points paired up leave a gap between pairs."""
    count = draw(st.integers(0, hs.ACK_MAX_RANGES))
    points = sorted(
        draw(st.sets(st.integers(0, hs.MAX_MESSAGE), min_size=2 * count, max_size=2 * count))
    )
    return [(points[i], points[i + 1]) for i in range(0, len(points), 2)]


# --- the module itself ---------------------------------------------------------------------------


def test_module_is_compiled_extension() -> None:
    assert hs.__file__ is not None
    assert hs.__file__.endswith(".so")


def test_constants() -> None:
    assert (hs.HS_HEADER_LEN, hs.FRAG_HEADER_LEN, hs.HS_RECORD_OVERHEAD) == (30, 9, 39)
    assert hs.MAX_MESSAGE == 16384
    assert (hs.RID_LEN, hs.RID_OFFSET, hs.HS_VERSION) == (24, 6, 0x12)
    assert [
        hs.MSG_CLIENT_HELLO,
        hs.MSG_SERVER_HELLO,
        hs.MSG_CLIENT_FINISHED,
        hs.MSG_CLIENT_HELLO_RESUME,
        hs.MSG_SERVER_HELLO_RESUME,
        hs.MSG_CLIENT_FINISHED_RESUME,
        hs.MSG_RETRY,
        hs.MSG_HANDSHAKE_ACK,
        hs.MSG_ERROR_RESPONSE,
    ] == list(KNOWN_TYPES)


# --- layout and round trips ----------------------------------------------------------------------


def test_encode_matches_hand_built_layout() -> None:
    rec = hs.HandshakeRecord(2, RID, 7, 100, 200, b"hello")
    data = rec.encode()
    assert data == wire()
    assert data[:4] == b"\x51\x48\x12\x02"
    assert int.from_bytes(data[4:6], "big") == len(data) - 30
    # The rid sits at offset 6, as in the encrypted PublicHeader, for load-balancer routing.
    assert data[6:30] == RID
    assert rec.frag_end == 105
    assert not rec.is_complete_message


def test_decode_hand_built_record() -> None:
    rec = hs.decode(wire())
    assert (rec.msg_type, rec.rid, rec.msg_seq) == (2, RID, 7)
    assert (rec.frag_offset, rec.msg_length, rec.fragment) == (100, 200, b"hello")
    assert hs.HandshakeRecord.decode(wire()) == rec


@FAST
@given(records())
def test_round_trip(rec: hs.HandshakeRecord) -> None:
    data = rec.encode()
    assert len(data) == hs.HS_RECORD_OVERHEAD + len(rec.fragment)
    again = hs.decode(data)
    assert again == rec
    assert hash(again) == hash(rec)
    assert again.encode() == data
    assert hs.decode(bytearray(data)) == rec
    assert hs.decode(memoryview(data)) == rec


def test_empty_message_is_one_empty_fragment() -> None:
    rec = hs.decode(wire(frag_offset=0, msg_length=0, fragment=b""))
    assert rec.fragment == b""
    assert rec.is_complete_message


def test_largest_message_accepted() -> None:
    rec = hs.decode(wire(frag_offset=hs.MAX_MESSAGE - 5, msg_length=hs.MAX_MESSAGE))
    assert rec.frag_end == hs.MAX_MESSAGE


# --- strict rejection ----------------------------------------------------------------------------


def test_truncation_at_every_offset() -> None:
    data = wire(fragment=bytes(range(60)))
    for cut in range(len(data)):
        assert_malformed(data[:cut])


def test_trailing_bytes_rejected() -> None:
    assert_malformed(wire() + b"\x00")


def test_length_field_must_match() -> None:
    for length in (0, 8, 13, 15, 0xFFFF):
        assert_malformed(wire(length=length))


def test_bad_magic_and_version() -> None:
    assert_malformed(wire(magic=b"QP"))
    assert_malformed(wire(magic=b"HQ"))
    for version in (0x00, 0x11, 0x13, 0xFF):
        assert_malformed(wire(version=version))


def test_every_unknown_type_rejected() -> None:
    for msg_type in range(256):
        data = wire(msg_type=msg_type, frag_offset=0, msg_length=5, msg_seq=0)
        if msg_type in KNOWN_TYPES:
            assert hs.decode(data).msg_type == msg_type
        else:
            assert_malformed(data)


def test_message_length_limit() -> None:
    assert_malformed(wire(frag_offset=0, msg_length=hs.MAX_MESSAGE + 1))
    assert_malformed(wire(frag_offset=0, msg_length=0xFFFFFFFF))


def test_fragment_overrunning_message() -> None:
    assert_malformed(wire(frag_offset=196, msg_length=200))
    assert_malformed(wire(frag_offset=0, msg_length=4))
    # offset + length would wrap a 32-bit sum: must still be caught.
    assert_malformed(wire(frag_offset=0xFFFFFFFF, msg_length=200, fragment=b"x"))


def test_zero_length_fragment_of_nonempty_message() -> None:
    assert_malformed(wire(frag_offset=0, msg_length=10, fragment=b""))
    assert_malformed(wire(frag_offset=3, msg_length=10, fragment=b""))
    assert_malformed(wire(frag_offset=1, msg_length=0, fragment=b""))


def test_acks_and_errors_are_never_fragmented() -> None:
    for msg_type in (0x7E, 0x7F):
        assert_malformed(wire(msg_type=msg_type, msg_seq=0, frag_offset=0, msg_length=6))
        assert_malformed(wire(msg_type=msg_type, msg_seq=0, frag_offset=1, msg_length=6))
    assert_malformed(wire(msg_type=0x7E, msg_seq=1, frag_offset=0, msg_length=5))
    assert hs.decode(wire(msg_type=0x7F, msg_seq=3, frag_offset=0, msg_length=5)).msg_seq == 3


def test_every_single_bit_flip_is_rejected_or_consistent() -> None:
    data = wire(fragment=bytes(range(20)))
    for i in range(len(data)):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[i] ^= 1 << bit
            try:
                rec = hs.decode(bytes(mutated))
            except DecodeError as exc:
                assert exc.code == ErrorCode.ErrorMalformedPacket
            else:
                # Accepted only if it is itself a well-formed record (a flipped rid or payload).
                assert rec.encode() == bytes(mutated)


@FAST
@given(records(), st.data())
def test_random_mutations_only_raise_decode_error(
    rec: hs.HandshakeRecord, data: st.DataObject
) -> None:
    buf = bytearray(rec.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf += data.draw(st.binary(max_size=8))
    try:
        out = hs.decode(bytes(buf))
    except DecodeError as exc:
        assert exc.code == ErrorCode.ErrorMalformedPacket
    else:
        assert out.encode() == bytes(buf)


@FAST
@given(st.binary(max_size=120), st.booleans())
def test_arbitrary_bytes_only_raise_decode_error(blob: bytes, with_prefix: bool) -> None:
    data = (b"QH\x12" + blob) if with_prefix else blob
    try:
        hs.decode(data)
    except DecodeError as exc:
        assert exc.code == ErrorCode.ErrorMalformedPacket


# --- local misuse --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        (9, RID, 0, 0, 1, b"x"),  # unknown type
        (1, RID[:23], 0, 0, 1, b"x"),  # short rid
        (1, RID, 256, 0, 1, b"x"),  # msg_seq out of range
        (1, RID, 0, -1, 1, b"x"),  # negative offset
        (1, RID, 0, 0, 2**32, b"x"),  # msg_length out of range
        (1, RID, 0, 0, hs.MAX_MESSAGE + 1, b"x"),  # over 16 KiB
        (1, RID, 0, 5, 5, b"x"),  # overrun
        (1, RID, 0, 0, 5, b""),  # empty fragment of a non-empty message
        (0x7E, RID, 1, 0, 1, b"x"),  # ack msg_seq must be 0
        (0x7F, RID, 0, 0, 2, b"x"),  # error response fragmented
    ],
)
def test_constructor_refuses_what_decode_would_refuse(args: tuple[object, ...]) -> None:
    with pytest.raises(ConfigError):
        hs.HandshakeRecord(*args)  # type: ignore[arg-type]


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        hs.HandshakeRecord(1, b"short", 0, 0, 1, b"x")


# --- fragmentation -------------------------------------------------------------------------------


@FAST
@given(
    st.binary(max_size=5000),
    st.integers(40, 1500),
    st.sampled_from(MESSAGE_TYPES),
    st.integers(0, 255),
)
def test_fragment_message_covers_message_in_bounded_records(
    message: bytes, max_datagram: int, msg_type: int, msg_seq: int
) -> None:
    out = hs.fragment_message(msg_type, RID, msg_seq, message, max_datagram)
    payload = max_datagram - hs.HS_RECORD_OVERHEAD
    assert len(out) == max(1, -(-len(message) // payload))
    rebuilt = b""
    for raw in out:
        assert len(raw) <= max_datagram
        rec = hs.decode(raw)
        assert (rec.msg_type, rec.rid, rec.msg_seq) == (msg_type, RID, msg_seq)
        assert rec.msg_length == len(message)
        assert rec.frag_offset == len(rebuilt)
        rebuilt += rec.fragment
    assert rebuilt == message


def test_fragment_largest_message_at_udp_default() -> None:
    message = bytes(i % 251 for i in range(hs.MAX_MESSAGE))
    out = hs.fragment_message(1, RID, 0, bytearray(message), 1200)
    assert len(out) == 15
    assert all(len(r) <= 1200 for r in out)
    assert b"".join(hs.decode(r).fragment for r in out) == message


def test_fragment_exact_fit() -> None:
    out = hs.fragment_message(3, RID, 1, b"z" * 1161, 1200)
    assert [len(r) for r in out] == [1200]
    assert [len(r) for r in hs.fragment_message(3, RID, 1, b"z" * 1162, 1200)] == [1200, 40]


def test_fragment_empty_message() -> None:
    (raw,) = hs.fragment_message(1, RID, 0, b"", 100)
    rec = hs.decode(raw)
    assert (rec.frag_offset, rec.msg_length, rec.fragment) == (0, 0, b"")


def test_fragment_message_refusals() -> None:
    with pytest.raises(ValueError):
        hs.fragment_message(1, RID, 0, b"abc", 39)
    with pytest.raises(ValueError):
        hs.fragment_message(1, RID, 0, b"abc", 0)
    with pytest.raises(ValueError):
        hs.fragment_message(1, RID, 0, bytes(hs.MAX_MESSAGE + 1), 1200)
    with pytest.raises(ValueError):
        hs.fragment_message(0x40, RID, 0, b"abc", 1200)
    with pytest.raises(ValueError):
        hs.fragment_message(1, RID[:10], 0, b"abc", 1200)
    # An ErrorResponse must fit in one record; an ack record must have msg_seq 0.
    with pytest.raises(ValueError):
        hs.fragment_message(0x7F, RID, 0, bytes(200), 100)
    with pytest.raises(ValueError):
        hs.fragment_message(0x7E, RID, 1, bytes(10), 100)
    (raw,) = hs.fragment_message(0x7F, RID, 2, bytes(20), 100)
    assert hs.decode(raw).is_complete_message


# --- HandshakeAck ---------------------------------------------------------------------------------


@FAST
@given(st.sampled_from(MESSAGE_TYPES), st.integers(0, 255), ack_ranges())
def test_ack_round_trip(msg_type: int, msg_seq: int, ranges: list[tuple[int, int]]) -> None:
    ack = hs.HandshakeAck(msg_type, msg_seq, ranges)
    body = ack.encode()
    assert len(body) == 3 + 8 * len(ranges)
    assert hs.decode_ack(body) == ack
    assert hs.HandshakeAck.decode(body) == ack
    record = hs.decode(ack.to_record(RID))
    assert (record.msg_type, record.msg_seq, record.frag_offset) == (0x7E, 0, 0)
    assert record.msg_length == len(body)
    assert record.rid == RID
    assert hs.decode_ack(record.fragment) == ack


def test_ack_layout() -> None:
    ack = hs.HandshakeAck(2, 5, [(0, 1000), (2000, 3000)])
    assert ack.encode() == bytes.fromhex("020502" + "00000000000003e8" + "000007d000000bb8")
    assert ack.ranges == ((0, 1000), (2000, 3000))
    assert ack.covers(0, 1000) and ack.covers(2100, 2200)
    assert not ack.covers(900, 1100)
    assert not ack.covers(1500, 1600)


def test_ack_truncation_and_trailing() -> None:
    body = hs.HandshakeAck(1, 0, [(0, 10), (20, 30)]).encode()
    for cut in range(len(body)):
        assert_ack_malformed(body[:cut])
    assert_ack_malformed(body + b"\x00")


def _ack_body(msg_type: int, ranges: list[tuple[int, int]], count: int | None = None) -> bytes:
    n = len(ranges) if count is None else count
    return bytes([msg_type, 0, n]) + b"".join(
        s.to_bytes(4, "big") + e.to_bytes(4, "big") for s, e in ranges
    )


@pytest.mark.parametrize(
    "ranges",
    [
        [(5, 5)],  # empty range
        [(6, 5)],  # reversed
        [(0, 10), (10, 20)],  # touching: must have been merged
        [(0, 10), (5, 20)],  # overlapping
        [(20, 30), (0, 10)],  # unsorted
        [(0, hs.MAX_MESSAGE + 1)],  # beyond any message
        [(i * 10, i * 10 + 5) for i in range(17)],  # too many
    ],
)
def test_ack_rejects_non_canonical_ranges(ranges: list[tuple[int, int]]) -> None:
    assert_ack_malformed(_ack_body(2, ranges))
    with pytest.raises(ConfigError):
        hs.HandshakeAck(2, 0, ranges)


def test_ack_rejects_bad_type_and_count() -> None:
    for msg_type in (0, 7, 0x7E, 0x7F, 0xFF):
        assert_ack_malformed(_ack_body(msg_type, [(0, 10)]))
        with pytest.raises(ConfigError):
            hs.HandshakeAck(msg_type, 0, [(0, 10)])
    assert_ack_malformed(_ack_body(2, [(0, 10)], count=2))
    assert_ack_malformed(bytes([2, 0, 200]) + bytes(1600))


@FAST
@given(st.binary(max_size=140))
def test_ack_arbitrary_bytes_only_raise_decode_error(blob: bytes) -> None:
    try:
        ack = hs.decode_ack(blob)
    except DecodeError as exc:
        assert exc.code == ErrorCode.ErrorMalformedPacket
    else:
        assert ack.encode() == blob
