"""Tests of the record layer (palisade_c.record; PROFILE §4, docs/protocol.md §3-§4).

Covers the README example, that the modules really are compiled, the seal/open API (padding,
stream ids, control flag, batches, size and sequence limits), the anti-replay rules through the
record layer, and a large set of hostile-input properties: every rejection returns None, never
raises, and bumps exactly one drop counter by exactly one.
"""

from __future__ import annotations

import importlib
import os
import struct
import types
from array import array
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hashes import SHA3_256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import palisade_c
from palisade_c import Record, RecordLayer
from palisade_c.epoch import SEQ_HARD_LIMIT, SEQ_REKEY_THRESHOLD
from palisade_c.errors import (
    ConfigError,
    PacketTooLargeError,
    PalisadeError,
    SequenceExhaustedError,
)

MASTER = bytes(range(32))
RID = bytes(range(0x40, 0x40 + 24))
OTHER_RID = bytes(range(0x41, 0x41 + 24))

DROP_REASONS = (
    "truncated", "ErrorPacketTooLarge", "bad-magic", "ErrorInvalidVersion", "reserved-bits",
    "bad-length", "unknown-rid", "bad-padding", "ErrorInvalidKeyPhase", "ErrorInvalidEpoch",
    "replay", "ErrorAEADDecryptFailed",
)
RESERVED_BITS = (0x02, 0x08, 0x10, 0x20, 0x40, 0x80)


