"""Control-frame codec: framing, typed payloads, strict rejection."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_c import frames as F
from palisade_c.errors import ControlFrameError

frame_st = st.builds(F.ControlFrame, st.integers(0, 255), st.binary(max_size=200))


@given(st.lists(frame_st, min_size=1, max_size=F.MAX_FRAMES_PER_PACKET))
def test_frames_round_trip(frames: list[F.ControlFrame]) -> None:
    assert F.decode_frames(F.encode_frames(frames)) == frames


def test_frame_header_layout() -> None:
    # type u8 | length u24 big-endian | data [spec §14.2]
    assert F.ControlFrame(0x03, b"abc").encode() == bytes.fromhex("03000003") + b"abc"


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_decode_random_bytes_only_raises_control_frame_error(data: bytes) -> None:
    try:
        frames = F.decode_frames(data)
    except ControlFrameError:
        return
    assert F.encode_frames(frames) == data


def test_truncation_and_overrun_rejected() -> None:
    good = F.encode_frames([F.encode_rekey(7, F.REKEY_ACK)])
    for cut in range(len(good)):
        with pytest.raises(ControlFrameError):
            F.decode_frames(good[:cut])
    overrun = bytes.fromhex("01000006") + b"\x00" * 5
    with pytest.raises(ControlFrameError):
        F.decode_frames(overrun)


def test_too_many_frames_rejected() -> None:
    one = F.ControlFrame(0x40, b"").encode()
    F.decode_frames(one * F.MAX_FRAMES_PER_PACKET)
    with pytest.raises(ControlFrameError):
        F.decode_frames(one * (F.MAX_FRAMES_PER_PACKET + 1))


def test_unknown_types_decode_as_plain_frames() -> None:
    (frame,) = F.decode_frames(F.ControlFrame(0x77, b"xyz").encode())
    assert frame.ctrl_type == 0x77 and frame.ctrl_type not in F.KNOWN_TYPES


@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2]))
def test_rekey_round_trip(epoch: int, kind: int) -> None:
    assert F.decode_rekey(F.encode_rekey(epoch, kind)) == (epoch, kind)


def test_rekey_strict() -> None:
    with pytest.raises(ControlFrameError):
        F.decode_rekey(F.ControlFrame(F.CTRL_REKEY, b"\x00\x00\x00\x01\x03"))
    with pytest.raises(ControlFrameError):
        F.decode_rekey(F.ControlFrame(F.CTRL_REKEY, b"\x00\x00\x00\x01"))
    with pytest.raises(ValueError):
        F.encode_rekey(1, 3)


@given(st.integers(0, 0xFFFF), st.booleans(), st.text(max_size=20))
def test_close_round_trip(code: int, hard: bool, reason: str) -> None:
    frame = F.encode_close(code, hard, reason)
    got_code, got_hard, got_reason = F.decode_close(frame)
    assert (got_code, got_hard) == (code, hard)
    assert reason.startswith(got_reason)
    assert len(got_reason.encode()) <= F.MAX_CLOSE_REASON


def test_close_reason_is_cut_on_a_character_boundary() -> None:
    _, _, reason = F.decode_close(F.encode_close(0, False, "é" * 40))
    assert reason == "é" * 32


def test_close_strict() -> None:
    bad = [
        b"\x00\x00\x02\x00",  # hard flag 2
        b"\x00\x00\x00\x05abc",  # reason length mismatch
        b"\x00\x00\x00\x02\xff\xfe",  # not UTF-8
        b"\x00\x00\x00",  # short
    ]
    for data in bad:
        with pytest.raises(ControlFrameError):
            F.decode_close(F.ControlFrame(F.CTRL_CLOSE, data))


def test_migrate_round_trip_and_reserved_bytes() -> None:
    frame = F.encode_migrate(b"n" * 32, 9)
    assert len(frame.data) == F.MIGRATE_FRAME_LEN
    assert F.decode_migrate(frame) == (b"n" * 32, 9, F.MIGRATE_REASON_SOFT)
    tampered = F.ControlFrame(F.CTRL_MIGRATE, frame.data[:-1] + b"\x01")
    with pytest.raises(ControlFrameError):
        F.decode_migrate(tampered)
    with pytest.raises(ControlFrameError):
        F.decode_migrate(F.ControlFrame(F.CTRL_MIGRATE, frame.data + b"\x00"))


def test_path_frames() -> None:
    ch = F.encode_path(F.CTRL_PATH_CHALLENGE, b"c" * 32)
    assert F.decode_path(ch) == b"c" * 32
    with pytest.raises(ControlFrameError):
        F.decode_path(F.ControlFrame(F.CTRL_PATH_RESPONSE, b"short"))
    with pytest.raises(ValueError):
        F.encode_path(F.CTRL_REKEY, b"c" * 32)
