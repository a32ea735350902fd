"""Independent re-computation of the PALISADE v1.2 key schedule and wire format (PROFILE §3, §4).

Nothing here calls palisade_c to compute an expected value: the reference derivations use
``cryptography``'s HKDF/HKDFExpand with SHA3-256 (and, as a second opinion, an RFC 5869 HKDF
written on the standard library's hmac + hashlib.sha3_256). The wire-format tests decrypt a
packet produced by ``RecordLayer.seal`` by hand, and hand-build packets that ``RecordLayer.open``
must accept; together they pin the on-wire format independently of the implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA3_256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from palisade_c import RecordLayer
from palisade_c import keyschedule as ks

MASTER = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
RID = bytes(range(0xA0, 0xA0 + 24))


def fast(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Reference key schedule (independent of palisade_c)
# ----------------------------------------------------------------------------------------------


def L(x: bytes) -> bytes:  # the spec's name for it
    return b"PALISADE " + x


def ref_expand(prk: bytes, info: bytes, n: int) -> bytes:
    return HKDFExpand(SHA3_256(), n, info).derive(bytes(prk))


def ref_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract = HMAC-Hash(salt, IKM) (RFC 5869 §2.2), on the standard library."""
    return hmac.new(bytes(salt), bytes(ikm), hashlib.sha3_256).digest()


def stdlib_expand(prk: bytes, info: bytes, n: int) -> bytes:
    """RFC 5869 §2.3 HKDF-Expand on the standard library (second opinion on cryptography)."""
    out, t, i = b"", b"", 1
    while len(out) < n:
        t = hmac.new(bytes(prk), t + info + bytes([i]), hashlib.sha3_256).digest()
        out += t
        i += 1
    return out[:n]


def ref_epoch_secret(master: bytes, n: int) -> bytes:
    s = ref_expand(master, L(b"epoch 0"), 32)
    for _ in range(n):
        s = ref_expand(s, L(b"epoch step"), 32)
    return s


