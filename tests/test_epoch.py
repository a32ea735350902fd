"""Tests of the epoch state machine (palisade_c.epoch) through the record layer.

One test (or a small group) per row of the event-transition tables (spec artifact, seed §3,
PROFILE §6, docs/protocol.md §5), the validation rules, key erasure, long runs of rekeys, and a
seeded randomized two-party simulation over a lossy, reordering, duplicating link.
"""

from __future__ import annotations

import heapq
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA3_256
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from palisade_c import Record, RecordLayer
from palisade_c import epoch as epoch_mod
from palisade_c.errors import EpochStateError, PalisadeError, StateError

MASTER = bytes(range(100, 132))
RID = bytes(range(24))

CTRL_REKEY = 0x01
KIND_ANNOUNCE, KIND_REQUEST, KIND_ACK = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def pair(**kw: Any) -> tuple[RecordLayer, RecordLayer]:
    return RecordLayer(MASTER, True, RID, **kw), RecordLayer(MASTER, False, RID, **kw)


def client_at_epoch(n: int, **kw: Any) -> RecordLayer:
    """A client sender that has moved, on its own, to epoch ``n`` (for crafting packets)."""
    c = RecordLayer(MASTER, True, RID, **kw)
    for _ in range(n):
        c.arm_next_epoch()
        c.install_next_epoch()
        c.commit_epoch_transition()
        c.complete_transition()
    return c


def rekey_frame(next_epoch: int, kind: int) -> bytes:
    """CTRL_REKEY frame: ctrl_type u8 | length u24 | next_epoch u32 | kind u8 (PROFILE §5)."""
    body = struct.pack(">IB", next_epoch, kind)
    return bytes([CTRL_REKEY]) + len(body).to_bytes(3, "big") + body


def parse_rekey(rec: Record) -> tuple[int, int] | None:
    if not rec.control or len(rec.payload) != 9 or rec.payload[0] != CTRL_REKEY:
        return None
    if int.from_bytes(rec.payload[1:4], "big") != 5:
        return None
    next_epoch, kind = struct.unpack(">IB", rec.payload[4:9])
    return next_epoch, kind


def expect_drop(layer: RecordLayer, data: bytes, reason: str, now: float | None = None) -> None:
    before = dict(layer.drop_counts)
    opened = layer.packets_opened
    assert layer.open(data, now=now) is None
    after = layer.drop_counts
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    assert {k: v for k, v in diff.items() if v} == {reason: 1}
    assert layer.packets_opened == opened


def snapshot(layer: RecordLayer) -> tuple[Any, ...]:
    e = layer.epochs
    return (e.rx_state_name, e.tx_state_name, e.epoch, e.next_epoch, e.send_epoch, e.key_phase,
            e.install_pending, e.packets_on_next, e.next_epoch_seen, e.tx_seq,
            {k: bytes(v) for k, v in e.key_buffers().items()})


def ref_key_iv(epoch: int, d: bytes) -> tuple[bytes, bytes]:
    s = HKDFExpand(SHA3_256(), 32, b"PALISADE epoch 0").derive(MASTER)
    for _ in range(epoch):
        s = HKDFExpand(SHA3_256(), 32, b"PALISADE epoch step").derive(s)
    return (HKDFExpand(SHA3_256(), 32, b"PALISADE " + d + b" key").derive(s),
            HKDFExpand(SHA3_256(), 12, b"PALISADE " + d + b" iv").derive(s))


def hand_seal_c2s(payload: bytes, epoch: int, seq: int, flags: int) -> bytes:
    key, iv = ref_key_iv(epoch, b"c2s")
    hp = HKDFExpand(SHA3_256(), 32, b"PALISADE c2s hp").derive(MASTER)
    pub = b"QP" + bytes([0x12, flags]) + struct.pack(">H", 15 + len(payload) + 16) + RID
    hdr = struct.pack(">IQBH", epoch, seq, 0, 0)
    nonce = bytes(a ^ b for a, b in zip(iv, struct.pack(">IQ", epoch, seq), strict=True))
    ct = ChaCha20Poly1305(key).encrypt(nonce, payload, pub + hdr)
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(ct[:16])[:15]
    return pub + bytes(a ^ b for a, b in zip(hdr, mask, strict=True)) + ct


# ----------------------------------------------------------------------------------------------
# The tables themselves
# ----------------------------------------------------------------------------------------------


def test_rx_transition_table_is_exactly_the_spec_table() -> None:
    assert epoch_mod.rx_transition_table() == {
        ("STEADY", "arm_next_epoch"): "TRANSITION",
        ("STEADY", "key_phase=0"): "STEADY",
        ("TRANSITION", "commit_epoch_transition"): "STEADY",
        ("TRANSITION", "key_phase=0"): "TRANSITION",
        ("TRANSITION", "key_phase=1"): "TRANSITION",
        ("TRANSITION", "abandon_next_epoch"): "STEADY",  # [profile, changed] docs §5.1
    }


def test_tx_transition_table_is_exactly_the_spec_table() -> None:
    assert epoch_mod.tx_transition_table() == {
        ("STEADY", "install_next_epoch"): "TRANSITION",
        ("TRANSITION", "complete_transition"): "STEADY",
    }


def test_initial_state() -> None:
    c, s = pair()
    for layer in (c, s):
        e = layer.epochs
        assert (e.rx_state_name, e.tx_state_name) == ("STEADY", "STEADY")
        assert (e.epoch, e.next_epoch, e.send_epoch, e.key_phase) == (0, None, 0, 0)
        assert not e.install_pending and not e.needs_rekey and not e.next_epoch_seen
        assert e.packets_on_next == 0
        assert set(e.key_buffers()) == {"rx_cur", "tx_cur"}
        assert layer.get_timer() is None


