"""Record-layer throughput against the raw ChaCha20-Poly1305 primitive, in one process.

Run: ``python bench/record.py`` (``--seconds`` per measurement, default 1.0).

The machine is shared and noisy, so absolute packets/s mean little; the ratio
(ours / raw, both measured here, interleaved, best of several rounds) is the figure to track.
"""

from __future__ import annotations

import argparse
import os

from _timing import best_rates as _best_rates
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from palisade_c import RecordLayer

SIZES = (64, 1200)
BATCH = 256


def bench_size(size: int, seconds: float, rounds: int) -> dict[str, float]:
    payload = os.urandom(size)
    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = os.urandom(12)
    aad = os.urandom(45)
    enc, dec = aead.encrypt, aead.decrypt

    def raw() -> None:
        for _ in range(BATCH):
            dec(nonce, enc(nonce, payload, aad), aad)

    def ours() -> None:
        # Fresh layers per batch would measure setup; reuse one pair and let seq advance.
        for _ in range(BATCH):
            if open_(seal(payload)) is None:
                raise RuntimeError("benchmark packet was dropped")

    def ours_batch() -> None:
        recs = open_many(seal_many(payloads))
        if recs[-1] is None:
            raise RuntimeError("benchmark packet was dropped")

    master = os.urandom(32)
    rid = os.urandom(24)
    client = RecordLayer(master, True, rid)
    server = RecordLayer(master, False, rid)
    seal, open_ = client.seal, server.open
    seal_many, open_many = client.seal_many, server.open_many
    payloads = [payload] * BATCH

    best: dict[str, float] = _best_rates(
        {"raw": raw, "ours": ours, "ours_batch": ours_batch}, BATCH, seconds, rounds)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    args = ap.parse_args(argv)
    print("seal+open per packet vs raw ChaCha20Poly1305 encrypt+decrypt (same process)")
    print(f"{'size':>6} {'raw pkt/s':>12} {'ours pkt/s':>12} {'ratio':>7} "
          f"{'batch pkt/s':>12} {'ratio':>7}")
    for size in SIZES:
        r = bench_size(size, args.seconds, args.rounds)
        print(f"{size:>6} {r['raw']:>12,.0f} {r['ours']:>12,.0f} {r['ours'] / r['raw']:>7.2f} "
              f"{r['ours_batch']:>12,.0f} {r['ours_batch'] / r['raw']:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