def fast(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def pair(**kw: Any) -> tuple[RecordLayer, RecordLayer]:
    """(client, server) of one session."""
    return RecordLayer(MASTER, True, RID, **kw), RecordLayer(MASTER, False, RID, **kw)


def expect_drop(layer: RecordLayer, data: Any, reason: str | None = None,
                now: float | None = None) -> str:
    """open() must return None and bump exactly one drop counter by exactly one."""
    before = dict(layer.drop_counts)
    opened, dummies, dropped = layer.packets_opened, layer.dummies_received, layer.dropped
    assert layer.open(data, now=now) is None
    after = layer.drop_counts
    assert set(after) <= set(palisade_c.record.DROP_REASON_NAMES)
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    changed = {k: v for k, v in changed.items() if v}
    assert len(changed) == 1, changed
    ((name, delta),) = changed.items()
    assert delta == 1
    assert layer.dropped == dropped + 1
    assert layer.packets_opened == opened
    assert layer.dummies_received == dummies
    if reason is not None:
        assert name == reason, (name, reason)
    return name


def flip(pkt: bytes, pos: int, mask: int) -> bytes:
    b = bytearray(pkt)
    b[pos] ^= mask
    return bytes(b)


def with_length_fixed(pkt: bytes) -> bytes:
    """Rewrite the length field so that only deeper checks can reject ``pkt``."""
    return pkt[:4] + struct.pack(">H", (len(pkt) - 30) & 0xFFFF) + pkt[6:]


def hp_key(d: bytes) -> bytes:
    return HKDFExpand(SHA3_256(), 32, b"PALISADE " + d + b" hp").derive(MASTER)


def forge(seq: int, *, epoch: int = 0, stream: int = 0, body: bytes = b"\x5a" * 40,
          flags: int = 0) -> bytes:
    """A packet whose header unmasks correctly (the test knows hp) but whose AEAD is garbage."""
    pub = b"QP" + bytes([0x12, flags]) + struct.pack(">H", 15 + len(body)) + RID
    hdr = struct.pack(">IQBH", epoch, seq, stream, 0)
    enc = Cipher(algorithms.AES(hp_key(b"c2s")), modes.ECB()).encryptor()
    mask = enc.update(body[:16])[:15]
    return pub + bytes(a ^ b for a, b in zip(hdr, mask, strict=True)) + body


# ----------------------------------------------------------------------------------------------
# The README example, and that the code really is compiled
# ----------------------------------------------------------------------------------------------


def test_readme_example() -> None:
    a = RecordLayer(master_secret=bytes(32), is_client=True, rid=bytes(24))
    b = RecordLayer(master_secret=bytes(32), is_client=False, rid=bytes(24))
    pkt = a.seal(b"hello", stream_id=0)
    assert isinstance(pkt, bytes)
    rec = b.open(pkt)
    assert isinstance(rec, Record)
    assert rec.payload == b"hello"
    assert (rec.stream_id, rec.epoch, rec.seq, rec.control) == (0, 0, 0, False)
    assert b.drop_counts == {}
    assert b.open(pkt) is None  # and only once
    assert b.drop_counts == {"replay": 1}


def test_both_directions() -> None:
    c, s = pair()
    for i in range(10):
        r = s.open(c.seal(b"up %d" % i))
        assert r is not None and r.payload == b"up %d" % i and r.seq == i
        r = c.open(s.seal(b"down %d" % i))
        assert r is not None and r.payload == b"down %d" % i and r.seq == i
    # A layer cannot open its own direction.
    expect_drop(c, c.seal(b"self"))


@pytest.mark.parametrize("modname", ["record", "epoch", "replay", "keyschedule"])
def test_modules_are_compiled_extensions(modname: str) -> None:
    mod = importlib.import_module(f"palisade_c.{modname}")
    assert mod.__file__ is not None and mod.__file__.endswith(".so"), mod.__file__
    assert isinstance(mod.__loader__, importlib.machinery.ExtensionFileLoader)
    # No pure-Python twin that could shadow the extension.
    pkg_dir = os.path.dirname(palisade_c.__file__)
    assert not os.path.exists(os.path.join(pkg_dir, f"{modname}.py"))
    # Its functions are compiled (Cython) functions, not Python functions.
    for name, obj in vars(mod).items():
        if getattr(obj, "__module__", None) == mod.__name__ and callable(obj) \
                and not isinstance(obj, type):
            assert not isinstance(obj, types.FunctionType), name


@pytest.mark.parametrize("cls_path", [
    "record.RecordLayer", "record.Record", "record.PublicHeader", "epoch.EpochMachine",
    "epoch.TrafficKey", "replay.ReplayWindow",
])
def test_classes_are_extension_types(cls_path: str) -> None:
    modname, clsname = cls_path.split(".")
    cls = getattr(importlib.import_module(f"palisade_c.{modname}"), clsname)
    assert type(cls).__name__ == "type"
    # A class statement in Python always produces a heap type; a cdef class is a static type.
    py_tpflags_heaptype = 1 << 9
    assert not cls.__flags__ & py_tpflags_heaptype, cls
    for name, attr in vars(cls).items():
        assert not isinstance(attr, types.FunctionType), name
    assert RecordLayer is palisade_c.record.RecordLayer


# ----------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"rid": bytes(23)}, {"rid": bytes(25)}, {"master_secret": bytes(31)},
    {"master_secret": bytes(33)}, {"max_packet_size": 60}, {"max_packet_size": 65566},
    {"replay_window": 63}, {"replay_window": 4097}, {"commit_threshold": 0},
    {"max_transition_time": 0.0}, {"max_transition_time": float("inf")},
    {"max_transition_time": -1.0},
])
def test_bad_configuration_raises_config_error(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"master_secret": MASTER, "is_client": True, "rid": RID}
    args.update(kwargs)
    with pytest.raises(ConfigError):
        RecordLayer(args.pop("master_secret"), args.pop("is_client"), args.pop("rid"), **args)


def test_extreme_but_valid_configuration() -> None:
    c, s = pair(max_packet_size=61, replay_window=4096, commit_threshold=1,
                max_transition_time=3600.0)
    r = s.open(c.seal(b""))
    assert r is not None and r.payload == b""
    with pytest.raises(PacketTooLargeError):
        c.seal(b"x")


# ----------------------------------------------------------------------------------------------
# Padding, stream ids, control, keepalive, dummies
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [0, 1, 15, 16, 17, 255, 1000, 65000])
def test_padding_is_hidden_and_removed(pad: int) -> None:
    c, s = pair()
    payload = b"abc" * 7
    pkt = c.seal(payload, pad=pad)
    assert len(pkt) == 30 + 15 + len(payload) + pad + 16
    assert struct.unpack(">H", pkt[4:6])[0] == len(pkt) - 30
    r = s.open(pkt)
    assert r is not None and r.payload == payload


def test_padding_of_empty_payload() -> None:
    c, s = pair()
    r = s.open(c.seal(b"", pad=100))
    assert r is not None and r.payload == b""