def test_constants() -> None:
    assert epoch_mod.SEQ_REKEY_THRESHOLD == (1 << 40) - (1 << 30)
    assert epoch_mod.SEQ_HARD_LIMIT == 1 << 40


# ----------------------------------------------------------------------------------------------
# Decryptor rows
# ----------------------------------------------------------------------------------------------


def test_row_steady_authenticated_rekey_arms_next_epoch() -> None:
    """STEADY + authenticated CTRL_REKEY -> TRANSITION (ArmNextEpoch)."""
    c, s = pair()
    # The server announces: it arms when it sends the announcement.
    assert s.arm_next_epoch(now=1.0, expected_epoch=1) == 1
    announce = s.seal(rekey_frame(1, KIND_ANNOUNCE), control=True)
    # The client acts only on the *authenticated* frame.
    rec = c.open(announce)
    assert rec is not None and parse_rekey(rec) == (1, KIND_ANNOUNCE)
    assert c.arm_next_epoch(now=1.0, expected_epoch=1) == 1
    for layer in (c, s):
        e = layer.epochs
        assert e.rx_state_name == "TRANSITION"
        assert (e.epoch, e.next_epoch) == (0, 1)
        assert e.packets_on_next == 0 and not e.next_epoch_seen
        assert e.install_pending
        assert {"rx_cur", "rx_next", "tx_cur", "tx_pending"} == set(e.key_buffers())
        assert e.send_epoch == 0 and e.tx_state_name == "STEADY"  # arming does not install


def test_row_steady_forged_rekey_arms_nothing() -> None:
    c, s = pair()
    announce = s.seal(rekey_frame(1, KIND_ANNOUNCE), control=True)
    forged = announce[:-1] + bytes([announce[-1] ^ 1])
    before = snapshot(c)
    expect_drop(c, forged, "ErrorAEADDecryptFailed")
    assert snapshot(c) == before


@pytest.mark.parametrize("threshold", [1, 2, 5, 16])
def test_row_transition_commit_threshold_reached(threshold: int) -> None:
    """TRANSITION + packetsOnNextEpoch >= commitThreshold -> STEADY (CommitEpochTransition).
    The packets counted are key_phase 0 ones: the peer's sender has finished its transition."""
    c, s = pair(commit_threshold=threshold)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()
    for i in range(threshold - 1):
        r = s.open(c.seal(b"n%d" % i))
        assert r is not None and r.epoch == 1
        assert s.epochs.rx_state_name == "TRANSITION"
        assert s.epochs.packets_on_next == i + 1
    r = s.open(c.seal(b"last"))
    assert r is not None and r.epoch == 1
    e = s.epochs
    assert e.rx_state_name == "STEADY"
    assert (e.epoch, e.next_epoch, e.packets_on_next) == (1, None, 0)
    assert "rx_next" not in e.key_buffers()


def test_threshold_counts_only_authenticated_new_epoch_packets() -> None:
    c, s = pair(commit_threshold=4)
    old_sender = RecordLayer(MASTER, True, RID)
    old_sender.epochs._debug_set_tx_seq(100)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    first = c.seal(b"first")
    assert s.open(first) is not None
    assert s.epochs.packets_on_next == 1
    for _ in range(10):
        assert s.open(old_sender.seal(b"old epoch")) is not None  # current keys: not counted
        expect_drop(s, first, "replay")                          # replay: not counted
        forged = c.seal(b"forged")
        expect_drop(s, forged[:-1] + bytes([forged[-1] ^ 0x40]), "ErrorAEADDecryptFailed")
    assert s.epochs.packets_on_next == 1
    assert s.epochs.rx_state_name == "TRANSITION"


def test_row_transition_timeout_handle_timer() -> None:
    """TRANSITION + timeout -> STEADY. The clock starts at arming (seed §3 "maxTransitionTime
    exceeded"); with a key_phase 0 packet on the new epoch seen, commit at T after arming."""
    c, s = pair(max_transition_time=2.0)
    s.arm_next_epoch(now=1000.0)
    assert s.get_timer() == pytest.approx(1002.0)  # nothing seen yet: the abandon deadline
    old_sender = RecordLayer(MASTER, True, RID)
    assert s.open(old_sender.seal(b"old"), now=1000.5) is not None  # old epoch: no change
    assert s.get_timer() == pytest.approx(1002.0)
    c.arm_next_epoch()
    c.install_next_epoch()
    assert s.open(c.seal(b"first on new, key_phase 1"), now=1001.0) is not None
    assert s.epochs.next_epoch_seen
    # Only key_phase 1 seen: the peer's sender may still use it, so allow twice as long.
    assert s.get_timer() == pytest.approx(1004.0)
    c.complete_transition()
    assert s.open(c.seal(b"second, key_phase 0"), now=1001.5) is not None
    assert s.get_timer() == pytest.approx(1002.0)
    s.handle_timer(1001.999)
    assert s.epochs.rx_state_name == "TRANSITION"
    s.handle_timer(1002.0)
    assert s.epochs.rx_state_name == "STEADY"
    assert (s.epoch, s.epochs.next_epoch) == (1, None)
    assert s.get_timer() is None
    # The old epoch's keys are gone.
    expect_drop(s, old_sender.seal(b"late old"), "ErrorInvalidEpoch", now=1003.0)


def test_row_transition_timeout_opportunistic_in_open() -> None:
    """The timeout is also enforced while processing packets (opportunistic check)."""
    c, s = pair(max_transition_time=2.0, commit_threshold=1000)
    old_sender = RecordLayer(MASTER, True, RID)
    s.arm_next_epoch(now=9.0)
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()  # key_phase 0 on epoch 1 from now on
    assert s.open(c.seal(b"first"), now=10.0) is not None
    assert s.open(old_sender.seal(b"old, in time"), now=10.9) is not None
    assert s.epochs.rx_state_name == "TRANSITION"
    # At 11.5 the transition has expired: the check runs before decryption.
    expect_drop(s, old_sender.seal(b"old, too late"), "ErrorInvalidEpoch", now=11.5)
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1
    r = s.open(c.seal(b"new"), now=11.6)
    assert r is not None and r.epoch == 1