def ref_traffic(master: bytes, epoch: int, d: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) of direction d (b"c2s" / b"s2c") in ``epoch``."""
    es = ref_epoch_secret(master, epoch)
    return (ref_expand(es, L(d + b" key"), 32), ref_expand(es, L(d + b" iv"), 12),
            ref_expand(master, L(d + b" hp"), 32))


def ref_nonce(iv: bytes, epoch: int, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, struct.pack(">IQ", epoch, seq), strict=True))


def aes_ecb(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def hand_open(pkt: bytes, master: bytes, epoch: int, d: bytes) -> dict:
    """Parse and decrypt a packet with reference keys only. Raises on any mismatch."""
    key, iv, hp = ref_traffic(master, epoch, d)
    assert pkt[:2] == b"QP"
    assert pkt[2] == 0x12
    flags = pkt[3]
    (length,) = struct.unpack(">H", pkt[4:6])
    assert length == len(pkt) - 30
    rid = pkt[6:30]
    mask = aes_ecb(hp, pkt[45:61])[:15]
    enc_hdr = bytes(a ^ b for a, b in zip(pkt[30:45], mask, strict=True))
    ep, seq, stream, pad = struct.unpack(">IQBH", enc_hdr)
    aad = pkt[:30] + enc_hdr
    pt = ChaCha20Poly1305(key).decrypt(ref_nonce(iv, ep, seq), pkt[45:], aad)
    assert pt[len(pt) - pad:] == bytes(pad)
    return {"flags": flags, "rid": rid, "epoch": ep, "seq": seq, "stream": stream, "pad": pad,
            "payload": pt[:len(pt) - pad], "plaintext": pt}


def hand_seal(payload: bytes, *, master: bytes, rid: bytes, epoch: int, seq: int, d: bytes,
              stream: int = 0, pad: int = 0, flags: int = 0, pad_bytes: bytes | None = None,
              key_epoch: int | None = None) -> bytes:
    """Build a packet from scratch with reference keys."""
    key, iv, _ = ref_traffic(master, epoch if key_epoch is None else key_epoch, d)
    hp = ref_expand(master, L(d + b" hp"), 32)
    pad_bytes = bytes(pad) if pad_bytes is None else pad_bytes
    ct_len = len(payload) + len(pad_bytes) + 16
    pub = b"QP" + bytes([0x12, flags]) + struct.pack(">H", 15 + ct_len) + rid
    enc_hdr = struct.pack(">IQBH", epoch, seq, stream, pad)
    ct = ChaCha20Poly1305(key).encrypt(ref_nonce(iv, epoch, seq), payload + pad_bytes,
                                       pub + enc_hdr)
    mask = aes_ecb(hp, ct[:16])[:15]
    return pub + bytes(a ^ b for a, b in zip(enc_hdr, mask, strict=True)) + ct


# ----------------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------------


def test_reference_hkdf_agrees_with_stdlib_hkdf() -> None:
    prk = bytes(range(32))
    for n in (12, 32, 33, 64, 100):
        assert ref_expand(prk, b"info", n) == stdlib_expand(prk, b"info", n)
    # HKDF with an explicit salt == Expand(Extract(salt, ikm)).
    full = HKDF(SHA3_256(), 32, b"salt", b"info").derive(b"ikm")
    assert full == stdlib_expand(ref_extract(b"salt", b"ikm"), b"info", 32)


# ----------------------------------------------------------------------------------------------
# Labels and the pure derivations
# ----------------------------------------------------------------------------------------------


def test_label_prefix() -> None:
    assert ks.LABEL_PREFIX == b"PALISADE "
    assert ks.label(b"master") == b"PALISADE master"
    assert ks.label(b"") == b"PALISADE "
    assert ks.label(b"c2s key") == b"PALISADE c2s key"
    assert ks.DIR_C2S == b"c2s" and ks.DIR_S2C == b"s2c"


def test_constants() -> None:
    assert (ks.SECRET_LEN, ks.KEY_LEN, ks.IV_LEN, ks.HP_LEN) == (32, 32, 12, 32)


@pytest.mark.parametrize("bad", [0, 1, 16, 31, 33, 48, 64])
def test_combine_kem_secrets_rejects_wrong_lengths(bad: int) -> None:
    ok = bytes(32)
    with pytest.raises(ValueError):
        ks.combine_kem_secrets(bytes(bad), ok)
    with pytest.raises(ValueError):
        ks.combine_kem_secrets(ok, bytes(bad))
    with pytest.raises(ValueError):
        ks.early_ikm(bytes(bad), ok, b"n" * 32, b"m" * 32)
    with pytest.raises(ValueError):
        ks.early_ikm(ok, bytes(bad), b"n" * 32, b"m" * 32)


def test_combine_kem_secrets_is_xor() -> None:
    a = bytes(range(32))
    b = bytes(range(100, 132))
    out = ks.combine_kem_secrets(a, b)
    assert isinstance(out, bytearray)
    assert bytes(out) == bytes(x ^ y for x, y in zip(a, b, strict=True))
    assert bytes(ks.combine_kem_secrets(a, a)) == bytes(32)


@fast(60)
@given(ss_c=st.binary(min_size=32, max_size=32), ss_s=st.binary(min_size=32, max_size=32),
       cn=st.binary(min_size=0, max_size=40), sn=st.binary(min_size=0, max_size=40),
       th=st.binary(min_size=32, max_size=32),
       psk=st.one_of(st.none(), st.binary(min_size=32, max_size=32)))
def test_handshake_chain_matches_reference(ss_c: bytes, ss_s: bytes, cn: bytes, sn: bytes,
                                           th: bytes, psk: bytes | None) -> None:
    ikm = L(b"palisade v1.2 early") + bytes(x ^ y for x, y in zip(ss_c, ss_s, strict=True)) \
        + cn + sn
    got_ikm = ks.early_ikm(ss_c, ss_s, cn, sn)
    assert isinstance(got_ikm, bytearray)
    assert bytes(got_ikm) == ikm

    early = ref_extract(bytes(32) if psk is None else psk, ikm)
    hs = ref_expand(early, L(b"handshake") + th, 32)
    got_hs = ks.handshake_secret(got_ikm, th, psk)
    assert isinstance(got_hs, bytearray) and bytes(got_hs) == hs
    # hkdf_extract is the bare Extract step
    assert bytes(ks.hkdf_extract(bytes(32) if psk is None else psk, ikm)) == early

    master = ref_expand(hs, L(b"master"), 32)
    got_master = ks.master_secret(got_hs)
    assert isinstance(got_master, bytearray) and bytes(got_master) == master
    assert bytes(ks.resumption_secret(got_master)) == ref_expand(master, L(b"resumption"), 32)


def test_psk_salt_changes_the_handshake_secret() -> None:
    ikm = bytes(ks.early_ikm(bytes(32), bytes(range(32)), b"c" * 32, b"s" * 32))
    th = hashlib.sha3_256(b"transcript").digest()
    a = ks.handshake_secret(ikm, th)
    b = ks.handshake_secret(ikm, th, bytes(32))  # explicit zero salt == default
    c = ks.handshake_secret(ikm, th, b"\x01" * 32)
    assert a == b
    assert a != c


@fast(40)
@given(master=st.binary(min_size=32, max_size=32), n=st.integers(0, 6))
def test_epoch_and_traffic_secrets_match_reference(master: bytes, n: int) -> None:
    e0 = ks.epoch0_secret(master)
    assert isinstance(e0, bytearray)
    assert bytes(e0) == ref_expand(master, L(b"epoch 0"), 32)
    s = e0
    for _ in range(n):
        s = ks.next_epoch_secret(s)
        assert isinstance(s, bytearray) and len(s) == 32
    assert bytes(s) == ref_epoch_secret(master, n)
    for d in (b"c2s", b"s2c"):
        key, iv, hp = ref_traffic(master, n, d)
        got_key, got_iv = ks.traffic_key(s, d), ks.traffic_iv(s, d)
        got_hp = ks.header_protection_key(master, d)
        assert isinstance(got_key, bytearray) and bytes(got_key) == key and len(key) == 32
        assert isinstance(got_iv, bytearray) and bytes(got_iv) == iv and len(iv) == 12
        assert isinstance(got_hp, bytearray) and bytes(got_hp) == hp and len(hp) == 32


def test_known_master_derivations_are_distinct() -> None:
    values = [ref_epoch_secret(MASTER, 0), ref_epoch_secret(MASTER, 1)]
    for e in (0, 1):
        for d in (b"c2s", b"s2c"):
            k, iv, _ = ref_traffic(MASTER, e, d)
            values += [k, iv]
    values += [ref_expand(MASTER, L(b"c2s hp"), 32), ref_expand(MASTER, L(b"s2c hp"), 32),
               ref_expand(MASTER, L(b"resumption"), 32)]
    assert len(set(values)) == len(values)


def test_hkdf_helpers_match_reference() -> None:
    assert bytes(ks.hkdf_expand(MASTER, b"x", 45)) == ref_expand(MASTER, b"x", 45)
    assert bytes(ks.hkdf_extract(b"salt", b"ikm")) == ref_extract(b"salt", b"ikm")


def test_wipe_zeroes_in_place() -> None:
    buf = bytearray(b"\xff" * 40)
    ks.wipe(buf)
    assert buf == bytearray(40)
    ks.wipe(None)
    secret = ks.traffic_key(MASTER, b"c2s")
    ks.wipe(secret)
    assert secret == bytearray(32)


# ----------------------------------------------------------------------------------------------
# The epoch machine holds exactly the reference keys
# ----------------------------------------------------------------------------------------------


def test_epoch_machine_keys_match_reference() -> None:
    client = RecordLayer(MASTER, True, RID)
    server = RecordLayer(MASTER, False, RID)
    kc = client.epochs.key_buffers()
    kserv = server.epochs.key_buffers()
    assert bytes(kc["tx_cur"]) == ref_traffic(MASTER, 0, b"c2s")[0]
    assert bytes(kc["rx_cur"]) == ref_traffic(MASTER, 0, b"s2c")[0]
    assert bytes(kserv["tx_cur"]) == ref_traffic(MASTER, 0, b"s2c")[0]
    assert bytes(kserv["rx_cur"]) == ref_traffic(MASTER, 0, b"c2s")[0]
    for n in (1, 2, 3):
        client.arm_next_epoch(expected_epoch=n)
        kc = client.epochs.key_buffers()
        assert bytes(kc["rx_next"]) == ref_traffic(MASTER, n, b"s2c")[0]
        assert bytes(kc["tx_pending"]) == ref_traffic(MASTER, n, b"c2s")[0]
        client.install_next_epoch()
        client.commit_epoch_transition()
        client.complete_transition()
        kc = client.epochs.key_buffers()
        assert bytes(kc["tx_cur"]) == ref_traffic(MASTER, n, b"c2s")[0]
        assert bytes(kc["rx_cur"]) == ref_traffic(MASTER, n, b"s2c")[0]


# ----------------------------------------------------------------------------------------------
# Wire format, implementation -> reference
# ----------------------------------------------------------------------------------------------


def test_hand_decrypt_client_packet_epoch0() -> None:
    client = RecordLayer(MASTER, True, RID)
    pkt = client.seal(b"hello, palisade", stream_id=7)
    assert len(pkt) == 30 + 15 + len(b"hello, palisade") + 16
    got = hand_open(pkt, MASTER, 0, b"c2s")
    assert got == {"flags": 0, "rid": RID, "epoch": 0, "seq": 0, "stream": 7, "pad": 0,
                   "payload": b"hello, palisade", "plaintext": b"hello, palisade"}


def test_hand_decrypt_sequence_and_nonces() -> None:
    client = RecordLayer(MASTER, True, RID)
    key, iv, _ = ref_traffic(MASTER, 0, b"c2s")
    for seq in range(5):
        payload = bytes([seq]) * (seq * 7)
        pkt = client.seal(payload, stream_id=seq, pad=seq * 3)
        got = hand_open(pkt, MASTER, 0, b"c2s")
        assert (got["seq"], got["stream"], got["pad"], got["payload"]) == \
            (seq, seq, seq * 3, payload)
        assert got["plaintext"] == payload + bytes(seq * 3)
        assert len(pkt) == 61 + len(payload) + seq * 3
        # The header really is masked (otherwise the epoch/seq bytes would be visible in clear).
        assert pkt[30:45] != struct.pack(">IQBH", 0, seq, seq, seq * 3)
        # And only the right nonce opens it: the seq is part of the nonce.
        aad = pkt[:30] + struct.pack(">IQBH", 0, seq, seq, seq * 3)
        with pytest.raises(Exception):  # noqa: B017 - InvalidTag
            ChaCha20Poly1305(key).decrypt(ref_nonce(iv, 0, seq + 1), pkt[45:], aad)


def test_hand_decrypt_flags_control_and_key_phase_on_epoch1() -> None:
    client = RecordLayer(MASTER, True, RID)
    client.seal(b"burn seq 0")
    client.arm_next_epoch()
    client.install_next_epoch()
    pkt = client.seal(b"\x01\x00\x00\x05\x00\x00\x00\x01\x02", control=True)
    got = hand_open(pkt, MASTER, 1, b"c2s")
    assert got["flags"] == 0x01 | 0x04
    assert (got["epoch"], got["seq"]) == (1, 0)
    assert got["payload"] == b"\x01\x00\x00\x05\x00\x00\x00\x01\x02"
    # The epoch-0 keys cannot open an epoch-1 packet.
    with pytest.raises(Exception):  # noqa: B017
        hand_open(pkt, MASTER, 0, b"c2s")


def test_hand_decrypt_server_packet() -> None:
    server = RecordLayer(MASTER, False, RID)
    pkt = server.seal(b"from the server", stream_id=0xFE, pad=9)
    got = hand_open(pkt, MASTER, 0, b"s2c")
    assert (got["epoch"], got["seq"], got["stream"], got["pad"]) == (0, 0, 0xFE, 9)
    assert got["payload"] == b"from the server"
    with pytest.raises(Exception):  # noqa: B017 - wrong direction
        hand_open(pkt, MASTER, 0, b"c2s")


def test_hand_decrypt_sequence_at_rekey_threshold() -> None:
    from palisade_c.epoch import SEQ_REKEY_THRESHOLD

    client = RecordLayer(MASTER, True, RID)
    client.epochs._debug_set_tx_seq(SEQ_REKEY_THRESHOLD + 0x1234)
    got = hand_open(client.seal(b"late"), MASTER, 0, b"c2s")
    assert got["seq"] == SEQ_REKEY_THRESHOLD + 0x1234


# ----------------------------------------------------------------------------------------------
# Wire format, reference -> implementation
# ----------------------------------------------------------------------------------------------


def test_open_accepts_hand_built_packet() -> None:
    server = RecordLayer(MASTER, False, RID)
    pkt = hand_seal(b"built by hand", master=MASTER, rid=RID, epoch=0, seq=0, d=b"c2s",
                    stream=3)
    rec = server.open(pkt)
    assert rec is not None
    assert (rec.payload, rec.stream_id, rec.epoch, rec.seq, rec.control) == \
        (b"built by hand", 3, 0, 0, False)


def test_open_accepts_hand_built_variants() -> None:
    server = RecordLayer(MASTER, False, RID)
    client = RecordLayer(MASTER, True, RID)
    rec = server.open(hand_seal(b"padded", master=MASTER, rid=RID, epoch=0, seq=10,
                                d=b"c2s", pad=100))
    assert rec is not None and rec.payload == b"padded" and rec.seq == 10
    rec = server.open(hand_seal(b"ctl", master=MASTER, rid=RID, epoch=0, seq=11, d=b"c2s",
                                flags=0x01))
    assert rec is not None and rec.control and rec.payload == b"ctl"
    rec = server.open(hand_seal(b"", master=MASTER, rid=RID, epoch=0, seq=12, d=b"c2s"))
    assert rec is not None and rec.payload == b""
    # A hand-built dummy is authenticated and swallowed.
    assert server.open(hand_seal(b"xx", master=MASTER, rid=RID, epoch=0, seq=13, d=b"c2s",
                                 stream=0xFF)) is None
    assert server.dummies_received == 1
    # The receiver's window is a u64 window: a huge seq from the peer is fine.
    rec = server.open(hand_seal(b"far", master=MASTER, rid=RID, epoch=0, seq=(1 << 64) - 1,
                                d=b"c2s"))
    assert rec is not None and rec.seq == (1 << 64) - 1
    # s2c direction, opened by the client.
    rec = client.open(hand_seal(b"down", master=MASTER, rid=RID, epoch=0, seq=0, d=b"s2c"))
    assert rec is not None and rec.payload == b"down"
    assert server.dropped == 0 and client.dropped == 0


def test_open_accepts_hand_built_epoch1_packet_after_arming() -> None:
    server = RecordLayer(MASTER, False, RID)
    pkt = hand_seal(b"epoch one", master=MASTER, rid=RID, epoch=1, seq=0, d=b"c2s", flags=0x04)
    assert server.open(pkt) is None  # not armed: key_phase 1 in STEADY
    assert server.drop_counts == {"ErrorInvalidKeyPhase": 1}
    server.arm_next_epoch()
    pkt = hand_seal(b"epoch one", master=MASTER, rid=RID, epoch=1, seq=1, d=b"c2s", flags=0x04)
    rec = server.open(pkt)
    assert rec is not None and rec.epoch == 1 and rec.payload == b"epoch one"


def test_open_rejects_hand_built_packets_with_wrong_content() -> None:
    server = RecordLayer(MASTER, False, RID)
    # Authentic, but the padding bytes are not zero.
    pkt = hand_seal(b"p", master=MASTER, rid=RID, epoch=0, seq=1, d=b"c2s", pad=4,
                    pad_bytes=b"\x00\x00\x01\x00")
    assert server.open(pkt) is None
    assert server.drop_counts == {"bad-padding": 1}
    # Header says epoch 0, but it is sealed with the epoch-1 key.
    pkt = hand_seal(b"p", master=MASTER, rid=RID, epoch=0, seq=2, d=b"c2s", key_epoch=1)
    assert server.open(pkt) is None
    assert server.drop_counts["ErrorAEADDecryptFailed"] == 1
    # Wrong direction's keys (the header unmasks to garbage with the wrong hp key).
    pkt = hand_seal(b"p", master=MASTER, rid=RID, epoch=0, seq=3, d=b"s2c")
    before = server.dropped
    assert server.open(pkt) is None
    assert server.dropped == before + 1
    # pad_len larger than the plaintext: dropped before any AEAD attempt.
    pkt = hand_seal(b"", master=MASTER, rid=RID, epoch=0, seq=4, d=b"c2s", pad=1,
                    pad_bytes=b"")
    before = server.drop_counts.get("bad-padding", 0)
    assert server.open(pkt) is None
    assert server.drop_counts["bad-padding"] == before + 1
    # Early-data epoch 0xFFFFFFFF is not a data-plane epoch of this layer.
    pkt = hand_seal(b"0rtt", master=MASTER, rid=RID, epoch=0xFFFFFFFF, seq=1, d=b"c2s",
                    key_epoch=0)
    assert server.open(pkt) is None
    assert server.drop_counts["ErrorInvalidEpoch"] == 1
    assert server.packets_opened == 0
    # After all that, seq 1..4 are still unspent: the genuine packets open.
    for seq in (1, 2, 3, 4):
        rec = server.open(hand_seal(b"ok", master=MASTER, rid=RID, epoch=0, seq=seq, d=b"c2s"))
        assert rec is not None and rec.seq == seq


def test_round_trip_hand_built_and_sealed_are_identical() -> None:
    """seal() is deterministic given keys and state: it must equal the hand-built packet."""
    client = RecordLayer(MASTER, True, RID)
    for seq, (payload, stream, pad, control) in enumerate(
            [(b"a", 0, 0, False), (b"bb" * 50, 9, 17, False), (b"", 0xFE, 0, False),
             (b"\x03\x00\x00\x00", 0, 0, True)]):
        pkt = client.seal(payload, stream_id=stream, pad=pad, control=control)
        assert pkt == hand_seal(payload, master=MASTER, rid=RID, epoch=0, seq=seq, d=b"c2s",
                                stream=stream, pad=pad, flags=0x01 if control else 0)
