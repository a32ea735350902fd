"""UDP socket buffers and kernel drop counting (issue 10, item 6), on the loopback interface.

A burst of clients overflows a receive buffer of the kernel's default size (~200 KiB) and the
kernel drops datagrams where no protocol counter sees them; these tests check that the buffer
is sized from the configuration, that Linux's drop counter (SO_RXQ_OVFL) is read and exposed,
and that 200 concurrent clients each get their reply.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohelpers import run_bounded, served
from simlink import seeded_rng

from palisade_c.aio import Tunnel, connect
from palisade_c.config import Config
from palisade_c.identity import Identity
from palisade_c.transport.udp import UdpTransport

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="SO_RXQ_OVFL is Linux's")


def _rmem_max() -> int:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except OSError:
        return 0


def test_socket_buffers_are_sized_from_the_setting() -> None:
    async def main() -> None:
        small = await UdpTransport.bind("127.0.0.1", 0, buffer_bytes=8192)
        big = await UdpTransport.bind("127.0.0.1", 0, buffer_bytes=1 << 20)
        try:
            assert small.receive_buffer_bytes < big.receive_buffer_bytes
            if sys.platform == "linux" and (_rmem_max() >= 1 << 20 or os.geteuid() == 0):
                assert big.receive_buffer_bytes >= 1 << 20  # Linux doubles what it grants
        finally:
            for t in (small, big):
                t.close()
                await t.wait_closed()

    run_bounded(main(), 10)


@linux_only
def test_kernel_drops_are_counted() -> None:
    async def main() -> None:
        rx = await UdpTransport.bind("127.0.0.1", 0, buffer_bytes=4096)
        got = 0

        def on_datagram(data: bytes, addr: object) -> None:
            nonlocal got
            got += 1

        rx.on_datagram = on_datagram
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sent = 300
            for _ in range(sent):  # no await: the loop cannot read while we send
                tx.sendto(b"x" * 1000, rx.local_address)
            await asyncio.sleep(0.05)
            tx.sendto(b"last", rx.local_address)  # carries the final count
            sent += 1
            deadline = time.monotonic() + 2
            while rx.kernel_drops is not None and got + rx.kernel_drops < sent \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert rx.kernel_drops is not None and rx.kernel_drops > 0
            assert got + rx.kernel_drops == sent  # every datagram is delivered or counted
            assert rx.counters["kernel_drops"] == rx.kernel_drops
        finally:
            tx.close()
            rx.close()
            await rx.wait_closed()

    run_bounded(main(), 10)


CLIENTS = 200


async def _echo(tunnel: Tunnel) -> None:
    async for data in tunnel:
        tunnel.send(data)


def test_200_concurrent_clients_each_get_their_reply() -> None:
    """Every client handshakes, then all send one near-MTU datagram in one burst; every echo
    must come back (a default-sized receive buffer drops about half of such a burst)."""
    server_id, client_id = Identity.generate(), Identity.generate()
    sconf = Config(identity=server_id, trusted_peers=[client_id.public_key],
                   rng=seeded_rng(1), handshake_timeout=30.0)
    cconf = Config(identity=client_id, trusted_peers=[server_id.public_key],
                   handshake_timeout=30.0)

    async def main() -> None:
        async with served("udp://127.0.0.1:0", sconf, _echo) as server:
            transport = server._engine.transport
            assert isinstance(transport, UdpTransport)
            if transport.receive_buffer_bytes < 1 << 20:
                pytest.skip(f"the kernel granted only {transport.receive_buffer_bytes} bytes "
                            "of receive buffer (raise net.core.rmem_max)")
            url = f"udp://127.0.0.1:{server.address[1]}"
            tunnels: list[Tunnel] = []
            # Handshakes in waves, so the test measures the data burst, not handshake loss.
            for start in range(0, CLIENTS, 50):
                tunnels += await asyncio.gather(*(connect(url, cconf)
                                                  for _ in range(start, min(start + 50,
                                                                            CLIENTS))))
            payloads = [b"%04d" % i + b"." * 1000 for i in range(CLIENTS)]
            for tunnel, payload in zip(tunnels, payloads, strict=True):
                tunnel.send(payload)  # one burst: no await in between

            async def reply(t: Tunnel) -> bytes:
                return await t.recv()

            done, pending = await asyncio.wait(
                [asyncio.ensure_future(reply(t)) for t in tunnels], timeout=5)
            for task in pending:
                task.cancel()
            got = sorted(task.result() for task in done)
            counters = server.transport_counters
            assert len(got) == CLIENTS, (len(got), counters)
            assert got == sorted(payloads)
            if sys.platform == "linux":
                assert counters["kernel_drops"] == 0
            await asyncio.gather(*(t.close() for t in tunnels))

    run_bounded(main(), 55)


def test_socket_buffer_flag() -> None:
    from palisade_c.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["serve", "udp://127.0.0.1:1", "--key", "k", "--trust", "t",
                              "--socket-buffer", "1048576"])
    assert args.socket_buffer == 1 << 20
    args = parser.parse_args(["connect", "udp://127.0.0.1:1", "--key", "k", "--trust", "t",
                              "--socket-buffer", "0"])
    assert args.socket_buffer == 0  # the kernel's default
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "udp://127.0.0.1:1", "--key", "k", "--trust", "t",
                           "--socket-buffer", "100"])


def test_cli_reports_the_session_limit_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line turns 0x0202 into one clear line (exit 2), not a timeout."""
    from palisade_c import cli

    d = tmp_path
    server_id, client_id = Identity.generate(), Identity.generate()
    server_id.save_public(d / "s.pub")
    client_id.save(d / "c.key")
    sconf = Config(identity=server_id, trusted_peers=[client_id.public_key], max_sessions=1)
    cconf = Config(identity=client_id, trusted_peers=[server_id.public_key])
    ready = threading.Event()
    done = threading.Event()
    url = ""

    async def serve_one() -> None:
        nonlocal url

        async def hold(tunnel: Tunnel) -> None:
            await tunnel.wait_closed()

        async with served("udp://127.0.0.1:0", sconf, hold) as server:
            url = f"udp://127.0.0.1:{server.address[1]}"
            first = await connect(url, cconf, timeout=5)  # takes the only session
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.02)
            await first.close()

    thread = threading.Thread(target=run_bounded, args=(serve_one(), 30))
    thread.start()
    try:
        assert ready.wait(20)
        status = cli.main(["connect", url, "--key", str(d / "c.key"), "--trust",
                           str(d / "s.pub"), "--timeout", "5", "--wait", "0"])
    finally:
        done.set()
        thread.join(30)
    err = capsys.readouterr().err
    assert status == cli.EXIT_HANDSHAKE  # refused (docs/cli.md)
    assert err.count("\n") == 1 and err.startswith("palisade: handshake failed: ")
    assert "ErrorSessionLimitExceeded (0x0202)" in err