def test_transition_clock_runs_from_arming_whatever_the_packets_carry() -> None:
    """The transition stays bounded in time (seed §3: "MUST NOT remain in TRANSITION
    indefinitely") even when packets on the new epoch are opened without a time (a batch path):
    the clock started when the epoch was armed."""
    c, s = pair(max_transition_time=2.0, commit_threshold=1000)
    s.arm_next_epoch(now=0.0)
    c.arm_next_epoch()
    c.install_next_epoch()
    assert s.open_many([c.seal(b"first, from a batch path without a clock")])[0] is not None
    assert s.open(c.seal(b"second, with a clock"), now=1.0) is not None
    assert s.get_timer() == pytest.approx(4.0)
    s.handle_timer(4.0)
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1


def test_transition_without_new_epoch_packets_is_abandoned_at_its_bound() -> None:
    """[profile, changed] docs §5.1: an announcing side that sees nothing on the armed epoch
    within max_transition_time of arming abandons it (never commits to keys the peer lacks).
    The same epoch can be armed again later, with the same keys."""
    c, s = pair(max_transition_time=0.5)
    s.arm_next_epoch(now=0.0)
    assert s.get_timer() == pytest.approx(0.5)
    s.handle_timer(0.499)
    assert s.epochs.rx_state_name == "TRANSITION"
    rx_next = s.epochs.key_buffers()["rx_next"]
    s.handle_timer(0.5)
    e = s.epochs
    assert (e.rx_state_name, e.epoch, e.next_epoch, e.abandons) == ("STEADY", 0, None, 1)
    assert not e.install_pending and set(e.key_buffers()) == {"rx_cur", "tx_cur"}
    assert rx_next == bytearray(32)  # erased
    assert s.get_timer() is None
    for t in (1.0, 100.0, 1e6):
        s.handle_timer(t)
    assert s.epochs.rx_state_name == "STEADY"
    # Epoch 0 still works; the retry arms epoch 1 again and the client's epoch-1 keys open it.
    old = RecordLayer(MASTER, True, RID)
    assert s.open(old.seal(b"still epoch 0"), now=2.0) is not None
    assert s.arm_next_epoch(now=2.0, expected_epoch=1) == 1
    c.arm_next_epoch()
    c.install_next_epoch()
    r = s.open(c.seal(b"on epoch 1"), now=2.1)
    assert r is not None and r.epoch == 1


def test_a_side_whose_sender_moved_never_abandons() -> None:
    """The client arms and installs at once; it cannot go back, so its epoch machine sets no
    abandon deadline (the session bounds its wait, docs §9) and refuses an explicit abandon."""
    c, _ = pair(max_transition_time=0.5)
    c.arm_next_epoch(now=0.0)
    c.install_next_epoch(now=0.0)
    assert c.get_timer() is None
    c.handle_timer(1e6)
    assert c.epochs.rx_state_name == "TRANSITION"
    with pytest.raises(EpochStateError):
        c.abandon_next_epoch()


def test_evidence_forbids_abandoning() -> None:
    c, s = pair(max_transition_time=0.5, commit_threshold=100)
    s.arm_next_epoch(now=0.0)
    c.arm_next_epoch()
    c.install_next_epoch()
    assert s.open(c.seal(b"evidence"), now=0.1) is not None
    with pytest.raises(EpochStateError):
        s.abandon_next_epoch()
    s.handle_timer(0.5)  # key_phase 1 only: the bound is 2T
    assert s.epochs.rx_state_name == "TRANSITION"
    s.handle_timer(1.0)
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1


def test_row_steady_key_phase0_decrypts_normally() -> None:
    """STEADY + key_phase=0 -> decrypt with current keys, state unchanged."""
    c, s = pair()
    before = snapshot(s)
    for i in range(20):
        r = s.open(c.seal(b"%d" % i))
        assert r is not None and (r.epoch, r.seq) == (0, i)
    assert snapshot(s) == before
    assert s.dropped == 0


def test_row_steady_key_phase1_is_rejected() -> None:
    """STEADY + key_phase=1 -> IsKeyPhaseValid() false: dropped, counted, state unchanged."""
    c, s = pair()
    c.arm_next_epoch()
    c.install_next_epoch()  # the sender moved without the receiver having armed
    pkt = c.seal(b"too early")
    assert pkt[3] & 0x04
    before = snapshot(s)
    expect_drop(s, pkt, "ErrorInvalidKeyPhase")
    assert snapshot(s) == before
    # Nothing was marked: once the receiver arms, the very same packet opens.
    s.arm_next_epoch()
    r = s.open(pkt)
    assert r is not None and r.epoch == 1


def test_row_steady_key_phase1_rejected_before_any_aead() -> None:
    """A key_phase=1 flag on an otherwise genuine epoch-0 packet: ErrorInvalidKeyPhase, not
    an AEAD failure (no decryption attempt in STEADY)."""
    c, s = pair()
    pkt = c.seal(b"genuine")
    tampered = pkt[:3] + bytes([pkt[3] | 0x04]) + pkt[4:]
    expect_drop(s, tampered, "ErrorInvalidKeyPhase")
    assert s.open(pkt) is not None


def test_row_transition_key_phase0_current_keys() -> None:
    """TRANSITION + key_phase=0 -> decrypt with the current keys (indicated phase)."""
    c, s = pair()
    s.arm_next_epoch()
    before = snapshot(s)
    for i in range(30):  # more than the commit threshold: current-epoch packets never commit
        r = s.open(c.seal(b"%d" % i))
        assert r is not None and r.epoch == 0
    assert snapshot(s) == before
    assert s.epochs.rx_state_name == "TRANSITION" and s.epochs.packets_on_next == 0


