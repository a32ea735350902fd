"""pyserial's network URLs end to end, line parameters, and errors that surface at once.

``socket://`` runs against a TCP-to-pty bridge (socat) and ``rfc2217://`` against pyserial's
own RFC 2217 port manager serving a pty, both started here; a device serves PALISADE on the
other end of the line. A port that cannot be opened or configured fails ``open()`` with the
error, never a silent I/O thread and a connect that waits forever.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
import serial.rfc2217
from aiohelpers import run_bounded

from palisade_c.aio import Tunnel, connect, serve
from palisade_c.config import Config
from palisade_c.errors import ConfigError
from palisade_c.identity import Identity
from palisade_c.transport.serial import SerialSpec, SerialTransport

# pyserial 3.5's RFC 2217 client still calls Thread.setDaemon/setName.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:set(Daemon|Name)\(\) is deprecated:DeprecationWarning")

needs_socat = pytest.mark.skipif(shutil.which("socat") is None,
                                 reason="socat not installed (Debian package socat)")


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.02)


@contextlib.contextmanager
def socat(*addresses: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["socat", *addresses], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=5)


class _PtyPort(serial.Serial):
    """A pty has no modem lines (their ioctls fail): report them all inactive, as an idle
    cable would, so that the port manager's modem-state notifications work."""

    @property
    def cts(self) -> bool:
        return False

    @property
    def dsr(self) -> bool:
        return False

    @property
    def ri(self) -> bool:
        return False

    @property
    def cd(self) -> bool:
        return False

    def _update_dtr_state(self) -> None:
        pass

    def _update_rts_state(self) -> None:
        pass


class Rfc2217Server:
    """pyserial's RFC 2217 PortManager in front of a local serial port, one client at a time
    (what pyserial's example server does, in two threads)."""

    def __init__(self, device: str) -> None:
        self.port = _PtyPort(device, timeout=0.05)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)

        class _Wire:
            def write(self, data: bytes) -> None:
                conn.sendall(data)

        manager = serial.rfc2217.PortManager(self.port, _Wire())
        done = threading.Event()

        def to_client() -> None:
            while not done.is_set():
                data = self.port.read(self.port.in_waiting or 1)
                if data:
                    with contextlib.suppress(OSError):
                        conn.sendall(b"".join(manager.escape(data)))

        pump = threading.Thread(target=to_client, daemon=True)
        pump.start()
        try:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    break
                self.port.write(b"".join(manager.filter(data)))
        except OSError:
            pass
        finally:
            done.set()
            pump.join(timeout=2)

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(timeout=5)
        self.listener.close()
        self.port.close()


def configs(ids: tuple[Identity, Identity]) -> tuple[Config, Config]:
    device, client = ids
    return (Config(identity=device, trusted_peers=[client.public_key], close_drain_time=0.2),
            Config(identity=client, trusted_peers=[device.public_key], close_drain_time=0.2))


async def _echo(tunnel: Tunnel) -> None:
    async for data in tunnel:
        tunnel.send(b"echo:" + data)


async def _round_trip(device_url: str, client_url: str, ids: tuple[Identity, Identity]) -> None:
    device_cfg, client_cfg = configs(ids)
    server = await serve(device_url, device_cfg, _echo)
    try:
        tunnel = await connect(client_url, client_cfg, timeout=15)
        for i in range(3):
            tunnel.send(b"%d" % i)
            assert await tunnel.recv() == b"echo:%d" % i
        big = bytes(range(256)) * (tunnel.max_payload // 256) + b"z"
        big = big[:tunnel.max_payload - 5]  # the echo adds 5 bytes: the reply is max size
        tunnel.send(big)
        assert await tunnel.recv() == b"echo:" + big
        await tunnel.close()
    finally:
        server.close()
        await server.wait_closed()


@needs_socat
def test_socket_url_through_a_tcp_to_pty_bridge(
    tmp_path: Path, ids: tuple[Identity, Identity]
) -> None:
    dev, port = tmp_path / "dev", free_tcp_port()
    with socat(f"pty,raw,echo=0,link={dev}", f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1"):
        wait_for(dev.exists, "socat made no pty")
        run_bounded(_round_trip(f"serial://{dev}", f"socket://127.0.0.1:{port}", ids), 30)


@needs_socat
def test_rfc2217_url_through_pyserials_port_manager(
    tmp_path: Path, ids: tuple[Identity, Identity]
) -> None:
    dev, host_end = tmp_path / "dev", tmp_path / "host"
    with socat(f"pty,raw,echo=0,link={dev}", f"pty,raw,echo=0,link={host_end}"):
        wait_for(lambda: dev.exists() and host_end.exists(), "socat made no ptys")
        server = Rfc2217Server(str(host_end))
        try:
            host, port = server.address
            run_bounded(_round_trip(f"serial://{dev}",
                                    f"rfc2217://{host}:{port}?baud=115200&rtscts=0", ids), 40)
        finally:
            server.close()


def test_errors_while_opening_reach_the_caller_at_once(ids: tuple[Identity, Identity]) -> None:
    _device_cfg, client_cfg = configs(ids)
    dead = free_tcp_port()

    async def main() -> None:
        with pytest.raises(OSError, match=r"127\.0\.0\.1"):
            await connect(f"socket://127.0.0.1:{dead}", client_cfg)
        with pytest.raises(OSError, match=r"127\.0\.0\.1"):
            await connect(f"rfc2217://127.0.0.1:{dead}", client_cfg)
        # pyserial refuses a parameter of its own URL handler: that is a bad URL.
        with pytest.raises(ConfigError, match="nonsense"):
            await SerialTransport.open(f"socket://127.0.0.1:{dead}?nonsense=1")

    run_bounded(main(), 20)


def test_a_non_rfc2217_server_fails_open_instead_of_hanging() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()

    async def main() -> None:
        with pytest.raises(OSError, match="RFC2217"):
            await SerialTransport.open(f"rfc2217://127.0.0.1:{port}")

    try:
        run_bounded(main(), 20)
    finally:
        for s in accepted:
            s.close()
        listener.close()


def test_line_parameters_reach_pyserial() -> None:
    spec = SerialSpec.parse(
        "serial:///dev/ttyX?rtscts=1&xonxoff=0&parity=even&bytesize=7&stopbits=2")
    assert spec.pyserial_options() == {
        "rtscts": True, "xonxoff": False, "parity": serial.PARITY_EVEN,
        "bytesize": serial.SEVENBITS, "stopbits": serial.STOPBITS_TWO,
    }
    assert SerialSpec.parse("socket://h:1?parity=N&stopbits=1.5").pyserial_options() == {
        "parity": serial.PARITY_NONE, "stopbits": serial.STOPBITS_ONE_POINT_FIVE}
    assert SerialSpec.parse("serial:///dev/ttyX").pyserial_options() == {}
    for bad in ("rtscts=2", "parity=green", "bytesize=9", "stopbits=3", "xonxoff=maybe",
                "parityx=even"):
        with pytest.raises(ConfigError):
            SerialSpec.parse(f"serial:///dev/ttyX?{bad}")


def test_line_parameters_configure_the_port() -> None:
    async def main() -> None:
        t = await SerialTransport.open("loop://?parity=odd&bytesize=7&stopbits=2&xonxoff=1",
                                       hello_timeout=2.0)
        try:
            assert t.ready
            port = t._port
            assert (port.parity, port.bytesize, port.stopbits, port.xonxoff) == (
                serial.PARITY_ODD, 7, 2, True)
        finally:
            t.close()
            await t.wait_closed()

    run_bounded(main(), 10)
