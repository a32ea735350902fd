"""Generate the device peer's known-answer vectors from the Python implementation.

    python firmware_bridge/vectors/generate.py     # rewrites device_vectors.json and .h
    python firmware_bridge/vectors/generate.py --header-only   # .h from the .json

Three groups (docs: firmware_bridge/DEVICE.md, "Known-answer vectors"):

* ``key_schedule``: the key schedule of docs/protocol.md §2 from fixed inputs.
* ``records``: packets sealed with header protection on epochs 0 and 1, in both directions.
* ``handshake``: one whole CORE handshake with fixed randomness: identity and KEM seeds,
  nonces, the session RID; the messages, the transcript hashes, the secrets, the ServerHello
  records a device sends at MTU 512, the ClientFinished ack and the first packets.

ML-KEM encapsulation and ML-DSA signing draw fresh randomness inside ``cryptography`` (it has
no deterministic entry point for them), so the ciphertext CT_c, CT_s and both signatures are
recorded as produced once, together with everything that follows deterministically from them:
decapsulation with the recorded seeds, signature verification, the transcript and the keys.
A device port that replays exactly those four values (firmware_bridge/c/test_device.c does)
must then produce every other byte of the vector.

The JSON file is the machine-readable form; the .h file carries the same bytes for the C
harness, which needs no JSON parser. tests/test_device_vectors.py checks that both agree with
this generator's output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

from palisade_c import handshake, hsrecord, wire
from palisade_c import keyschedule as ks
from palisade_c.config import Config
from palisade_c.connection import session_rid
from palisade_c.identity import Identity
from palisade_c.record import RecordLayer

HERE = Path(__file__).parent
JSON_PATH = HERE / "device_vectors.json"
HEADER_PATH = HERE / "device_vectors.h"

MTU = 512
NODE_ID = bytes.fromhex("0011223344556677")


def _fill(tag: int, n: int) -> bytes:
    """Recognisable fixed bytes: tag, tag+1, ... (mod 256)."""
    return bytes((tag + i) & 0xFF for i in range(n))


class _Counter:
    """A deterministic rng that hands out fixed blocks in call order."""

    def __init__(self, blocks: list[bytes]) -> None:
        self.blocks = list(blocks)

    def __call__(self, n: int) -> bytes:
        block = self.blocks.pop(0) if self.blocks else bytes(n)
        assert len(block) == n, (len(block), n)
        return block


def key_schedule() -> dict[str, Any]:
    ss_c, ss_s = _fill(0x10, 32), _fill(0x30, 32)
    cn, sn, th = _fill(0x50, 32), _fill(0x70, 32), _fill(0x90, 32)
    master = ks.master_secret(ks.handshake_secret(ks.early_ikm(ss_c, ss_s, cn, sn), th))
    e0 = ks.epoch0_secret(master)
    e1 = ks.next_epoch_secret(e0)
    out: dict[str, Any] = {
        "ss_c": ss_c, "ss_s": ss_s, "client_nonce": cn, "server_nonce": sn, "th": th,
        "master": bytes(master), "epoch0": bytes(e0), "epoch1": bytes(e1),
        "c2s_hp": bytes(ks.header_protection_key(master, b"c2s")),
        "s2c_hp": bytes(ks.header_protection_key(master, b"s2c")),
    }
    for n, secret in (("0", e0), ("1", e1)):
        for d in ("c2s", "s2c"):
            out[f"epoch{n}_{d}_key"] = bytes(ks.traffic_key(secret, d.encode()))
            out[f"epoch{n}_{d}_iv"] = bytes(ks.traffic_iv(secret, d.encode()))
    return out


def _records(master: bytes, rid: bytes, payload_s2c: bytes, payload_c2s: bytes
             ) -> dict[str, Any]:
    """The device's (server's) packets on epochs 0 and 1, and the client's it must open."""
    server = RecordLayer(master, False, rid)
    client = RecordLayer(master, True, rid)
    out: dict[str, Any] = {"master": master, "rid": rid, "payload_s2c": payload_s2c,
                           "payload_c2s": payload_c2s}
    out["s2c_epoch0"] = server.seal(payload_s2c, 0)
    out["c2s_epoch0"] = client.seal(payload_c2s, 0)
    # Epoch 1: the server's first packet after installing (key_phase 1, seq 0); the client's
    # after completing its transition (key_phase 0, seq 0), which a committed receiver takes.
    server.arm_next_epoch()
    server.install_next_epoch()
    out["s2c_epoch1"] = server.seal(payload_s2c, 0)
    client.arm_next_epoch()
    client.install_next_epoch()
    client.complete_transition()
    out["c2s_epoch1"] = client.seal(payload_c2s, 0)
    return out


def records() -> dict[str, Any]:
    return _records(_fill(0xA0, 32), NODE_ID + b"\x00\x00" + _fill(0xC0, 14),
                    b"sealed by the device", b"sealed by the client")