def test_row_transition_key_phase0_on_new_epoch_uses_alternate_key() -> None:
    """key_phase=0 on the NEW epoch (sender already completed) opens on the second attempt and
    counts toward the commit."""
    c, s = pair(commit_threshold=3)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()
    pkt = c.seal(b"phase 0, epoch 1")
    assert not pkt[3] & 0x04
    r = s.open(pkt)
    assert r is not None and r.epoch == 1
    assert s.epochs.packets_on_next == 1 and s.epochs.next_epoch_seen
    s.open(c.seal(b"2"))
    s.open(c.seal(b"3"))
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1


def test_row_transition_key_phase1_on_current_epoch_uses_alternate_key() -> None:
    """The other fallback direction: a key_phase=1 packet that authenticates under the
    current epoch opens on the second attempt (hand-built; no compliant sender does this)."""
    _, s = pair()
    s.arm_next_epoch()
    r = s.open(hand_seal_c2s(b"odd", epoch=0, seq=7, flags=0x04))
    assert r is not None and (r.epoch, r.seq) == (0, 7)
    assert s.epochs.packets_on_next == 0


@pytest.mark.parametrize("threshold", [1, 4, 16])
def test_row_transition_key_phase1_next_keys_count_and_commit(threshold: int) -> None:
    """TRANSITION + key_phase=1 -> decrypt with next keys, RecordPacketOnNextEpoch. Toward
    the commit count only key_phase 0 packets: a key_phase 1 packet says the peer's sender is
    still in its transition, and committing then would strand the rest of them."""
    c, s = pair(commit_threshold=threshold)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    for i in range(threshold + 3):
        pkt = c.seal(b"%d" % i)
        assert pkt[3] & 0x04
        r = s.open(pkt)
        assert r is not None and r.epoch == 1
    assert s.epochs.rx_state_name == "TRANSITION"
    assert s.epochs.packets_on_next == threshold + 3 and not s.epochs.next_phase0_seen
    c.complete_transition()
    for i in range(threshold):
        assert s.epochs.rx_state_name == "TRANSITION"
        r = s.open(c.seal(b"p0 %d" % i))
        assert r is not None and r.epoch == 1
    assert s.epochs.rx_state_name == "STEADY"
    assert s.epoch == 1


def test_window_of_new_epoch_survives_commit() -> None:
    """Packets accepted on the next epoch during TRANSITION stay marked after the commit."""
    c, s = pair(commit_threshold=4)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    pkts = [c.seal(b"%d" % i) for i in range(2)]
    c.complete_transition()
    pkts += [c.seal(b"%d" % i) for i in range(2, 8)]
    for p in pkts[:6]:
        assert s.open(p) is not None
    assert s.epochs.rx_state_name == "STEADY"
    for p in pkts[:6]:
        # key_phase 1 packets are refused by a STEADY receiver before the window is consulted
        expect_drop(s, p, "ErrorInvalidKeyPhase" if p[3] & 0x04 else "replay")
    assert [bool(p[3] & 0x04) for p in pkts[:6]] == [True, True, False, False, False, False]
    assert s.open(pkts[7]) is not None and s.open(pkts[6]) is not None  # reordered: fine


def test_independent_replay_windows_per_epoch() -> None:
    c, s = pair(commit_threshold=100)
    old = RecordLayer(MASTER, True, RID)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    p_old = old.seal(b"epoch 0 seq 0")
    p_new = c.seal(b"epoch 1 seq 0")
    r0, r1 = s.open(p_old), s.open(p_new)
    assert r0 is not None and r1 is not None
    assert (r0.epoch, r0.seq, r1.epoch, r1.seq) == (0, 0, 1, 0)
    expect_drop(s, p_old, "replay")
    expect_drop(s, p_new, "replay")


# ----------------------------------------------------------------------------------------------
# Encryptor rows
# ----------------------------------------------------------------------------------------------


def test_row_install_sets_key_phase1_and_seq0() -> None:
    c, s = pair()
    for _ in range(5):
        c.seal(b"x")
    assert c.send_seq == 5
    c.arm_next_epoch()
    assert c.epochs.install_pending
    assert c.install_next_epoch() == 1
    e = c.epochs
    assert (e.tx_state_name, e.key_phase, e.send_epoch, e.tx_seq) == ("TRANSITION", 1, 1, 0)
    assert not e.install_pending
    assert c.send_seq == 0
    s.arm_next_epoch()
    pkt = c.seal(b"after install")
    assert pkt[3] & 0x04
    r = s.open(pkt)
    assert r is not None and (r.epoch, r.seq) == (1, 0)


def test_row_complete_sets_key_phase_back_to_0() -> None:
    c, s = pair()
    c.arm_next_epoch()
    c.install_next_epoch()
    c.seal(b"one")
    assert c.complete_transition() == 1
    e = c.epochs
    assert (e.tx_state_name, e.key_phase, e.send_epoch, e.tx_seq) == ("STEADY", 0, 1, 1)
    pkt = c.seal(b"phase 0 on epoch 1")
    assert not pkt[3] & 0x04
    s.arm_next_epoch()
    r = s.open(pkt)
    assert r is not None and (r.epoch, r.seq) == (1, 1)


@pytest.mark.parametrize("threshold", [1, 2, 16, 1000])
def test_sender_completes_on_the_peers_first_packet_on_its_epoch(threshold: int) -> None:
    """[profile, changed] docs §5.2: the sender clears key_phase when it opens a packet the
    peer sent on the sender's epoch (the peer installed it), never after a local count: the
    peer's threshold is not ours to know."""
    c, s = pair(commit_threshold=threshold)
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    flags = [c.seal(b"x")[3] & 0x04 for _ in range(threshold + 2)]
    assert flags == [0x04] * (threshold + 2)
    assert s.open(c.seal(b"ack")) is not None
    # The server installs on that evidence; the peer is on the epoch already, so no hint.
    s.install_next_epoch()
    assert s.epochs.tx_state_name == "STEADY" and s.epochs.key_phase == 0
    assert c.open(s.seal(b"down")) is not None
    assert c.epochs.tx_state_name == "STEADY"
    assert not c.seal(b"now phase 0")[3] & 0x04