@pytest.mark.parametrize("stream_id", [0, 1, 2, 100, 0xFD])
def test_stream_ids_round_trip(stream_id: int) -> None:
    c, s = pair()
    r = s.open(c.seal(b"data", stream_id=stream_id))
    assert r is not None and r.stream_id == stream_id and not r.keepalive


def test_all_stream_ids_round_trip() -> None:
    c, s = pair()
    for sid in range(0xFF):
        r = s.open(c.seal(bytes([sid]), stream_id=sid))
        assert r is not None and r.stream_id == sid and r.payload == bytes([sid])


def test_keepalive_stream() -> None:
    c, s = pair()
    r = s.open(c.seal(b"", stream_id=0xFE))
    assert r is not None and r.keepalive and r.payload == b"" and r.stream_id == 0xFE
    r = s.open(c.seal(b"not empty", stream_id=0xFE))
    assert r is not None and not r.keepalive and r.payload == b"not empty"
    assert s.dummies_received == 0 and s.dropped == 0


def test_dummy_packets_are_authenticated_then_swallowed() -> None:
    c, s = pair()
    d = c.seal(b"filler" * 10, stream_id=0xFF, pad=20)
    assert s.open(d) is None
    assert s.dummies_received == 1
    assert s.drop_counts == {}
    assert s.packets_opened == 1
    # A replayed dummy is a replay, not a second dummy.
    expect_drop(s, d, "replay")
    assert s.dummies_received == 1
    # A forged dummy is an AEAD failure, not a dummy.
    forged = c.seal(b"dummy body " * 3, stream_id=0xFF)
    expect_drop(s, flip(forged, len(forged) - 1, 0x01), "ErrorAEADDecryptFailed")
    assert s.dummies_received == 1
    # Control frames are never dummies.
    r = s.open(c.seal(b"\x03", stream_id=0xFF, control=True))
    assert r is not None and r.control and r.stream_id == 0xFF
    assert s.dummies_received == 1


def test_control_flag() -> None:
    c, s = pair()
    pkt = c.seal(b"\x01\x00\x00\x05\x00\x00\x00\x01\x00", control=True)
    assert pkt[3] & 0x01
    r = s.open(pkt)
    assert r is not None and r.control is True
    pkt = c.seal(b"data", control=False)
    assert not pkt[3] & 0x01
    r = s.open(pkt)
    assert r is not None and r.control is False


def test_record_repr_and_fields() -> None:
    c, s = pair()
    r = s.open(c.seal(b"12345", stream_id=4))
    assert r is not None
    assert "epoch=0" in repr(r) and "seq=0" in repr(r)
    with pytest.raises(AttributeError):
        r.payload = b"x"  # type: ignore[misc]


@pytest.mark.parametrize("payload", [
    bytearray(b"bytearray payload"), memoryview(b"memoryview payload"),
    memoryview(b"xxsliced payloadxx")[2:-2],
])
@pytest.mark.parametrize("pad", [0, 8])
def test_seal_accepts_bytes_like_payloads(payload: Any, pad: int) -> None:
    c, s = pair()
    r = s.open(c.seal(payload, pad=pad))
    assert r is not None and r.payload == bytes(payload)


def test_seal_multibyte_memoryview_payload_is_not_silently_truncated() -> None:
    """A memoryview with itemsize > 1 has len() in items, not bytes.

    BUG: with pad > 0, ``_seal`` copies the payload with ``self._scratch[:plen] = payload``
    where plen = len(payload) counts *items*; bytearray slice assignment inserts all the bytes
    (growing the scratch buffer), then only ``plen + pad`` bytes are encrypted. The receiver gets
    a silently truncated payload. With pad == 0 the same payload raises TypeError, so the two
    paths also disagree. Expected: either refuse such a payload, or send all its bytes.
    """
    c, s = pair()
    payload = memoryview(array("H", [0x4142, 0x4344, 0x4546]))
    assert payload.nbytes == 6 and len(payload) == 3
    for pad in (0, 4):
        try:
            pkt = c.seal(payload, pad=pad)
        except (TypeError, ValueError):
            continue
        r = s.open(pkt)
        assert r is not None
        assert r.payload == payload.tobytes(), (pad, r.payload)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def test_seal_many_open_many() -> None:
    c, s = pair()
    payloads = [b"p%03d" % i for i in range(200)]
    pkts = c.seal_many(payloads, stream_id=5)
    assert len(pkts) == 200 and c.send_seq == 200
    recs = s.open_many(pkts)
    assert [r.payload for r in recs] == payloads
    assert [r.seq for r in recs] == list(range(200))
    assert all(r.stream_id == 5 for r in recs)
    # Second time round: all replays.
    assert s.open_many(pkts) == [None] * 200
    assert s.drop_counts == {"replay": 200}