def handshake_vector() -> dict[str, Any]:
    client_id = Identity(mldsa.MLDSA65PrivateKey.from_seed_bytes(_fill(0x01, 32)))
    server_id = Identity(mldsa.MLDSA65PrivateKey.from_seed_bytes(_fill(0x02, 32)))
    client_kem_seed, server_kem_seed = _fill(0x03, 64), _fill(0x04, 64)
    client_nonce, server_nonce = _fill(0x05, 32), _fill(0x06, 32)
    rid_random = _fill(0x07, 7)  # then 7 check bytes over the hello RID (protocol.md §8.4)
    seeds = [client_kem_seed, server_kem_seed]

    def generate() -> mlkem.MLKEM768PrivateKey:
        return mlkem.MLKEM768PrivateKey.from_seed_bytes(seeds.pop(0))

    ccfg = Config(identity=client_id, trusted_peers=[server_id.public_key],
                  rng=_Counter([bytes(16), client_nonce]))
    scfg = Config(identity=server_id, trusted_peers=[client_id.public_key],
                  rng=_Counter([bytes(16), server_nonce]))
    with mock.patch.object(mlkem.MLKEM768PrivateKey, "generate", staticmethod(generate)):
        client = handshake.ClientHandshake(ccfg)
        server = handshake.ServerHandshake(scfg)
        ch = client.client_hello_bytes
        sh = server.on_client_hello(ch)
        cf = client.on_server_hello(sh)
        result = server.on_client_finished(cf)
    sh_msg = wire.ServerHello.decode(sh)
    cf_msg = wire.ClientFinished.decode(cf)
    ck = mlkem.MLKEM768PrivateKey.from_seed_bytes(client_kem_seed)
    sk = mlkem.MLKEM768PrivateKey.from_seed_bytes(server_kem_seed)
    ss_c = ck.decapsulate(sh_msg.ct_c)
    ss_s = sk.decapsulate(cf_msg.ct_s)
    h = hashes.Hash(hashes.SHA3_256())
    h.update(ch)
    h.update(sh_msg.transcript_bytes())
    signed = h.copy().finalize()
    h.update(cf_msg.transcript_bytes())
    th = h.finalize()
    master = bytes(result.master_secret)
    hello_rid = bytes(8) + b"\x00\x00" + _fill(0x08, 14)
    rid = session_rid(hello_rid, NODE_ID, rid_random)
    recs = _records(master, rid, b"hello from the device", b"hello from the client")
    return {
        "client_identity_seed": _fill(0x01, 32), "server_identity_seed": _fill(0x02, 32),
        "client_identity_pk": client_id.public_key, "server_identity_pk": server_id.public_key,
        "client_kem_seed": client_kem_seed, "server_kem_seed": server_kem_seed,
        "server_kem_pk": sk.public_key().public_bytes_raw(),
        "client_nonce": client_nonce, "server_nonce": server_nonce,
        "hello_rid": hello_rid, "rid": rid, "mtu": MTU,
        "ch": ch, "sh": sh, "cf": cf,
        "ct_c": sh_msg.ct_c, "ct_s": cf_msg.ct_s,
        "server_signature": sh_msg.server_signature,
        "client_signature": cf_msg.client_signature,
        "ss_c": ss_c, "ss_s": ss_s, "sh_signed_hash": signed, "th": th, "master": master,
        "ch_records": b"".join(_len16(r) for r in hsrecord.fragment_message(
            1, hello_rid, 0, ch, MTU)),
        "sh_records": b"".join(_len16(r) for r in hsrecord.fragment_message(
            2, rid, 0, sh, MTU)),
        "cf_records": b"".join(_len16(r) for r in hsrecord.fragment_message(
            3, rid, 1, cf, MTU)),
        "cf_ack": hsrecord.HandshakeAck(3, 1, [(0, len(cf))]).to_record(rid),
        "payload_s2c": recs["payload_s2c"], "payload_c2s": recs["payload_c2s"],
        "s2c_epoch0": recs["s2c_epoch0"], "c2s_epoch0": recs["c2s_epoch0"],
    }


def _len16(record: bytes) -> bytes:
    """Records concatenated as (u16 length, record) so that one byte string holds a list."""
    return len(record).to_bytes(2, "big") + record


def build() -> dict[str, dict[str, Any]]:
    return {"key_schedule": key_schedule(), "records": records(),
            "handshake": handshake_vector()}


def to_json(vectors: dict[str, dict[str, Any]]) -> str:
    def enc(v: Any) -> Any:
        return v.hex() if isinstance(v, (bytes, bytearray)) else v

    doc = {
        "description": "PALISADE device peer known-answer vectors, generated by "
                       "firmware_bridge/vectors/generate.py from the Python implementation. "
                       "Byte strings are hex; *_records are (u16 length, record) lists.",
        **{g: {k: enc(v) for k, v in group.items()} for g, group in vectors.items()},
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def to_header(vectors: dict[str, dict[str, Any]]) -> str:
    lines = ["/* Generated by firmware_bridge/vectors/generate.py - do not edit. */",
             "#ifndef PAL_DEVICE_VECTORS_H", "#define PAL_DEVICE_VECTORS_H", "",
             "#include <stddef.h>", "#include <stdint.h>", ""]
    for g, group in sorted(vectors.items()):
        for k, v in sorted(group.items()):
            name = f"V_{g}_{k}".upper()
            if isinstance(v, int):
                lines.append(f"#define {name} {v}u")
                continue
            data = bytes(v)
            body = ",".join(f"0x{b:02x}" for b in data) or "0"
            lines.append(f"static const uint8_t {name}[{max(len(data), 1)}] = {{{body}}};")
            lines.append(f"#define {name}_LEN {len(data)}u")
    lines += ["", "#endif", ""]
    return "\n".join(lines)


def from_json(text: str) -> dict[str, dict[str, Any]]:
    """Inverse of :func:`to_json` (the description dropped)."""
    doc = json.loads(text)
    return {g: {k: v if isinstance(v, int) else bytes.fromhex(v) for k, v in group.items()}
            for g, group in doc.items() if isinstance(group, dict)}


def main() -> int:
    # --header-only rewrites the C header from the JSON file without drawing new randomness.
    if "--header-only" not in sys.argv[1:]:
        JSON_PATH.write_text(to_json(build()))
    HEADER_PATH.write_text(to_header(from_json(JSON_PATH.read_text())))
    print(f"wrote {JSON_PATH} and {HEADER_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