def test_no_local_clock_ends_the_senders_hint() -> None:
    c, _ = pair(max_transition_time=2.0, commit_threshold=1000)
    c.arm_next_epoch()
    c.install_next_epoch(now=5.0)
    assert c.get_timer() is None
    c.handle_timer(1e6)
    assert c.epochs.key_phase == 1


def test_get_timer_follows_the_evidence() -> None:
    c, s = pair(max_transition_time=4.0, commit_threshold=1000)
    s.arm_next_epoch(now=10.0)
    assert s.get_timer() == pytest.approx(14.0)          # abandon, if nothing comes
    c.arm_next_epoch()
    c.install_next_epoch()
    assert s.open(c.seal(b"x"), now=11.0) is not None   # key_phase 1: commit by 18.0
    assert s.get_timer() == pytest.approx(18.0)
    s.install_next_epoch(now=11.0)                       # no sender deadline
    assert s.get_timer() == pytest.approx(18.0)
    c.complete_transition()
    assert s.open(c.seal(b"y"), now=12.0) is not None   # key_phase 0: commit by 14.0
    assert s.get_timer() == pytest.approx(14.0)
    s.handle_timer(13.99)
    assert s.epochs.rx_state_name == "TRANSITION"
    s.handle_timer(14.0)
    assert s.epochs.rx_state_name == "STEADY" and s.get_timer() is None


# ----------------------------------------------------------------------------------------------
# Validation rules
# ----------------------------------------------------------------------------------------------


def test_epoch_state_error_hierarchy() -> None:
    assert issubclass(EpochStateError, StateError)
    assert issubclass(EpochStateError, PalisadeError)
    assert issubclass(EpochStateError, RuntimeError)


def test_arm_while_in_transition_raises() -> None:
    _, s = pair()
    s.arm_next_epoch()
    before = snapshot(s)
    with pytest.raises(EpochStateError):
        s.arm_next_epoch()
    with pytest.raises(EpochStateError):
        s.arm_next_epoch(expected_epoch=1)
    assert snapshot(s) == before


def test_commit_while_steady_raises() -> None:
    c, _ = pair()
    before = snapshot(c)
    with pytest.raises(EpochStateError):
        c.commit_epoch_transition()
    assert snapshot(c) == before


def test_complete_when_not_in_transition_raises() -> None:
    c, _ = pair()
    with pytest.raises(EpochStateError):
        c.complete_transition()
    c.arm_next_epoch()
    with pytest.raises(EpochStateError):  # armed but not installed: still not in transition
        c.complete_transition()
    c.install_next_epoch()
    c.complete_transition()
    with pytest.raises(EpochStateError):  # twice
        c.complete_transition()


def test_install_with_nothing_armed_raises() -> None:
    c, _ = pair()
    before = snapshot(c)
    with pytest.raises(EpochStateError):
        c.install_next_epoch()
    assert snapshot(c) == before
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()
    with pytest.raises(EpochStateError):  # the armed epoch was used up
        c.install_next_epoch()


def test_install_while_sender_in_transition_raises() -> None:
    c, _ = pair()
    c.arm_next_epoch()
    c.install_next_epoch()
    with pytest.raises(EpochStateError):
        c.install_next_epoch()


@pytest.mark.parametrize("wrong", [0, 2, 5, 0xFFFFFFFF])
def test_arm_with_wrong_expected_epoch_raises(wrong: int) -> None:
    c, _ = pair()
    before = snapshot(c)
    with pytest.raises(EpochStateError):
        c.arm_next_epoch(expected_epoch=wrong)
    assert snapshot(c) == before
    assert c.arm_next_epoch(expected_epoch=1) == 1


def test_arm_before_sender_installed_previous_epoch_raises() -> None:
    c, s = pair()
    s.arm_next_epoch()
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()
    for _ in range(16):
        s.open(c.seal(b"x"))
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1
    assert s.epochs.install_pending and s.send_epoch == 0
    before = snapshot(s)
    with pytest.raises(EpochStateError):
        s.arm_next_epoch()
    with pytest.raises(EpochStateError):
        s.arm_next_epoch(expected_epoch=2)
    assert snapshot(s) == before
    s.install_next_epoch()
    # The peer already sends on epoch 1, so the sender's transition is over at once.
    assert s.epochs.tx_state_name == "STEADY"
    assert s.arm_next_epoch() == 2