def test_open_many_mixed_and_bytes_like() -> None:
    c, s = pair()
    p = c.seal_many([b"a", b"b", b"c"])
    out = s.open_many([bytearray(p[0]), b"junk", memoryview(p[1]), p[0], p[2]])
    assert [None if r is None else r.payload for r in out] == [b"a", None, b"b", None, b"c"]
    assert s.drop_counts == {"truncated": 1, "replay": 1}


def test_seal_many_and_seal_share_the_sequence() -> None:
    c, s = pair()
    c.seal(b"x")
    pkts = c.seal_many([b"y", b"z"])
    c.seal(b"w")
    assert [r.seq for r in s.open_many(pkts)] == [1, 2]


# ----------------------------------------------------------------------------------------------
# Local misuse
# ----------------------------------------------------------------------------------------------


def test_packet_too_large_default_limit() -> None:
    c, s = pair()
    biggest = 65535 - 15 - 16
    pkt = c.seal(b"\x00" * biggest)
    assert len(pkt) == 30 + 65535 == 65565
    r = s.open(pkt)
    assert r is not None and len(r.payload) == biggest
    seq = c.send_seq
    with pytest.raises(PacketTooLargeError):
        c.seal(b"\x00" * (biggest + 1))
    with pytest.raises(PacketTooLargeError):
        c.seal(b"\x00" * 100, pad=biggest - 99)
    with pytest.raises(ValueError):  # PacketTooLargeError is a ValueError too
        c.seal(b"\x00" * (biggest + 1))
    assert c.send_seq == seq  # no sequence number was spent


def test_packet_too_large_configured_limit() -> None:
    c, s = pair(max_packet_size=1200)
    pkt = c.seal(b"\x01" * (1200 - 61))
    assert len(pkt) == 1200
    assert s.open(pkt) is not None
    with pytest.raises(PacketTooLargeError):
        c.seal(b"\x01" * (1200 - 60))
    with pytest.raises(PacketTooLargeError):
        c.seal(b"", pad=1200 - 60)
    # Receiving side: a packet above the configured maximum is dropped before anything else.
    big_sender = RecordLayer(MASTER, True, RID)
    big_sender.epochs._debug_set_tx_seq(c.send_seq)
    expect_drop(s, big_sender.seal(b"\x01" * 1200), "ErrorPacketTooLarge")


def test_oversized_input_dropped_at_default_limit() -> None:
    c, s = pair()
    pkt = c.seal(b"\x00" * (65535 - 31))
    assert len(pkt) == 65565
    expect_drop(s, pkt + b"\x00", "ErrorPacketTooLarge")
    expect_drop(s, b"\x00" * 100_000, "ErrorPacketTooLarge")
    assert s.open(pkt) is not None


@pytest.mark.parametrize("stream_id", [-1, 256, 1000, -(1 << 20)])
def test_bad_stream_id_raises_value_error(stream_id: int) -> None:
    c, _ = pair()
    with pytest.raises(ValueError):
        c.seal(b"x", stream_id=stream_id)
    with pytest.raises(ValueError):
        c.seal_many([b"x"], stream_id=stream_id)
    assert c.send_seq == 0


@pytest.mark.parametrize("pad", [-1, 65536, 1 << 20])
def test_bad_pad_raises_value_error(pad: int) -> None:
    c, _ = pair()
    with pytest.raises(ValueError):
        c.seal(b"x", pad=pad)
    assert c.send_seq == 0


