"""Serial link benchmarks (firmware_bridge, PROFILE §10), each against a reference in one process.

Run: ``python bench/serial.py`` (``--seconds`` per measurement, ``--rounds``). Needs the
``cobs`` package (``pip install cobs``) for the reference.

Framing: one frame encoded and decoded back, ``palisade_c.link`` (the C codec shared with the
firmware) against the same frame built with ``cobs.cobs.encode`` + ``zlib.crc32`` and checked
with ``cobs.cobs.decode`` + ``zlib.crc32``. The reference decodes a frame it already knows the
end of, which flatters it; ours runs its full streaming decoder. Two shapes: one frame per call
(a device trickling frames) and a stream of frames decoded from one read (a serial read of
several frames at once). The machine is shared and noisy, so the ratio (ours / reference, both
measured here, interleaved, best of several rounds) is the figure to track.

Handshake over a paced pty: a full PALISADE handshake between a server on one end of a virtual
serial line (palisade_c.transport.pty: two pty pairs joined by a pump paced to ``--baud``,
115200 by default) and a client on the other, both through the real serial transport, against
its wire time: the handshake's bytes x 10 / baud, as if the line carried one direction at a
time. It is a yardstick, not a hard floor: the line is full duplex, so acks crossing while a
reply arrives let a run come in a hair under 1.0 (framing bytes, not counted, work the other
way). The time runs from the client's ClientHello until *both* sides hold keys (the server
has verified the ClientFinished). Target: ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import zlib

from _timing import best_rates as _best_rates

from palisade_c import link

try:
    from cobs import cobs  # type: ignore[import-untyped, import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("bench/serial.py needs the reference COBS codec: pip install cobs")

SIZES = (64, 512)
BATCH = 256  # frames per timed call; also the length of the stream in the stream shape


# --- framing ------------------------------------------------------------------------------------


def reference_encode(channel: int, payload: bytes) -> bytes:
    body = bytes((channel,)) + payload
    return bytes(cobs.encode(body + struct.pack("<I", zlib.crc32(body)))) + b"\x00"


def reference_decode(chunk: bytes) -> tuple[int, bytes] | None:
    """One frame without its delimiter, or None when it fails its CRC."""
    body = cobs.decode(chunk)
    if zlib.crc32(body[:-4]) != int.from_bytes(body[-4:], "little"):
        return None
    return body[0], body[1:-4]


def bench_framing_size(size: int, seconds: float, rounds: int) -> dict[str, float]:
    payload = os.urandom(size)
    want = (link.CHANNEL_DATA, payload)
    stream = link.encode_frame(*want) * BATCH
    if stream != reference_encode(*want) * BATCH:
        raise RuntimeError("codec and reference disagree on the wire bytes")
    decoder = link.FrameDecoder(max_payload=max(size, link.DEFAULT_MTU))
    encode, feed = link.encode_frame, decoder.feed

    def ref_frame() -> None:
        for _ in range(BATCH):
            if reference_decode(reference_encode(0, payload)[:-1]) != want:
                raise RuntimeError("reference round trip failed")

    def ours_frame() -> None:
        for _ in range(BATCH):
            if feed(encode(0, payload)) != [want]:
                raise RuntimeError("codec round trip failed")

    def ref_stream() -> None:
        wire = b"".join([reference_encode(0, payload) for _ in range(BATCH)])
        frames = [reference_decode(chunk) for chunk in wire.split(b"\x00")[:-1]]
        if len(frames) != BATCH or frames[-1] != want:
            raise RuntimeError("reference stream failed")

    def ours_stream() -> None:
        frames = feed(b"".join([encode(0, payload) for _ in range(BATCH)]))
        if len(frames) != BATCH or frames[-1] != want:
            raise RuntimeError("codec stream failed")

    shapes = {
        "ref_frame": ref_frame,
        "ours_frame": ours_frame,
        "ref_stream": ref_stream,
        "ours_stream": ours_stream,
    }
    best: dict[str, float] = _best_rates(shapes, BATCH, seconds, rounds)
    if decoder.frames == 0 or any(decoder.counters()[k] for k in ("crc_errors", "cobs_errors")):
        raise RuntimeError(f"decoder reported errors: {decoder.counters()}")
    return best


def print_framing(seconds: float, rounds: int) -> None:
    print("framing: encode + decode per frame, palisade_c.link vs cobs + zlib.crc32 (same process)")
    print(f"{'size':>6} {'shape':>8} {'ref frames/s':>13} {'ours frames/s':>14} {'ratio':>7}")
    for size in SIZES:
        r = bench_framing_size(size, seconds, rounds)
        for shape in ("frame", "stream"):
            ref, ours = r[f"ref_{shape}"], r[f"ours_{shape}"]
            print(f"{size:>6} {shape:>8} {ref:>13,.0f} {ours:>14,.0f} {ours / ref:>7.2f}")


# --- handshake over a paced pty ----------------------------------------------------------------


def _unshadow_pyserial() -> None:
    """This file is named serial.py: run as a script, its directory comes first on sys.path and
    it would be imported in place of pyserial. Take the directory out before anything imports
    pyserial (the serial transport does)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    shadow = sys.modules.get("serial")
    if shadow is not None and not hasattr(shadow, "serial_for_url"):
        del sys.modules["serial"]