def test_arm_then_install_is_atomic_on_receiving_side() -> None:
    """PROFILE §6: the endpoint that receives an authenticated CTRL_REKEY arms its receiver and
    installs its sender "at once". docs/protocol.md §5.2: a new rekey can be armed only once
    the previous one has finished on both halves.

    BUG: ``arm_next_epoch`` checks only that the sender has *installed* the current epoch
    (``tx_pending is None and tx_cur.epoch == rx_cur.epoch``), not that its transition has
    *completed*. A client that sent fewer than commit_threshold // 2 packets on epoch 1 and has
    no clock running (so the time-based completion never fires) can therefore arm epoch 2
    successfully, after which ``install_next_epoch`` raises EpochStateError ("sender already in
    transition"). The endpoint is left half-moved: receiver in TRANSITION towards epoch 2 with
    tx_pending set, sender still on epoch 1. Expected: either arm refuses (state unchanged) or
    install succeeds.
    """
    c, s = pair(commit_threshold=16)
    # Epoch 1, following PROFILE §6.
    s.arm_next_epoch()
    rec = c.open(s.seal(rekey_frame(1, KIND_ANNOUNCE), control=True))
    assert rec is not None
    c.arm_next_epoch(expected_epoch=1)
    c.install_next_epoch()
    ack = c.seal(rekey_frame(1, KIND_ACK), control=True)  # one packet: sender stays in phase 1
    assert s.open(ack) is not None
    s.install_next_epoch()
    for _ in range(16):
        assert c.open(s.seal(b"down")) is not None  # client receiver commits epoch 1
    s.commit_epoch_transition()  # server commits (e.g. its own transition timer expired)
    # The client's first packet from the server on epoch 1 ended its key_phase hint.
    assert c.epochs.rx_state_name == "STEADY" and c.epochs.tx_state_name == "STEADY"
    # Epoch 2 announced; the client tries to do both steps.
    s.arm_next_epoch(expected_epoch=2)
    rec = c.open(s.seal(rekey_frame(2, KIND_ANNOUNCE), control=True))
    assert rec is not None and parse_rekey(rec) == (2, KIND_ANNOUNCE)
    before = snapshot(c)
    try:
        c.arm_next_epoch(expected_epoch=2)
    except EpochStateError:
        assert snapshot(c) == before  # refusing is fine if it changes nothing
        return
    c.install_next_epoch()  # raises today: the arm above already changed the state
    assert c.send_epoch == 2


def test_higher_epoch_in_header_never_promotes() -> None:
    c, s = pair(commit_threshold=4)
    c.arm_next_epoch()
    c.install_next_epoch()
    before = snapshot(s)
    reasons: dict[str, int] = {}
    for i in range(50):  # far more than the threshold, phase 1 and then phase 0 packets
        if i == 2:
            c.complete_transition()
        pkt = c.seal(b"%d" % i)
        reason = "ErrorInvalidKeyPhase" if pkt[3] & 0x04 else "ErrorInvalidEpoch"
        expect_drop(s, pkt, reason)
        reasons[reason] = reasons.get(reason, 0) + 1
    assert reasons == {"ErrorInvalidKeyPhase": 2, "ErrorInvalidEpoch": 48}
    assert snapshot(s) == before
    assert (s.epoch, s.epochs.next_epoch, s.epochs.rx_state_name) == (0, None, "STEADY")
    old = RecordLayer(MASTER, True, RID)
    assert s.open(old.seal(b"epoch 0 still works")) is not None


def test_packet_of_wrong_epoch_rejected_without_state_change() -> None:
    """Armed for epoch 1; packets of epoch 2 (genuine keys) are ErrorInvalidEpoch, and neither
    key is spent on them (at most two attempts, both skipped because the epoch differs)."""
    c2 = client_at_epoch(2)
    assert c2.send_epoch == 2
    _, s = pair()
    s.arm_next_epoch()
    before = snapshot(s)
    for i in range(20):
        expect_drop(s, c2.seal(b"%d" % i), "ErrorInvalidEpoch")
    assert snapshot(s) == before
    # Same after commit to epoch 1 (the receiver is STEADY on 1, packets are epoch 2).
    s.commit_epoch_transition()
    before = snapshot(s)
    expect_drop(s, c2.seal(b"x"), "ErrorInvalidEpoch")
    assert snapshot(s) == before


def test_old_epoch_packets_rejected_after_commit() -> None:
    _, s = pair()
    old = RecordLayer(MASTER, True, RID)
    late = old.seal(b"sent on epoch 0, delivered late")
    s.arm_next_epoch()
    s.commit_epoch_transition()
    expect_drop(s, late, "ErrorInvalidEpoch")


# ----------------------------------------------------------------------------------------------
# Key erasure
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["explicit", "threshold", "timer", "timer_in_open"])
def test_old_receive_key_zeroed_after_commit(how: str) -> None:
    c, s = pair(commit_threshold=3, max_transition_time=1.0)
    s.arm_next_epoch(now=0.0)
    bufs = s.epochs.key_buffers()
    old_rx, next_rx = bufs["rx_cur"], bufs["rx_next"]
    next_copy = bytes(next_rx)
    assert any(old_rx) and any(next_rx)
    c.arm_next_epoch()
    c.install_next_epoch()
    c.complete_transition()
    if how == "explicit":
        s.commit_epoch_transition()
    elif how == "threshold":
        for _ in range(3):
            s.open(c.seal(b"x"))
    elif how == "timer":
        s.open(c.seal(b"x"), now=0.0)
        s.handle_timer(1.0)
    else:
        s.open(c.seal(b"x"), now=0.0)
        s.open(c.seal(b"y"), now=5.0)
    assert s.epochs.rx_state_name == "STEADY" and s.epoch == 1
    assert old_rx == bytearray(len(old_rx))
    assert s.epochs.key_buffers()["rx_cur"] is next_rx and bytes(next_rx) == next_copy


def test_old_send_key_zeroed_after_install() -> None:
    c, _ = pair()
    old_tx = c.epochs.key_buffers()["tx_cur"]
    assert any(old_tx)
    c.arm_next_epoch()
    pending = c.epochs.key_buffers()["tx_pending"]
    pending_copy = bytes(pending)
    c.install_next_epoch()
    assert old_tx == bytearray(len(old_tx))
    assert c.epochs.key_buffers()["tx_cur"] is pending and bytes(pending) == pending_copy