def test_sequence_rekey_threshold_and_hard_limit() -> None:
    c, s = pair()
    assert not c.needs_rekey and not c.epochs.needs_rekey
    c.epochs._debug_set_tx_seq(SEQ_REKEY_THRESHOLD - 1)
    assert not c.needs_rekey
    r = s.open(c.seal(b"a"))
    assert r is not None and r.seq == SEQ_REKEY_THRESHOLD - 1
    assert c.needs_rekey and c.epochs.needs_rekey
    r = s.open(c.seal(b"still sends"))
    assert r is not None and r.seq == SEQ_REKEY_THRESHOLD
    assert c.needs_rekey

    c.epochs._debug_set_tx_seq(SEQ_HARD_LIMIT - 1)
    r = s.open(c.seal(b"last one"))
    assert r is not None and r.seq == SEQ_HARD_LIMIT - 1
    assert c.send_seq == SEQ_HARD_LIMIT
    for _ in range(3):
        with pytest.raises(SequenceExhaustedError):
            c.seal(b"one too many")
        with pytest.raises(SequenceExhaustedError):
            c.seal_many([b"x"])
    assert c.send_seq == SEQ_HARD_LIMIT
    assert issubclass(SequenceExhaustedError, PalisadeError)

    # A rekey resets the sequence and sending resumes on the new epoch.
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    assert c.send_seq == 0 and not c.needs_rekey
    r = s.open(c.seal(b"fresh"))
    assert r is not None and (r.epoch, r.seq) == (1, 0)


def test_seal_at_hard_limit_raises() -> None:
    c, _ = pair()
    c.epochs._debug_set_tx_seq(SEQ_HARD_LIMIT)
    assert c.needs_rekey
    with pytest.raises(SequenceExhaustedError):
        c.seal(b"x")
    with pytest.raises(SequenceExhaustedError):
        c.seal(b"", stream_id=0xFF, pad=10)
    assert c.send_seq == SEQ_HARD_LIMIT and c.packets_sealed == 0


def test_hard_limit_values() -> None:
    assert SEQ_REKEY_THRESHOLD == (1 << 40) - (1 << 30)
    assert SEQ_HARD_LIMIT == 1 << 40


# ----------------------------------------------------------------------------------------------
# Anti-replay through the record layer
# ----------------------------------------------------------------------------------------------


def test_replays_rejected() -> None:
    c, s = pair(replay_window=64)
    pkts = c.seal_many([b"%d" % i for i in range(10)])
    for p in pkts:
        assert s.open(p) is not None
    for p in pkts:
        expect_drop(s, p, "replay")
    assert s.drop_counts == {"replay": 10}


def test_reordering_within_window_accepted_and_too_old_rejected() -> None:
    c, s = pair(replay_window=64)
    pkts = c.seal_many([b"%d" % i for i in range(300)])
    assert s.open(pkts[200]) is not None
    # Everything in (200-64, 200) opens, in any order, exactly once.
    order = list(range(137, 200))
    order = order[::2] + order[1::2][::-1]
    for i in order:
        r = s.open(pkts[i])
        assert r is not None and r.seq == i
    for i in order:
        expect_drop(s, pkts[i], "replay")
    # 136 = 200 - 64 is too old, and so is everything before it, even though never seen.
    for i in (136, 135, 100, 0):
        expect_drop(s, pkts[i], "replay")
    # Newer packets still flow, and slide the window.
    for i in range(201, 300):
        assert s.open(pkts[i]) is not None
    expect_drop(s, pkts[235], "replay")  # 299 - 235 = 64: out of the window now


def test_gap_then_late_fill() -> None:
    c, s = pair(replay_window=64)
    pkts = c.seal_many([b"x"] * 64)
    assert s.open(pkts[63]) is not None
    for i in range(62, -1, -1):
        assert s.open(pkts[i]) is not None, i
    assert s.dropped == 0


def test_mark_only_after_authentication_tampered_tag() -> None:
    c, s = pair(replay_window=64)
    pkts = c.seal_many([b"genuine %02d " % i * 4 for i in range(5)])
    for p in pkts:
        assert len(p) - 17 > 60  # outside the header-protection sample
        bad = flip(p, len(p) - 1, 0x80)  # tag byte: header and sample intact
        expect_drop(s, bad, "ErrorAEADDecryptFailed")
        bad = flip(p, len(p) - 17, 0x01)  # last ciphertext byte
        expect_drop(s, bad, "ErrorAEADDecryptFailed")
    for i, p in enumerate(pkts):
        r = s.open(p)
        assert r is not None and r.seq == i


