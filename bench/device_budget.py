"""The C device peer's static memory budget and its handshake time over a paced serial line.

Run: ``python bench/device_budget.py`` (``--baud``, ``--runs``; ``--no-pty`` for the static part
only). Needs arm-none-eabi-gcc (Debian package gcc-arm-none-eabi) for the Cortex-M4 figures.

Static budget, Cortex-M4 (``-mcpu=cortex-m4 -mthumb -Os -ffreestanding``):

* ``sizeof(pal_device)``: the RAM of one session, reassembly buffer included (target 24 KiB);
* flash: ``arm-none-eabi-size`` of pal_device.o, text + data (target 16 KiB, port excluded);
* stack per entry point: the deepest path through the call graph GCC writes with
  ``-fstack-usage -fcallgraph-info=su``, each function's frame from its stack-usage record.
  The port (pal_crypto_*) and mem* are leaves of size 0 here: their stack is the library's
  (firmware_bridge/DEVICE.md lists it per library). The core has no recursion and no
  variable-length arrays, so every frame is static and the sums are exact for this build.

Handshake over a paced pty: the Python client (``palisade_c.aio.connect``) against the C device
(``palisade_c.device_engine``) on the two ends of a ``PtyLink`` paced to ``--baud``, from
the client's ClientHello until the device holds keys, against the wire time of the handshake's
bytes (x 10 / baud). The crypto is the host's, so this measures the protocol's pacing, not a
microcontroller's arithmetic (DEVICE.md adds that estimate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "firmware_bridge" / "c"
M4 = ["-mcpu=cortex-m4", "-mthumb", "-Os", "-ffreestanding", "-std=c99"]
ENTRY_POINTS = ("pal_device_init", "pal_device_input", "pal_device_output",
                "pal_device_next_deadline", "pal_device_handle_timer",
                "pal_device_poll_event", "pal_device_send", "pal_device_close",
                "pal_device_rekey", "pal_device_wipe")


def _run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout


def stack_per_entry(ci_text: str) -> dict[str, int]:
    """Worst-case stack of each entry point from a GCC .ci call graph (VCG)."""
    frames: dict[str, int] = {}
    for title, label in re.findall(r'node: \{ title: "([^"]+)" label: "([^"]+)"', ci_text):
        m = re.search(r"\\n(\d+) bytes \((static|dynamic[^)]*)\)", label)
        if m:
            if m.group(2) != "static":
                raise RuntimeError(f"{title}: stack is not static ({m.group(2)})")
            frames[title] = int(m.group(1))
    edges: dict[str, set[str]] = {}
    for src, dst in re.findall(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"',
                               ci_text):
        edges.setdefault(src, set()).add(dst)
    memo: dict[str, int] = {}

    def depth(fn: str, path: tuple[str, ...]) -> int:
        if fn in path:
            raise RuntimeError(f"recursion through {fn}")
        if fn not in memo:
            below = [depth(c, (*path, fn)) for c in edges.get(fn, ())]
            memo[fn] = frames.get(fn, 0) + max(below, default=0)  # externals count 0
        return memo[fn]

    return {e: depth(e, ()) for e in ENTRY_POINTS}


def static_budget() -> dict[str, object]:
    from palisade_c.device import context_size

    out: dict[str, object] = {"host_sizeof": context_size()}
    cc = shutil.which("arm-none-eabi-gcc")
    if cc is None:
        out["note"] = "arm-none-eabi-gcc not installed: no Cortex-M4 figures"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _run([cc, *M4, "-Wall", "-Wextra", "-pedantic", "-Werror", "-fstack-usage",
              "-fcallgraph-info=su", "-c", str(C_DIR / "pal_device.c"), "-o", "pd.o"], t)
        size = _run(["arm-none-eabi-size", "pd.o"], t).splitlines()[1].split()
        out["flash_text"], out["flash_data"], out["bss"] = int(size[0]), int(size[1]), int(size[2])
        out["stack"] = stack_per_entry((t / "pd.ci").read_text())
        (t / "probe.c").write_text('#include "pal_device.h"\nchar pal_probe[sizeof(pal_device)];\n')
        _run([cc, *M4, f"-I{C_DIR}", "-c", "probe.c", "-o", "probe.o"], t)
        nm = _run(["arm-none-eabi-nm", "-S", "probe.o"], t)
        m = re.search(r"^[0-9a-f]+ ([0-9a-f]+) \w pal_probe$", nm, re.M)
        out["m4_sizeof"] = int(m.group(1), 16) if m else None
    return out


def print_budget(b: dict[str, object]) -> None:
    print(f"sizeof(pal_device): host {b['host_sizeof']} bytes", end="")
    if "m4_sizeof" in b:
        print(f", Cortex-M4 {b['m4_sizeof']} bytes (target <= {24 * 1024})")
        print(f"flash (text + data) at -Os: {b['flash_text']} + {b['flash_data']} bytes "
              f"(target <= {16 * 1024}); bss {b['bss']}")
        print("stack per entry point on Cortex-M4 (port and mem* excluded):")
        stack = b["stack"]
        assert isinstance(stack, dict)
        for name, n in stack.items():
            print(f"  {name:<26} {n:>6} bytes")
    else:
        print(f"\n{b['note']}")


async def _pty_handshakes(baud: int, runs: int) -> list[tuple[float, int]]:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    from palisade_c.aio import connect
    from palisade_c.config import Config
    from palisade_c.connection import Connection
    from palisade_c.device_engine import echo, serve_device
    from palisade_c.events import HandshakeCompleted
    from palisade_c.identity import Identity
    from palisade_c.transport.pty import PtyLink

    loop = asyncio.get_running_loop()
    dev_id, client_id = Identity.generate(), Identity.generate()
    results: list[tuple[float, int]] = []
    with PtyLink(baud) as line:
        server = await serve_device(
            line.url("a"), Config(identity=dev_id, trusted_peers=[client_id.public_key]), echo)
        # Woken by the device's own event: polling here would take the GIL from the pty pump
        # and the serial threads, and slow the very line being measured.
        keyed = asyncio.Event()
        server.on_event = lambda ev: keyed.set() if isinstance(ev, HandshakeCompleted) else None
        try:
            for _ in range(runs):
                started: list[float] = []

                def stamp(_conn: Connection, started: list[float] = started) -> None:
                    started.append(loop.time())

                keyed.clear()
                tunnel = await connect(line.url("b"), Config(
                    identity=client_id, trusted_peers=[dev_id.public_key],
                    close_drain_time=0.2), on_connection=stamp, timeout=60)
                await keyed.wait()
                finished = loop.time()
                conn = tunnel.connection
                results.append((finished - started[0], conn.hs_bytes_in + conn.hs_bytes_out))
                await tunnel.close()
                while not server.device.closed:
                    await asyncio.sleep(0.05)
        finally:
            server.close()
            await server.wait_closed()
    return results


def print_pty(baud: int, runs: list[tuple[float, int]]) -> None:
    print(f"handshake, Python client -> C device over a pty paced to {baud} baud:")
    ratios = []
    for i, (seconds, nbytes) in enumerate(runs, 1):
        wire = nbytes * 10 / baud
        ratios.append(seconds / wire)
        print(f"  run {i}: {seconds:.3f} s for {nbytes} handshake bytes, wire time {wire:.3f} s,"
              f" ratio {seconds / wire:.3f}")
    print(f"  ratio handshake / wire time: best {min(ratios):.3f}, "
          f"median {statistics.median(ratios):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baud", type=int, default=115200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-pty", action="store_true", help="static budget only")
    args = ap.parse_args(argv)
    print_budget(static_budget())
    if not args.no_pty:
        print_pty(args.baud, asyncio.run(_pty_handshakes(args.baud, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