def test_all_superseded_keys_zeroed_over_many_epochs() -> None:
    c, s = pair(commit_threshold=2)
    retired: list[bytearray] = []
    for n in range(1, 6):
        retired += [s.epochs.key_buffers()["rx_cur"], c.epochs.key_buffers()["tx_cur"]]
        s.arm_next_epoch(expected_epoch=n)
        c.arm_next_epoch(expected_epoch=n)
        c.install_next_epoch()
        for _ in range(2):
            s.open(c.seal(b"x"))
        s.install_next_epoch()
        for _ in range(2):
            c.open(s.seal(b"y"))
        for _ in range(2):  # the client's hint ended with the server's first packet
            s.open(c.seal(b"z"))
        c.complete_transition() if c.epochs.tx_state_name == "TRANSITION" else None
        s.complete_transition() if s.epochs.tx_state_name == "TRANSITION" else None
        assert (c.epoch, s.epoch, c.send_epoch, s.send_epoch) == (n, n, n, n)
        for buf in retired:
            assert buf == bytearray(32)
    live = [bytes(b) for layer in (c, s) for b in layer.epochs.key_buffers().values()]
    assert all(any(b) for b in live)


# ----------------------------------------------------------------------------------------------
# Many rekeys, PROFILE §6 flow, lossless
# ----------------------------------------------------------------------------------------------


def profile_rekey(c: RecordLayer, s: RecordLayer, n: int, traffic: int) -> None:
    """Server announces epoch n; client arms + installs + acks; server installs on the ack."""
    assert s.arm_next_epoch(expected_epoch=n) == n
    rec = c.open(s.seal(rekey_frame(n, KIND_ANNOUNCE), control=True))
    assert rec is not None and parse_rekey(rec) == (n, KIND_ANNOUNCE)
    c.arm_next_epoch(expected_epoch=n)
    c.install_next_epoch()
    rec = s.open(c.seal(rekey_frame(n, KIND_ACK), control=True))
    assert rec is not None and rec.epoch == n and parse_rekey(rec) == (n, KIND_ACK)
    s.install_next_epoch()
    for i in range(traffic):
        r = s.open(c.seal(b"up %d/%d" % (n, i)))
        assert r is not None and r.epoch == n
        r = c.open(s.seal(b"down %d/%d" % (n, i)))
        assert r is not None and r.epoch == n


def test_fifty_sequential_rekeys_with_traffic_both_ways() -> None:
    c, s = pair()
    for i in range(5):
        assert s.open(c.seal(b"e0 %d" % i)) is not None
        assert c.open(s.seal(b"e0 %d" % i)) is not None
    for n in range(1, 51):
        profile_rekey(c, s, n, traffic=20)
        for layer in (c, s):
            e = layer.epochs
            assert (e.epoch, e.send_epoch, e.next_epoch) == (n, n, None)
            assert (e.rx_state_name, e.tx_state_name) == ("STEADY", "STEADY")
            assert not e.install_pending
    assert c.dropped == 0 and s.dropped == 0
    assert c.packets_opened == s.packets_opened == 5 + 50 * 21


# ----------------------------------------------------------------------------------------------
# Randomized two-party simulation over a lossy, reordering, duplicating link
# ----------------------------------------------------------------------------------------------


@dataclass(order=True)
class _InFlight:
    at: float
    order: int
    to_server: bool = field(compare=False)
    data: bytes = field(compare=False)


