"""Full handshakes per second against the sum of the primitives one handshake needs.

Run: ``python bench/handshake.py`` (``--seconds`` per measurement, ``--rounds``).

One full PALISADE handshake (CH -> SH -> CF, both sides, in memory, through the real
Connection and ServerEndpoint objects, including fragmentation, reassembly, transcript hashing,
the key schedule and record-layer setup) needs exactly:

    ML-KEM-768  keygen x2, encapsulate x2, decapsulate x2
    ML-DSA-65   sign x2, verify x2 (each verify loads the peer's raw public key)

The benchmark times both in the same process, alternating every few calls, and prints the
ratio handshake / primitives: what the protocol machinery costs on top of the unavoidable maths.
"""

from __future__ import annotations

import argparse
import functools
import os

from _timing import paired_ratio as _paired_ratio
from _timing import pump as _pump
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.events import HandshakeCompleted
from palisade_c.handshake import ClientHandshake, ServerHandshake
from palisade_c.identity import Identity
from palisade_c.record import RecordLayer

_RID = bytes(24)
_SHA3 = hashes.SHA3_256()
_ECB = modes.ECB()
# Bytes of CH* + SH* + CF* each side hashes in a full handshake (ML-KEM-768, ML-DSA-65).
_TRANSCRIPT_BYTES = 8_700


def primitives_once(sig_key: mldsa.MLDSA65PrivateKey, sig_pub_raw: bytes) -> None:
    """Exactly the primitive operations of one full handshake."""
    transcript = os.urandom(32)
    for _ in range(2):
        kem = mlkem.MLKEM768PrivateKey.generate()
        peer = mlkem.MLKEM768PublicKey.from_public_bytes(kem.public_key().public_bytes_raw())
        _, ct = peer.encapsulate()
        kem.decapsulate(ct)
        sig = sig_key.sign(transcript, b"PALISADE server")
        mldsa.MLDSA65PublicKey.from_public_bytes(sig_pub_raw).verify(
            sig, transcript, b"PALISADE server"
        )


def symmetric_once(transcript: bytes) -> None:
    """The symmetric primitives one full handshake needs, straight from ``cryptography``: per
    side, one HKDF (extract and expand) and one expand for the key schedule, seven expands for
    the record layer (epoch 0, key and IV per direction, header protection per direction), two
    AES-ECB header-protection contexts, two ChaCha20-Poly1305 contexts and SHA3-256 over the
    transcript with one intermediate digest. Only informative: the target counts the KEM and
    signature operations alone."""
    secret = bytes(32)
    for _ in range(2):
        HKDF(_SHA3, 32, secret, b"PALISADE handshake").derive(secret)
        HKDFExpand(_SHA3, 32, b"PALISADE master").derive(secret)
        for label in (b"epoch 0", b"c2s key", b"c2s iv", b"s2c key", b"s2c iv", b"c2s hp",
                      b"s2c hp"):
            HKDFExpand(_SHA3, 32, b"PALISADE " + label).derive(secret)
        Cipher(algorithms.AES(secret), _ECB).encryptor()
        Cipher(algorithms.AES(secret), _ECB).encryptor()
        ChaCha20Poly1305(secret)
        ChaCha20Poly1305(secret)
        running = hashes.Hash(_SHA3)
        running.update(transcript)
        running.copy().finalize()
        running.finalize()


def handshake_once(client_cfg: Config, server: ServerEndpoint) -> None:
    """One client handshakes with a long-lived server endpoint, as on a real server; the
    server's events are drained as an application would."""
    client = Connection(client_cfg, True)
    client.connect(("server", 1), 0.0)
    _pump(client, server)
    completed = False
    while (item := server.next_event()) is not None:
        completed = completed or isinstance(item.event, HandshakeCompleted)
    if client.state != "C_ESTABLISHED" or not completed:
        raise RuntimeError("benchmark handshake did not complete")