def test_forged_far_future_seq_does_not_move_the_window() -> None:
    """A forged packet (correct header protection, garbage AEAD) with seq 10^6 must not mark."""
    c, s = pair(replay_window=64)
    for seq in (10**6, (1 << 64) - 1, 3):
        expect_drop(s, forge(seq), "ErrorAEADDecryptFailed")
    pkts = c.seal_many([b"%d" % i for i in range(6)])
    for i, p in enumerate(pkts):
        r = s.open(p)
        assert r is not None and r.seq == i, i
    # The forged seq 3 did not poison seq 3 either, and forging again is still only an AEAD drop.
    expect_drop(s, forge(10**6), "ErrorAEADDecryptFailed")


def test_forged_packet_seen_first_then_real_packet() -> None:
    c, s = pair()
    pkt = c.seal(b"the real one")
    expect_drop(s, forge(0, body=b"\x00" * 30), "ErrorAEADDecryptFailed")
    r = s.open(pkt)
    assert r is not None and r.payload == b"the real one"


# ----------------------------------------------------------------------------------------------
# Tampering: every single-byte modification is rejected
# ----------------------------------------------------------------------------------------------

MASKS = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF, 0x5A)


def _check_every_tamper(receiver: RecordLayer, pkt: bytes) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for pos in range(len(pkt)):
        for mask in MASKS:
            name = expect_drop(receiver, flip(pkt, pos, mask))
            reasons[name] = reasons.get(name, 0) + 1
    return reasons


def test_every_single_byte_tamper_is_rejected_steady() -> None:
    c, s = pair()
    pkt = c.seal(b"tamper target " * 3, stream_id=9, pad=11)
    reasons = _check_every_tamper(s, pkt)
    assert "reserved-bits" in reasons and "ErrorAEADDecryptFailed" in reasons
    assert "bad-magic" in reasons and "ErrorInvalidVersion" in reasons
    assert "unknown-rid" in reasons and "bad-length" in reasons
    assert "ErrorInvalidKeyPhase" in reasons  # the key_phase bit flipped, receiver STEADY
    r = s.open(pkt)  # the genuine packet still opens: nothing was marked
    assert r is not None and r.payload == b"tamper target " * 3
    assert s.open(c.seal(b"next")) is not None


def test_every_single_byte_tamper_is_rejected_in_transition() -> None:
    c, s = pair()
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    pkt = c.seal(b"phase one", pad=3)  # epoch 1, key_phase 1
    assert pkt[3] & 0x04
    _check_every_tamper(s, pkt)
    assert s.epochs.packets_on_next == 0
    assert s.epochs.rx_state_name == "TRANSITION"
    r = s.open(pkt)
    assert r is not None and r.epoch == 1
    assert s.epochs.packets_on_next == 1
    old = RecordLayer(MASTER, True, RID)  # an epoch-0 sender (same session)
    old.epochs._debug_set_tx_seq(1000)
    pkt0 = old.seal(b"phase zero")
    _check_every_tamper(s, pkt0)
    assert s.open(pkt0) is not None


def test_every_truncation_and_extension_is_rejected() -> None:
    c, s = pair()
    pkt = c.seal(b"truncate me" * 5, pad=7)
    for n in range(len(pkt)):
        reason = expect_drop(s, pkt[:n])
        assert reason == ("truncated" if n < 61 else "bad-length"), n
        if n >= 61:  # also with a consistent length field: caught by AEAD or padding
            expect_drop(s, with_length_fixed(pkt[:n]))
    for extra in (1, 2, 16, 100):
        expect_drop(s, pkt + b"\x00" * extra, "bad-length")
        expect_drop(s, with_length_fixed(pkt + b"\x00" * extra))
    assert s.open(pkt) is not None


@pytest.mark.parametrize("version", [v for v in range(256) if v != 0x12])
def test_wrong_version_byte(version: int) -> None:
    c, s = pair()
    pkt = c.seal(b"v")
    expect_drop(s, pkt[:2] + bytes([version]) + pkt[3:], "ErrorInvalidVersion")
    assert s.open(pkt) is not None


def test_wrong_magic() -> None:
    c, s = pair()
    pkt = c.seal(b"m")
    for magic in (b"QH", b"PQ", b"\x00\x00", b"qp", b"QQ"):
        expect_drop(s, magic + pkt[2:], "bad-magic")