async def _pty_handshakes(baud: int, count: int, *, resume: bool = False
                          ) -> list[tuple[float, int, int]]:
    """``count`` handshakes over one paced line: (seconds, handshake bytes, line bytes).

    ``resume``: PLUS resumption, each connect spending the ticket the previous session
    earned (the first, full handshake that earns the first ticket is not measured)."""
    _unshadow_pyserial()
    from palisade_c.aio import Tunnel, connect, serve
    from palisade_c.config import Config
    from palisade_c.connection import Connection
    from palisade_c.identity import Identity
    from palisade_c.transport.pty import PtyLink

    loop = asyncio.get_running_loop()
    server_id, client_id = Identity.generate(), Identity.generate()
    from palisade_c.config import PLUS_RESUMPTION
    from palisade_c.tickets import ClientTicketCache

    plus = PLUS_RESUMPTION if resume else 0
    server_cfg = Config(identity=server_id, trusted_peers=[client_id.public_key],
                        plus_features=plus)
    client_cfg = Config(identity=client_id, trusted_peers=[server_id.public_key],
                        plus_features=plus)
    tickets = ClientTicketCache() if resume else None
    done: asyncio.Queue[float] = asyncio.Queue()

    async def handler(tunnel: Tunnel) -> None:
        done.put_nowait(loop.time())  # the server holds keys: the handshake is complete
        await tunnel.wait_closed()

    results: list[tuple[float, int, int]] = []
    with PtyLink(baud) as line:
        server = await serve(line.url("a"), server_cfg, handler)
        try:
            for _ in range(count + (1 if resume else 0)):
                started: list[float] = []

                def stamp(_conn: Connection, started: list[float] = started) -> None:
                    started.append(loop.time())  # the port is open, the HELLOs exchanged

                before = line.counters
                tunnel = await connect(line.url("b"), client_cfg, on_connection=stamp,
                                       tickets=tickets)
                finished = await asyncio.wait_for(done.get(), timeout=30)
                if resume and tunnel.handshake is not None and not tunnel.handshake.resumed:
                    # The ticket-earning full handshake; wait for its ticket, measure no more.
                    while not tunnel.tickets:
                        await asyncio.sleep(0.05)
                    await tunnel.close()
                    continue
                after = line.counters
                conn = tunnel.connection
                hs_bytes = conn.hs_bytes_in + conn.hs_bytes_out
                on_line = sum(after[k] - before[k] for k in ("a_to_b", "b_to_a"))
                results.append((finished - started[0], hs_bytes, on_line))
                await tunnel.close()
        finally:
            server.close()
            await server.wait_closed()
    return results


def print_pty_handshake(baud: int, runs: list[tuple[float, int, int]]) -> None:
    print()
    print(f"handshake over a pty paced to {baud} baud vs its wire time "
          "(handshake bytes x 10 / baud)")
    print(f"{'run':>4} {'time s':>8} {'hs bytes':>9} {'line bytes':>11} {'wire s':>7} "
          f"{'ratio':>6}")
    ratios = []
    for i, (seconds, hs_bytes, on_line) in enumerate(runs, 1):
        wire = hs_bytes * 10 / baud
        ratios.append(seconds / wire)
        print(f"{i:>4} {seconds:>8.3f} {hs_bytes:>9} {on_line:>11} {wire:>7.3f} "
              f"{seconds / wire:>6.3f}")
    print(f"  ratio handshake / wire time: best {min(ratios):.3f}, median "
          f"{statistics.median(ratios):.3f}  (target <= 1.3)")


def print_pty_reconnect(baud: int, count: int, full: list[tuple[float, int, int]]) -> None:
    """Reconnect over the paced line: resumption (PLUS) against the full handshakes above."""
    print()
    print(f"reconnect over a pty paced to {baud} baud: resumption vs full handshake")
    resumed = asyncio.run(_pty_handshakes(baud, count, resume=True))
    f = statistics.median(r[0] for r in full)
    r = statistics.median(r[0] for r in resumed)
    fb = int(statistics.median(x[1] for x in full))
    rb = int(statistics.median(x[1] for x in resumed))
    print(f"  full handshake: {f:6.3f} s ({fb} handshake bytes)")
    print(f"  resumption:     {r:6.3f} s ({rb} handshake bytes)")
    print(f"  ratio resumption / full: {r / f:.3f}  (target <= 0.5)")


# Each section of this benchmark is one print_* function; main() runs them in order.


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    ap.add_argument("--baud", type=int, default=115200, help="pty line speed for the handshake")
    ap.add_argument("--handshakes", type=int, default=3, help="handshakes over the pty")
    args = ap.parse_args(argv)
    print_framing(args.seconds, args.rounds)
    if args.handshakes > 0:
        full = asyncio.run(_pty_handshakes(args.baud, args.handshakes))  # measured once, used twice
        print_pty_handshake(args.baud, full)
        print_pty_reconnect(args.baud, args.handshakes, full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
