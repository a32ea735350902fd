"""UDP forwarding (issue 14): ``serve --forward`` and ``connect --listen``.

The end-to-end tests put a third-party program on both ends: ``socat`` plays the UDP service
behind ``serve --forward`` (a line filter that prefixes ``svc=``, so a reply proves the
service handled it) and the applications in front of ``connect --listen``. Several
applications share one tunnel, each on its own stream. The in-process tests check the
flow-to-stream mapping and that oversized datagrams are refused with a counter and a log line.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from aiohelpers import run_bounded, served
from simlink import free_udp_port
from test_cli import CMD_TIMEOUT, cli_env

from firmware_bridge.pty_link import PtyLink
from palisade_c.aio import connect
from palisade_c.config import Config
from palisade_c.errors import ConfigError
from palisade_c.forward import (
    PACKET_OVERHEAD,
    ListenForwarder,
    ServiceForwarder,
    parse_udp_target,
)
from palisade_c.identity import Identity

SOCAT = shutil.which("socat")
needs_socat = pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
NODE = "0a0b0c0d0e0f1011"
FAST = 1_000_000


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fwd-keys")
    for name in ("server", "client"):
        ident = Identity.generate()
        ident.save(d / f"{name}.key")
        ident.save_public(d / f"{name}.key.pub")
    return d


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], ready: str | None = None
              ) -> subprocess.Popen[bytes]:
        err = self.workdir / f"{name}.err"
        with err.open("wb") as err_file:
            proc = subprocess.Popen(args, cwd=self.workdir, env=cli_env(),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err_file)
        self.procs.append(proc)
        deadline = time.monotonic() + CMD_TIMEOUT
        while ready is not None and ready not in err.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name}: {err.read_text(errors='replace')}")
            time.sleep(0.05)
        return proc

    def palisade(self, name: str, *args: str, ready: str) -> subprocess.Popen[bytes]:
        return self.start(name, [sys.executable, "-m", "palisade_c", *args], ready)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.err").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop()


def _socat_service(procs: Procs) -> int:
    """A UDP service run by socat: every datagram goes through ``sed``, prefixed ``svc=``,
    and the reply goes back to its sender (one child process per datagram)."""
    port = free_udp_port()
    assert SOCAT is not None
    procs.start("service", [SOCAT, "-T", "5", f"UDP4-RECVFROM:{port},fork",
                            "SYSTEM:sed -u s/^/svc=/"])
    return port


def _socat_clients(port: int, messages: list[str]) -> list[str]:
    """One socat UDP client per message, all at once; what each printed."""
    assert SOCAT is not None
    clients = [subprocess.Popen([SOCAT, "-t", "10", "-T", "3", "-", f"UDP4:127.0.0.1:{port}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL) for _ in messages]
    out = []
    try:
        for client, message in zip(clients, messages, strict=True):
            assert client.stdin is not None
            client.stdin.write(f"{message}\n".encode())
            client.stdin.close()  # all send at once: the flows overlap in the tunnel
        for client in clients:
            assert client.stdout is not None
            client.wait(timeout=CMD_TIMEOUT)
            out.append(client.stdout.read().decode())
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
    return out


@needs_socat
def test_socat_to_socat_through_forward_and_listen(keydir: Path, procs: Procs) -> None:
    service = _socat_service(procs)
    server_port, listen_port = free_udp_port(), free_udp_port()
    procs.palisade("serve", "serve", f"udp://127.0.0.1:{server_port}",
                   "--key", str(keydir / "server.key"), "--trust",
                   str(keydir / "client.key.pub"), "--forward", f"udp://127.0.0.1:{service}",
                   ready="palisade: listening on")
    procs.palisade("connect", "connect", f"udp://127.0.0.1:{server_port}",
                   "--key", str(keydir / "client.key"), "--trust",
                   str(keydir / "server.key.pub"), "--listen",
                   f"udp://127.0.0.1:{listen_port}", "-v", ready="palisade: forwarding udp://")
    messages = ["alpha", "bravo", "charlie"]
    replies = _socat_clients(listen_port, messages)
    assert replies == [f"svc={m}\n" for m in messages]
    # Three applications, three flows, three streams, one tunnel.
    flows = [ln for ln in procs.log("connect").splitlines() if "new flow from" in ln]
    assert sorted(ln.rsplit(" ", 1)[1] for ln in flows) == ["0", "1", "2"]
    assert procs.log("connect").count("palisade: forwarding") == 1


@needs_socat
def test_socat_through_the_gateway_to_a_pty_device(keydir: Path, procs: Procs) -> None:
    """The device (``serve serial://`` on a pty) forwards to a socat service; the client
    reaches it through ``palisade gateway`` with --mtu/--link-bps, and socat talks to it."""
    service = _socat_service(procs)
    gateway_port, listen_port = free_udp_port(), free_udp_port()
    with PtyLink(FAST) as line:
        procs.palisade("device", "serve", line.url("a"), "--node-id", NODE,
                       "--key", str(keydir / "server.key"), "--trust",
                       str(keydir / "client.key.pub"), "--forward",
                       f"udp://127.0.0.1:{service}", ready="palisade: listening on serial://")
        procs.palisade("gateway", "gateway", "--listen", f"udp://127.0.0.1:{gateway_port}",
                       "--serial", line.url("b", node=NODE),
                       ready="palisade: gateway listening on")
        procs.palisade("connect", "connect", f"udp://127.0.0.1:{gateway_port}", "--node-id",
                       NODE, "--mtu", "512", "--link-bps", str(FAST),
                       "--key", str(keydir / "client.key"), "--trust",
                       str(keydir / "server.key.pub"), "--listen",
                       f"udp://127.0.0.1:{listen_port}", ready="palisade: forwarding udp://")
        assert _socat_clients(listen_port, ["coap", "mqtt-sn"]) == ["svc=coap\n",
                                                                   "svc=mqtt-sn\n"]
        procs.stop()


def test_forwarding_address_must_be_udp() -> None:
    assert parse_udp_target("udp://127.0.0.1:5683") == ("127.0.0.1", 5683)
    for bad in ("serial:///dev/ttyS0", "udp://127.0.0.1:0", "tcp://x:1"):
        with pytest.raises(ConfigError):
            parse_udp_target(bad)


def test_flows_map_to_streams_and_oversize_is_refused_and_logged(
        keydir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In one process: a Python UDP echo service, serve-side ServiceForwarder, and a
    ListenForwarder with two local sockets as applications."""
    server_cfg = Config(identity=Identity.load(keydir / "server.key"),
                        trusted_peers=[keydir / "client.key.pub"])
    client_cfg = Config(identity=Identity.load(keydir / "client.key"),
                        trusted_peers=[keydir / "server.key.pub"])

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)
            self.peers: set[object] = set()

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.peers.add(addr)
            # A reply too large for one tunnel packet when asked for one.
            self.transport.sendto(b"x" * 1500 if data == b"big-reply" else data, addr)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        echo_t, echo = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        target = echo_t.get_extra_info("sockname")
        service = ServiceForwarder((target[0], target[1]))
        async with served("udp://127.0.0.1:0", server_cfg, service.handle) as server:
            host, port = server.address
            async with connect(f"udp://{host}:{port}", client_cfg) as tunnel:
                fwd = ListenForwarder(tunnel)
                lhost, lport = await fwd.bind("127.0.0.1", 0)
                pump = asyncio.create_task(fwd.run())
                apps = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
                try:
                    for i, app in enumerate(apps):
                        app.settimeout(5)
                        app.bind(("127.0.0.1", 0))
                        app.sendto(f"app{i}".encode(), (lhost, lport))
                        reply = await asyncio.to_thread(app.recv, 2048)
                        assert reply == f"app{i}".encode()
                    assert sorted(fwd.flows) == [0, 1]
                    assert {fwd.flows[i] for i in (0, 1)} == {a.getsockname() for a in apps}
                    assert len(echo.peers) == 2  # one service-side socket per flow
                    # Too large for one tunnel packet, either way: refused, counted, logged.
                    with caplog.at_level(logging.WARNING, logger="palisade_c.forward"):
                        apps[0].sendto(b"y" * 1500, (lhost, lport))
                        apps[0].sendto(b"big-reply", (lhost, lport))
                        apps[0].sendto(b"after", (lhost, lport))
                        assert await asyncio.to_thread(apps[0].recv, 2048) == b"after"
                    assert fwd.counters.values["oversize"] == 1
                    assert service.counters.values["oversize"] == 1
                    refusals = [r for r in caplog.records if "refused a" in r.getMessage()]
                    assert len(refusals) == 2, caplog.text
                finally:
                    for app in apps:
                        app.close()
                    fwd.close()
                    pump.cancel()
        echo_t.close()

    run_bounded(body(), 30)


def test_packet_overhead_matches_the_record_layer() -> None:
    from palisade_c import RecordLayer

    layer = RecordLayer(bytes(32), True, bytes(24))
    for n in (0, 1, 1139):
        assert len(layer.seal(b"x" * n, stream_id=5)) == n + PACKET_OVERHEAD


def test_stream_ids_are_reused_only_after_idling(keydir: Path) -> None:
    class FakeTunnel:
        max_payload = 1000

        def __init__(self) -> None:
            self.sent: list[int] = []

        def send(self, data: bytes, stream: int) -> None:
            self.sent.append(stream)

    async def body() -> None:
        tunnel = FakeTunnel()
        fwd = ListenForwarder(tunnel, flow_idle=0.05)
        fwd._from_app(b"a", ("127.0.0.1", 1))
        fwd._from_app(b"b", ("127.0.0.1", 2))
        fwd._from_app(b"a", ("127.0.0.1", 1))
        assert tunnel.sent == [0, 1, 0]
        await asyncio.sleep(0.1)
        fwd._from_app(b"c", ("127.0.0.1", 3))  # ids move on round-robin after expiry
        assert tunnel.sent[-1] == 2 and sorted(fwd.flows) == [2]

    run_bounded(body(), 5)