@pytest.mark.parametrize("bit", RESERVED_BITS)
def test_reserved_flag_bits_dropped_before_crypto(bit: int) -> None:
    c, s = pair()
    pkt = c.seal(b"r")
    expect_drop(s, pkt[:3] + bytes([pkt[3] | bit]) + pkt[4:], "reserved-bits")
    # Garbage everywhere else (wrong length, RID, header, tag): still reserved-bits.
    garbage = b"QP\x12" + bytes([bit | 0x05]) + b"\xff" * 100
    expect_drop(s, garbage, "reserved-bits")
    assert s.open(pkt) is not None


# ----------------------------------------------------------------------------------------------
# Hypothesis fuzzing of open()
# ----------------------------------------------------------------------------------------------


_SENDER = RecordLayer(MASTER, True, RID)
_VALID = [_SENDER.seal(b"valid %d" % i * (i % 5), stream_id=i % 3, pad=(i * 7) % 20,
                       control=i % 4 == 0) for i in range(16)]


@fast(300)
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(data: bytes) -> None:
    _, s = pair()
    expect_drop(s, data)


@fast(300)
@given(flags=st.sampled_from([0, 1, 4, 5]), tail=st.binary(min_size=16, max_size=300),
       length_ok=st.booleans())
def test_fuzz_valid_public_header_random_body(flags: int, tail: bytes, length_ok: bool) -> None:
    _, s = pair()
    length = 15 + len(tail) if length_ok else (16 + len(tail)) & 0xFFFF
    data = b"QP\x12" + bytes([flags]) + struct.pack(">H", length) + RID + b"\x00" * 15 + tail
    expect_drop(s, data)


@fast(400)
@given(idx=st.integers(0, len(_VALID) - 1), pos=st.integers(0, 10_000),
       mask=st.integers(1, 255), transition=st.booleans())
def test_fuzz_byte_flips_of_valid_packets(idx: int, pos: int, mask: int,
                                          transition: bool) -> None:
    _, s = pair()
    if transition:
        s.arm_next_epoch()
    pkt = _VALID[idx]
    expect_drop(s, flip(pkt, pos % len(pkt), mask))
    assert s.open(pkt) is not None


@fast(200)
@given(idx=st.integers(0, len(_VALID) - 1),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1,
                      max_size=8))
def test_fuzz_multi_byte_flips(idx: int, flips: list[tuple[int, int]]) -> None:
    _, s = pair()
    pkt = bytearray(_VALID[idx])
    for pos, mask in flips:
        pkt[pos % len(pkt)] ^= mask
    if bytes(pkt) == _VALID[idx]:
        return
    expect_drop(s, bytes(pkt))


@fast(150)
@given(idx=st.integers(0, len(_VALID) - 1), cut=st.integers(0, 10_000))
def test_fuzz_truncations(idx: int, cut: int) -> None:
    _, s = pair()
    pkt = _VALID[idx]
    n = cut % len(pkt)
    expect_drop(s, pkt[:n])
    if n >= 61:
        expect_drop(s, with_length_fixed(pkt[:n]))


@fast(150)
@given(rid=st.binary(min_size=24, max_size=24), idx=st.integers(0, len(_VALID) - 1))
def test_fuzz_wrong_rid(rid: bytes, idx: int) -> None:
    if rid == RID:
        return
    _, s = pair()
    pkt = _VALID[idx]
    expect_drop(s, pkt[:6] + rid + pkt[30:], "unknown-rid")
    # A layer with another RID refuses the genuine packet too.
    other = RecordLayer(MASTER, False, rid)
    expect_drop(other, pkt, "unknown-rid")


@fast(150)
@given(version=st.integers(0, 255).filter(lambda v: v != 0x12),
       idx=st.integers(0, len(_VALID) - 1))
def test_fuzz_wrong_version(version: int, idx: int) -> None:
    _, s = pair()
    pkt = _VALID[idx]
    expect_drop(s, pkt[:2] + bytes([version]) + pkt[3:], "ErrorInvalidVersion")


@fast(300)
@given(flags=st.integers(0, 255).filter(lambda f: f & 0xFA),
       rest=st.binary(min_size=57, max_size=400))
