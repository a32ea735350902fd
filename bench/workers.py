"""Full handshakes per second served by ``palisade serve --workers 1`` and ``--workers N``.

Run: ``python bench/workers.py`` (``--workers N``, default the number of cores; ``--seconds``
per measurement; ``--loaders`` load-generating processes of ``--concurrency`` clients each).

Each configuration is a real ``palisade serve --echo`` on a loopback UDP port. Load comes from
separate processes (this script with ``--load``), each running concurrent clients that do one
full handshake (ML-KEM-768 + ML-DSA-65, mutual authentication) and close, again and again. The
script prints the handshakes per second each configuration served, the CPU its server
processes used (from /proc), and the scaling ratio N workers / 1 worker (target on a 2-core
machine: >= 1.7).

The clients do about as much asymmetric work per handshake as the server (each side signs once,
verifies once and runs its half of the KEM exchange), so on a machine whose cores the load
generators share with the server, the ratio is bounded by the cores left for the server: the
handshakes per server-CPU-second printed next to it shows whether the workers themselves scale.

It ends with the single-worker handshake CPU against every primitive a handshake runs (the
machinery of ``bench/handshake.py --floor``: asymmetric and symmetric primitives together).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import paired_ratio
from cryptography.hazmat.primitives.asymmetric import mldsa
from handshake import handshake_once, primitives_once, symmetric_once

from palisade_c.config import Config
from palisade_c.endpoint import ServerEndpoint
from palisade_c.identity import Identity

_TRANSCRIPT_BYTES = 8_700
_HERE = Path(__file__).resolve()
_TICKS = os.sysconf("SC_CLK_TCK")


# -- the load generator (a separate process) -------------------------------------------------------


async def _load(url: str, keys: Path, seconds: float, warmup: float, concurrency: int) -> int:
    from palisade_c.aio import connect

    cfg = Config(identity=Identity.load(keys / "client.key"),
                 trusted_peers=[str(keys / "server.key.pub")], close_drain_time=0.05,
                 initial_rto=1.0)
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while loop.time() < end:
            try:
                tunnel = await connect(url, cfg, timeout=10)
            except Exception:
                continue
            if start <= loop.time() <= end:
                done += 1
            tunnel.connection.close()  # no need to wait for the drain

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


# -- the orchestration ----------------------------------------------------------------------------


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def _server_pids(root: int) -> list[int]:
    try:
        kids = [int(p) for p in Path(f"/proc/{root}/task/{root}/children").read_text().split()]
    except OSError:
        kids = []
    return [root, *kids]


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def measure(workers: int, keys: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(handshakes per second, server CPU cores used) for one server configuration."""
    port = _free_port()
    url = f"udp://127.0.0.1:{port}"
    log = keys / f"serve-{workers}.log"
    with log.open("wb") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "palisade_c", "serve", url, "--key", str(keys / "server.key"),
             "--trust", str(keys / "client.key.pub"), "--echo", "--workers", str(workers)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while "palisade: listening on" not in log.read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()}")
            time.sleep(0.05)
        loaders = [subprocess.Popen(
            [sys.executable, str(_HERE), "--load", url, "--keys", str(keys),
             "--seconds", str(args.seconds), "--warmup", str(args.warmup),
             "--concurrency", str(args.concurrency)],
            stdout=subprocess.PIPE, text=True) for _ in range(args.loaders)]
        time.sleep(args.warmup)
        pids = _server_pids(server.pid)
        cpu0, t0 = _cpu_seconds(pids), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = _cpu_seconds(pids), time.monotonic()
        total = 0
        for p in loaders:
            out, _ = p.communicate(timeout=args.seconds + args.warmup + 60)
            total += int(json.loads(out)["handshakes"])
        return total / args.seconds, (cpu1 - cpu0) / (t1 - t0)
    finally:
        server.terminate()
        server.wait(timeout=30)


def floor_ratio(seconds: float, rounds: int) -> tuple[float, float, float]:
    """(ratio, handshake s, all primitives s): the single-worker handshake CPU (both sides, in
    memory) against every primitive it runs, as ``bench/handshake.py --floor`` reports it."""
    client_id, server_id = Identity.generate(), Identity.generate()
    client_cfg = Config(identity=client_id, trusted_peers=[server_id.public_key])
    server_cfg = Config(identity=server_id, trusted_peers=[client_id.public_key])
    sig_key = mldsa.MLDSA65PrivateKey.generate()
    sig_pub = sig_key.public_key().public_bytes_raw()
    transcript = os.urandom(_TRANSCRIPT_BYTES)

    def everything() -> None:
        primitives_once(sig_key, sig_pub)
        symmetric_once(transcript)

    results = sorted(paired_ratio(functools.partial(handshake_once, client_cfg,
                                                    ServerEndpoint(server_cfg)),
                                  everything, seconds) for _ in range(rounds))
    median: tuple[float, float, float] = results[len(results) // 2]
    return median


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="handshakes/s with 1 and N server workers")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--loaders", type=int, default=2, help="load-generating processes")
    ap.add_argument("--concurrency", type=int, default=16, help="clients per loader")
    ap.add_argument("--floor-seconds", type=float, default=2.0)
    ap.add_argument("--floor-rounds", type=int, default=5)
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.load:
        n = asyncio.run(_load(args.load, args.keys, args.seconds, args.warmup,
                              args.concurrency))
        print(json.dumps({"handshakes": n}))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        for name in ("server", "client"):
            ident = Identity.generate()
            ident.save(keys / f"{name}.key")
            ident.save_public(keys / f"{name}.key.pub")
        print(f"full handshakes served over loopback UDP; {args.loaders} load processes x "
              f"{args.concurrency} clients; {args.seconds:g} s window after "
              f"{args.warmup:g} s warm-up; {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}")
        rates = {}
        for w in (1, args.workers):
            rate, cores = measure(w, keys, args)
            rates[w] = rate
            per_cpu = rate / cores if cores else float("nan")
            print(f"  {w} worker(s): {rate:8.1f} handshakes/s, server CPU {cores:4.2f} cores, "
                  f"{per_cpu:7.1f} handshakes per server-CPU-second")
            if cores < 0.8 * w:
                print(f"    (the server used {cores:.2f} of the {w} cores its workers could: "
                      "load-bound, the clients or other processes held the rest)")
        if rates[1]:
            print(f"  scaling {args.workers} workers / 1 worker: "
                  f"{rates[args.workers] / rates[1]:.2f}x  (target >= 1.7 on 2 cores)")
    ratio, hs_t, all_t = floor_ratio(args.floor_seconds, args.floor_rounds)
    print(f"single worker: in-memory handshake (both sides) {hs_t * 1e3:.3f} ms vs every "
          f"primitive it runs (ML-KEM, ML-DSA, HKDF, AES-ECB, ChaCha20-Poly1305, SHA3) "
          f"{all_t * 1e3:.3f} ms: ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