class Sim:
    """Client and server following PROFILE §6 over a link with loss, delay jitter, duplicates."""

    def __init__(self, seed: int, *, loss: float = 0.10, dup: float = 0.05,
                 rekey_every: int = 40, send_prob: float = 0.5,
                 replay_attack: float = 0.05) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.rekey_every = loss, dup, rekey_every
        self.send_prob, self.replay_attack = send_prob, replay_attack
        self.history: list[tuple[bool, bytes]] = []  # every packet put on the wire
        self.c, self.s = pair(commit_threshold=16, max_transition_time=0.5)
        self.now = 0.0
        self.queue: list[_InFlight] = []
        self.order = 0
        self.sent: dict[bool, int] = {True: 0, False: 0}  # data payloads sent, by to_server
        self.accepted: set[bytes] = set()
        self.announcing: int | None = None
        self.last_announce = -1.0
        self.server_packets_since_rekey = 0
        self.next_rekey_at = rekey_every
        self.rekeys_started = 0
        self.rekeys_done = 0
        self.lossless = False

    # -- link --------------------------------------------------------------------------------

    def send(self, to_server: bool, data: bytes) -> None:
        self.history.append((to_server, data))
        copies = 1 + (self.rng.random() < self.dup and not self.lossless)
        for _ in range(copies):
            if not self.lossless and self.rng.random() < self.loss:
                continue
            delay = 0.002 + self.rng.random() * (0.03 if not self.lossless else 0.0)
            self.order += 1
            heapq.heappush(self.queue, _InFlight(self.now + delay, self.order, to_server, data))

    def deliver_due(self) -> None:
        while self.queue and self.queue[0].at <= self.now:
            item = heapq.heappop(self.queue)
            if item.to_server:
                self.server_receive(self.s.open(item.data, now=self.now))
            else:
                self.client_receive(self.c.open(item.data, now=self.now))

    # -- endpoints ---------------------------------------------------------------------------

    def _data(self, layer: RecordLayer, to_server: bool) -> None:
        tag = b"%s:%d" % (b"c" if to_server else b"s", self.sent[to_server])
        self.sent[to_server] += 1
        self.send(to_server, layer.seal(tag, stream_id=1, now=self.now))

    def _record(self, rec: Record) -> None:
        if not rec.control:
            assert rec.payload not in self.accepted, rec.payload  # never accepted twice
            self.accepted.add(rec.payload)

    def server_receive(self, rec: Record | None) -> None:
        if rec is None:
            return
        self._record(rec)
        # Evidence that the client moved: its ack, or any packet on the new epoch.
        if self.announcing is not None and rec.epoch == self.announcing:
            self.s.install_next_epoch(now=self.now)
            self.announcing = None
            self.rekeys_done += 1

    def client_receive(self, rec: Record | None) -> None:
        if rec is None:
            return
        self._record(rec)
        frame = parse_rekey(rec)
        if frame is None or frame[1] != KIND_ANNOUNCE:
            return
        n = frame[0]
        c = self.c.epochs
        if n <= c.send_epoch:  # duplicate of an announcement already acted on: re-ack
            if n == c.send_epoch:
                self.send(True, self.c.seal(rekey_frame(n, KIND_ACK), control=True,
                                            now=self.now))
            return
        assert n == c.send_epoch + 1, (n, c.send_epoch)
        if c.rx_state_name == "TRANSITION":
            # The announcement for n arrived on epoch n-1: the server has moved; explicit commit.
            assert c.next_epoch == n - 1 and rec.epoch == n - 1
            self.c.commit_epoch_transition()
        self.c.arm_next_epoch(now=self.now, expected_epoch=n)
        self.c.install_next_epoch(now=self.now)
        self.send(True, self.c.seal(rekey_frame(n, KIND_ACK), control=True, now=self.now))

    def server_maybe_rekey(self) -> None:
        e = self.s.epochs
        if self.announcing is not None:
            if e.rx_state_name == "STEADY" and e.epoch + 1 == self.announcing:
                # Nothing on the new epoch within the bound: the machine abandoned it
                # (docs §5.1). Arm the same epoch again, as the session's retry does.
                self.s.arm_next_epoch(now=self.now, expected_epoch=self.announcing)
                self.last_announce = -1.0
            if self.now - self.last_announce >= 0.05:  # retransmit until evidence arrives
                self.last_announce = self.now
                self.send(False, self.s.seal(rekey_frame(self.announcing, KIND_ANNOUNCE),
                                             control=True, now=self.now))
            return
        if self.server_packets_since_rekey < self.next_rekey_at:
            return
        if e.rx_state_name != "STEADY" or e.install_pending:
            return
        self.announcing = self.s.arm_next_epoch(now=self.now, expected_epoch=e.epoch + 1)
        self.rekeys_started += 1
        self.server_packets_since_rekey = 0
        self.next_rekey_at = self.rng.randint(self.rekey_every // 2, self.rekey_every * 3 // 2)
        self.last_announce = self.now
        self.send(False, self.s.seal(rekey_frame(self.announcing, KIND_ANNOUNCE), control=True,
                                     now=self.now))

    # -- driver ------------------------------------------------------------------------------

    def step(self, allow_rekey: bool) -> None:
        self.now += 0.001
        self.deliver_due()
        self.c.handle_timer(self.now)
        self.s.handle_timer(self.now)
        if allow_rekey and self.history and self.rng.random() < self.replay_attack:
            # An on-path attacker re-injects any packet ever sent, from any epoch.
            to_server, data = self.history[self.rng.randrange(len(self.history))]
            self.order += 1
            heapq.heappush(self.queue, _InFlight(self.now, self.order, to_server, data))
        if allow_rekey:
            self.server_maybe_rekey()
        elif self.announcing is not None:
            self.server_maybe_rekey()  # finish the rekey in flight
        if self.rng.random() < self.send_prob:
            self._data(self.c, True)
        if self.rng.random() < self.send_prob:
            self._data(self.s, False)
            self.server_packets_since_rekey += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(allow_rekey=True)
        # Quiesce: no new rekeys, a clean link, enough traffic and time for every commit.
        self.lossless = True
        for _ in range(20000):
            self.step(allow_rekey=False)
            if (self.announcing is None and not self.queue
                    and self.c.epochs.rx_state_name == self.s.epochs.rx_state_name == "STEADY"
                    and self.c.epochs.tx_state_name == self.s.epochs.tx_state_name == "STEADY"):
                break
        self.now += 10.0
        self.deliver_due()


@pytest.mark.parametrize(("seed", "loss", "dup", "send_prob", "steps", "min_epochs"), [
    (1, 0.10, 0.05, 0.5, 6000, 30),
    (2, 0.10, 0.05, 0.5, 6000, 30),
    (3, 0.10, 0.05, 0.5, 6000, 30),
    (4, 0.10, 0.05, 0.5, 6000, 30),
    (5, 0.30, 0.20, 0.5, 6000, 20),   # heavy loss and duplication
    (6, 0.10, 0.05, 0.02, 60000, 10),  # sparse traffic: commits mostly by the transition timer
])
def test_randomized_rekey_simulation(seed: int, loss: float, dup: float, send_prob: float,
                                     steps: int, min_epochs: int) -> None:
    sim = Sim(seed, loss=loss, dup=dup, send_prob=send_prob)
    sim.run(steps)
    c, s = sim.c, sim.s
    # Both sides converge on one epoch, with nothing pending.
    assert sim.announcing is None
    assert c.epoch == s.epoch == c.send_epoch == s.send_epoch
    for layer in (c, s):
        e = layer.epochs
        assert (e.rx_state_name, e.tx_state_name, e.next_epoch) == ("STEADY", "STEADY", None)
        assert not e.install_pending
    assert sim.rekeys_done == sim.rekeys_started == c.epoch
    assert c.epoch >= min_epochs, c.epoch
    # No spurious AEAD failures, and nothing but the expected benign drops.
    for layer in (c, s):
        drops = layer.drop_counts
        assert "ErrorAEADDecryptFailed" not in drops, drops
        assert set(drops) <= {"replay", "ErrorInvalidEpoch", "ErrorInvalidKeyPhase"}, drops
    # Most data got through (the link loss, plus a few late packets of retired epochs).
    total_sent = sim.sent[True] + sim.sent[False]
    assert len(sim.accepted) >= (0.9 - loss) * total_sent, (len(sim.accepted), total_sent)
    # Both directions still work after all that.
    r = s.open(c.seal(b"final up"))
    assert r is not None and r.epoch == c.epoch
    r = c.open(s.seal(b"final down"))
    assert r is not None and r.epoch == s.epoch