def test_fuzz_reserved_bits_with_garbage(flags: int, rest: bytes) -> None:
    _, s = pair()
    expect_drop(s, b"QP\x12" + bytes([flags]) + rest, "reserved-bits")


@fast(100)
@given(flags=st.integers(0, 255).filter(lambda f: f & 0xFA), idx=st.integers(0, 15))
def test_fuzz_reserved_bits_on_valid_packets(flags: int, idx: int) -> None:
    _, s = pair()
    pkt = _VALID[idx]
    expect_drop(s, pkt[:3] + bytes([flags]) + pkt[4:], "reserved-bits")


@fast(100)
@given(junk=st.lists(st.binary(max_size=120), max_size=10))
def test_fuzz_open_many_never_accepts_junk(junk: list[bytes]) -> None:
    _, s = pair()
    assert s.open_many(junk) == [None] * len(junk)
    assert s.dropped == len(junk) and s.packets_opened == 0


# ----------------------------------------------------------------------------------------------
# Input types
# ----------------------------------------------------------------------------------------------


def test_open_accepts_bytes_like_input() -> None:
    c, s = pair()
    pkts = c.seal_many([b"a", b"b", b"c", b"d"])
    r = s.open(bytearray(pkts[0]))
    assert r is not None and r.payload == b"a"
    r = s.open(memoryview(pkts[1]))
    assert r is not None and r.payload == b"b"
    buf = bytearray(b"\xee" * 10 + pkts[2] + b"\xee" * 10)
    r = s.open(memoryview(buf)[10:-10])
    assert r is not None and r.payload == b"c"

    class B(bytes):
        pass

    r = s.open(B(pkts[3]))
    assert r is not None and r.payload == b"d"
    assert s.dropped == 0


def test_open_with_now_argument() -> None:
    c, s = pair()
    r = s.open(c.seal(b"t", now=1.0), now=1.0)
    assert r is not None and r.payload == b"t"
    r = s.open_many(c.seal_many([b"u"], now=2.0), now=2.0)[0]
    assert r is not None and r.payload == b"u"


JUNK_OBJECTS: list[Any] = [None, "a string", 1.5, object(), -1, [1, 2, 3], 0]


@pytest.mark.parametrize("junk", JUNK_OBJECTS, ids=lambda j: type(j).__name__ + repr(j)[:10])
def test_open_never_raises_on_arbitrary_objects(junk: Any) -> None:
    """open() is documented to never raise on bad input ("nothing ... can raise out of open").

    BUG (junk = -1): ``open`` converts non-bytes input with ``bytes(data)`` and only catches
    TypeError; ``bytes(-1)`` raises ValueError ("negative count"), which escapes. (Relatedly,
    any non-negative int n is turned into n zero bytes, so ``open(10**9)`` allocates 1 GB before
    dropping it.)
    """
    _, s = pair()
    expect_drop(s, junk)


def test_open_many_agrees_with_open_on_arbitrary_objects() -> None:
    """open_many is documented as "open for a batch".

    BUG: ``open_many`` calls ``bytes(d)`` without the try/except that ``open`` has, so a single
    non-buffer element (None, a str) raises TypeError out of the batch call, while ``open`` on
    the same element returns None and counts it.
    """
    c, s = pair()
    good = c.seal(b"good")
    out = s.open_many([None, good, "str"])
    assert out[0] is None and out[2] is None
    assert out[1] is not None and out[1].payload == b"good"


def test_drop_counts_names_include_the_documented_set() -> None:
    from palisade_c import record

    names = tuple(record.DROP_REASON_NAMES)
    assert len(set(names)) == len(names)
    assert set(DROP_REASONS) <= set(names)


def test_drop_counts_and_dropped_are_consistent() -> None:
    c, s = pair()
    pkt = c.seal(b"x")
    feeders: list[Callable[[], object]] = [
        lambda: s.open(b""), lambda: s.open(b"\x00" * 61), lambda: s.open(pkt[:3] + b"\x02" +
                                                                            pkt[4:]),
        lambda: s.open(pkt), lambda: s.open(pkt),
    ]
    for f in feeders:
        f()
    assert s.drop_counts == {"truncated": 1, "bad-magic": 1, "reserved-bits": 1, "replay": 1}
    assert s.dropped == 4
    assert all(isinstance(v, int) for v in s.drop_counts.values())
