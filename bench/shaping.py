"""Traffic shaping costs: Mode 1's record path against Mode 0, and Mode 2's bandwidth.

Run: ``python bench/shaping.py`` (``--seconds`` per measurement, default 1.0).

1. Record path: ``send_data`` + ``datagrams_to_send`` on an established in-memory session,
   Mode 0 against Mode 1 (``pad:0-255``), next to raw ChaCha20-Poly1305 encryption of the
   same payload measured in the same run (interleaved, best of several rounds). The ratios
   are the figures to track; absolute packets/s depend on the shared machine.
2. Mode 2 bandwidth: a session in ``rate:PPS:SIZE`` driven on a virtual clock for a few
   application loads; wire bytes against the application bytes carried, and against what
   Mode 0 would have put on the wire for the same load. Deterministic (no wall clock).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from _timing import best_rates as _best_rates
from _timing import pump as _pump
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from palisade_c.config import PLUS_SHAPING, Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import BackPressureError
from palisade_c.identity import Identity
from palisade_c.shaping import RECORD_OVERHEAD, Shaping

BATCH = 256
SIZES = (64, 1000)
RATE = Shaping.rate(100, 400)
#: (name, packets per second, payload bytes) of the application loads for Mode 2.
LOADS = (("idle", 0, 0), ("chat 2 pkt/s x 80 B", 2, 80), ("voice 50 pkt/s x 160 B", 50, 160),
         ("bulk 100 pkt/s x 339 B", 100, 339), ("overload 200 pkt/s x 339 B", 200, 339))


def _session(shaping: Shaping) -> Connection:
    ci, si = Identity.generate(), Identity.generate()
    cc = Config(identity=ci, trusted_peers=[si.public_key], shaping=shaping,
                plus_features=PLUS_SHAPING, rekey_after_seconds=1e6, idle_timeout=1e6,
                keepalive_interval=1e5)
    sc = Config(identity=si, trusted_peers=[ci.public_key], plus_features=PLUS_SHAPING,
                rekey_after_seconds=1e6, idle_timeout=1e6, keepalive_interval=1e5)
    client = Connection(cc, True)
    server = ServerEndpoint(sc)
    client.connect(("server", 1), 0.0)
    _pump(client, server)
    if not client.established or client.shaping != shaping:
        raise RuntimeError("benchmark session did not come up as configured")
    return client


def _raw(size: int) -> Callable[[], None]:
    """A batch of raw ChaCha20-Poly1305 encryptions of ``size`` bytes."""
    payload = os.urandom(size)
    enc = ChaCha20Poly1305(os.urandom(32)).encrypt
    nonce, aad = os.urandom(12), os.urandom(45)

    def run() -> None:
        for _ in range(BATCH):
            enc(nonce, payload, aad)
    return run


def _sender(conn: Connection, size: int) -> Callable[[], None]:
    """A batch of send_data calls on ``conn``, then one drain of its output."""
    payload = os.urandom(size)
    send, drain = conn.send_data, conn.datagrams_to_send

    def run() -> None:
        for _ in range(BATCH):
            send(payload)
        drain()
    return run


def record_path(seconds: float, rounds: int) -> None:
    print("1. record path: send_data + datagrams_to_send, Mode 1 (pad:0-255, mean 127.5 B) vs "
          "Mode 0, against raw ChaCha20Poly1305 encryption (same process)")
    print(f"{'size':>6} {'raw pkt/s':>11} {'raw+127':>11} {'mode0':>11} {'mode1':>11} "
          f"{'m0/raw':>7} {'m1/raw':>7} {'m1/m0':>7} {'raw+127/raw':>12}")
    m0 = _session(Shaping())
    m1 = _session(Shaping.pad(0, 255))
    for size in SIZES:
        best = _best_rates({"raw": _raw(size), "rawpad": _raw(size + 127),
                            "m0": _sender(m0, size), "m1": _sender(m1, size)},
                           BATCH, seconds, rounds)
        print(f"{size:>6} {best['raw']:>11,.0f} {best['rawpad']:>11,.0f} {best['m0']:>11,.0f} "
              f"{best['m1']:>11,.0f} {best['m0'] / best['raw']:>7.2f} "
              f"{best['m1'] / best['raw']:>7.2f} {best['m1'] / best['m0']:>7.2f} "
              f"{best['rawpad'] / best['raw']:>12.2f}")
    print("(raw+127: the primitive on the payload plus the mean padding, the share of Mode 1's "
          "cost that is the extra bytes themselves)")


def _wire_bytes(shaping: Shaping, pps: int, size: int, duration: float) -> tuple[int, int, int]:
    """(wire bytes, application bytes carried, packets refused) over ``duration`` virtual
    seconds of an application sending ``pps`` packets of ``size`` bytes."""
    conn = _session(shaping)
    conn.datagrams_to_send(0.0)
    start = 1.0
    wire = carried = refused = 0
    app_next = start if pps else float("inf")
    now = start
    end = start + duration
    while now < end:
        timer = conn.get_timer()
        now = max(now, min(timer if timer is not None else end, app_next, end))
        if now >= end:
            break
        if timer is not None and timer <= now:
            conn.handle_timer(now)
        if app_next <= now:
            try:
                conn.send_data(b"a" * size, now=now)
                carried += size
            except BackPressureError:
                refused += 1
            app_next += 1.0 / pps
        wire += sum(len(d) for d, _ in conn.datagrams_to_send(now))
    return wire, carried, refused


def rate_overhead(duration: float) -> None:
    print(f"\n2. Mode 2 bandwidth, {RATE} ({RATE.a * RATE.b} B/s on the wire), "
          f"{duration:.0f} s of virtual time per load")
    print(f"{'application load':<28} {'app B/s':>9} {'mode2 B/s':>10} {'mode0 B/s':>10} "
          f"{'wire/app':>9} {'m2/m0':>7} {'refused':>8}")
    for name, pps, size in LOADS:
        w2, c2, refused = _wire_bytes(RATE, pps, size, duration)
        w0, _, _ = _wire_bytes(Shaping(), pps, size, duration)
        app = c2 / duration
        print(f"{name:<28} {app:>9,.0f} {w2 / duration:>10,.0f} {w0 / duration:>10,.0f} "
              f"{(w2 / c2 if c2 else float('inf')):>9.2f} "
              f"{(w2 / w0 if w0 else float('inf')):>7.2f} {refused:>8}")
    print(f"(each Mode 2 packet: {RATE.b} B on the wire, at most {RATE.b - RECORD_OVERHEAD} B "
          "of payload; Mode 0 packets carry 61 B of headers and tag each)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    ap.add_argument("--duration", type=float, default=20.0,
                    help="virtual seconds per Mode 2 load")
    args = ap.parse_args(argv)
    record_path(args.seconds, args.rounds)
    rate_overhead(args.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
