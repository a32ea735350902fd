"""The device peer's known-answer vectors (firmware_bridge/vectors/), checked against the
Python implementation and against the C core through palisade_c.device. The plain-C harness
checks the same bytes (tests/test_device_c.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from palisade_c import device, hsrecord, wire
from palisade_c import keyschedule as ks
from palisade_c.events import DataReceived
from palisade_c.identity import CLIENT_CONTEXT, SERVER_CONTEXT, Identity, verify_signature

VECTORS = Path(__file__).resolve().parent.parent / "firmware_bridge" / "vectors"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("device_vectors_gen",
                                                  VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()
V: dict[str, dict[str, Any]] = GEN.from_json((VECTORS / "device_vectors.json").read_text())


def _records(blob: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(blob):
        n = int.from_bytes(blob[off:off + 2], "big")
        out.append(blob[off + 2:off + 2 + n])
        off += 2 + n
    return out


def test_header_matches_the_json() -> None:
    assert (VECTORS / "device_vectors.h").read_text() == GEN.to_header(V)


def test_deterministic_groups_regenerate_identically() -> None:
    assert GEN.key_schedule() == V["key_schedule"]
    assert GEN.records() == V["records"]


def test_key_schedule_in_c() -> None:
    k = V["key_schedule"]
    master = device.master_secret(k["ss_c"], k["ss_s"], k["client_nonce"], k["server_nonce"],
                                  k["th"])
    assert master == k["master"]
    assert device.hkdf_expand(master, b"PALISADE epoch 0", 32) == k["epoch0"]
    assert device.hkdf_expand(k["epoch0"], b"PALISADE epoch step", 32) == k["epoch1"]
    for d in ("c2s", "s2c"):
        assert device.hkdf_expand(master, f"PALISADE {d} hp".encode(), 32) == k[f"{d}_hp"]
        for n in ("0", "1"):
            secret = k[f"epoch{n}"]
            assert device.hkdf_expand(secret, f"PALISADE {d} key".encode(), 32) \
                == k[f"epoch{n}_{d}_key"]
            assert device.hkdf_expand(secret, f"PALISADE {d} iv".encode(), 12) \
                == k[f"epoch{n}_{d}_iv"]


def _device(rid: bytes, master: bytes) -> device.Device:
    dev = device.Device(Identity.generate(), [], node_id=rid[:8], mtu=512)
    dev.install_master(master, rid)
    return dev


@pytest.mark.parametrize("group", ["records", "handshake"])
def test_records_in_c(group: str) -> None:
    r = V[group]
    master = r["master"]
    dev = _device(r["rid"], master)
    dev.send_data(r["payload_s2c"])
    assert [d for d, _ in dev.datagrams_to_send()] == [r["s2c_epoch0"]]
    dev.receive_datagram(r["c2s_epoch0"], "peer", 0.1)
    assert dev.next_event() == DataReceived(0, r["payload_c2s"])
    if group == "records":
        dev.step_epoch()
        dev.send_data(r["payload_s2c"])
        assert [d for d, _ in dev.datagrams_to_send()] == [r["s2c_epoch1"]]
        dev.receive_datagram(r["c2s_epoch1"], "peer", 0.2)
        events = [dev.next_event(), dev.next_event()]
        assert DataReceived(0, r["payload_c2s"]) in events
        dev.receive_datagram(r["c2s_epoch1"], "peer", 0.3)
        assert dev.drop_counts == {"replay": 1}


def test_handshake_transcript_in_python() -> None:
    h = V["handshake"]
    client = mldsa.MLDSA65PrivateKey.from_seed_bytes(h["client_identity_seed"])
    server = mldsa.MLDSA65PrivateKey.from_seed_bytes(h["server_identity_seed"])
    assert client.public_key().public_bytes_raw() == h["client_identity_pk"]
    assert server.public_key().public_bytes_raw() == h["server_identity_pk"]
    ch = wire.ClientHello.decode(h["ch"])
    sh = wire.ServerHello.decode(h["sh"])
    cf = wire.ClientFinished.decode(h["cf"])
    assert ch.client_nonce == h["client_nonce"] and sh.server_nonce == h["server_nonce"]
    ck = mlkem.MLKEM768PrivateKey.from_seed_bytes(h["client_kem_seed"])
    sk = mlkem.MLKEM768PrivateKey.from_seed_bytes(h["server_kem_seed"])
    assert ch.k_c == ck.public_key().public_bytes_raw()
    assert sh.k_s == sk.public_key().public_bytes_raw() == h["server_kem_pk"]
    assert ck.decapsulate(sh.ct_c) == h["ss_c"] and sk.decapsulate(cf.ct_s) == h["ss_s"]
    t = hashes.Hash(hashes.SHA3_256())
    t.update(h["ch"])
    t.update(sh.transcript_bytes())
    assert t.copy().finalize() == h["sh_signed_hash"]
    t.update(cf.transcript_bytes())
    assert t.finalize() == h["th"]
    assert verify_signature(sh.server_certificate, sh.server_signature, h["sh_signed_hash"],
                            SERVER_CONTEXT)
    assert verify_signature(ch.client_certificate, cf.client_signature, h["th"],
                            CLIENT_CONTEXT)
    ikm = ks.early_ikm(h["ss_c"], h["ss_s"], h["client_nonce"], h["server_nonce"])
    assert bytes(ks.master_secret(ks.handshake_secret(ikm, h["th"]))) == h["master"]
    assert device.master_secret(h["ss_c"], h["ss_s"], h["client_nonce"], h["server_nonce"],
                                h["th"]) == h["master"]
    assert _records(h["sh_records"]) == hsrecord.fragment_message(2, h["rid"], 0, h["sh"],
                                                                  h["mtu"])
    assert _records(h["ch_records"]) == hsrecord.fragment_message(1, h["hello_rid"], 0,
                                                                  h["ch"], h["mtu"])
    assert h["cf_ack"] == hsrecord.HandshakeAck(3, 1, [(0, len(h["cf"]))]).to_record(h["rid"])
    assert GEN._records(h["master"], h["rid"], h["payload_s2c"], h["payload_c2s"])[
        "s2c_epoch0"] == h["s2c_epoch0"]