def messages_once(client_cfg: Config, server_cfg: Config) -> None:
    """The message level alone: CH -> SH -> CF through the handshake objects, then both record
    layers. No datagrams, fragments, acks, timers, endpoint or state machines: what is left
    over the primitives here is the symmetric crypto the protocol requires (key schedule,
    record-layer keys and header-protection contexts, SHA3 transcripts) plus the codecs."""
    client = ClientHandshake(client_cfg)
    server = ServerHandshake(server_cfg)
    cf = client.on_server_hello(server.on_client_hello(client.client_hello_bytes))
    server_result = server.on_client_finished(cf)
    assert client.result is not None
    RecordLayer(client.result.master_secret, True, _RID)
    RecordLayer(server_result.master_secret, False, _RID)


def _median(results: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return sorted(results)[len(results) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="full handshake cost vs its primitives")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per round")
    ap.add_argument("--rounds", type=int, default=9, help="rounds (the median is reported)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the message level alone (handshake objects and record "
                         "layers, no datagram machinery) against the same primitives, and the "
                         "full handshake against the asymmetric and symmetric primitives "
                         "together")
    args = ap.parse_args(argv)

    client_id, server_id = Identity.generate(), Identity.generate()
    client_cfg = Config(identity=client_id, trusted_peers=[server_id.public_key])
    server_cfg = Config(identity=server_id, trusted_peers=[client_id.public_key])
    sig_key = mldsa.MLDSA65PrivateKey.generate()
    sig_pub = sig_key.public_key().public_bytes_raw()

    ratios: list[tuple[float, float, float]] = []
    for _ in range(args.rounds):
        server = ServerEndpoint(server_cfg)  # a fresh one per round: sessions accumulate
        ratios.append(_paired_ratio(functools.partial(handshake_once, client_cfg, server),
                                    lambda: primitives_once(sig_key, sig_pub), args.seconds))
    ratio, hs_t, prim_t = _median(ratios)
    print("full in-memory handshake (both sides) vs the primitives it needs, same process,")
    print(f"finely interleaved; median of {args.rounds} rounds of {args.seconds:g} s")
    print(f"  handshake:  {hs_t * 1e3:8.3f} ms  ({1 / hs_t:7.1f} handshakes/s)")
    print(f"  primitives: {prim_t * 1e3:8.3f} ms  (2x KEM keygen/encaps/decaps, "
          "2x ML-DSA sign/verify)")
    print(f"  ratio handshake / primitives: {ratio:.3f}  (KEM and signatures only; rounds "
          + ", ".join(f"{r[0]:.3f}" for r in sorted(ratios)) + ")")
    if args.floor:
        floors = [_paired_ratio(lambda: messages_once(client_cfg, server_cfg),
                                lambda: primitives_once(sig_key, sig_pub), args.seconds)
                  for _ in range(args.rounds)]
        f_ratio, f_t, _ = _median(floors)
        print(f"  message level only: {f_t * 1e3:8.3f} ms, ratio {f_ratio:.3f}  (no datagrams, "
              "acks, timers or state machines; rounds "
              + ", ".join(f"{r[0]:.3f}" for r in sorted(floors)) + ")")
        transcript = os.urandom(_TRANSCRIPT_BYTES)

        def everything() -> None:
            primitives_once(sig_key, sig_pub)
            symmetric_once(transcript)

        # A fresh server endpoint per round, as in the main measurement.
        alls = [_paired_ratio(functools.partial(handshake_once, client_cfg,
                                                ServerEndpoint(server_cfg)),
                              everything, args.seconds) for _ in range(args.rounds)]
        a_ratio, _, a_t = _median(alls)
        print(f"  with the symmetric primitives too (HKDF, AES-ECB and ChaCha20-Poly1305 setup, "
              f"SHA3): {a_t * 1e3:8.3f} ms, ratio {a_ratio:.3f}  (rounds "
              + ", ".join(f"{r[0]:.3f}" for r in sorted(alls)) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
