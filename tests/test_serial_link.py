"""The serial transport (palisade_c.transport.serial) over real pseudo-terminals.

Every line here is a :class:`~palisade_c.transport.pty.PtyLink`: two pty pairs joined by a pump,
so both ends are opened by path through pyserial exactly like ``/dev/ttyUSB0``. Lines run
unpaced or at 1 Mbaud to keep the suite fast, except where pacing is the point (progress output).
A "hand-made device" (the test writing frames with palisade_c.link on a raw port) checks the
link control rules byte by byte. Each test runs under a hard time bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import serial
from aiohelpers import run_bounded, served

import palisade_c
from palisade_c import link
from palisade_c.aio import Tunnel, connect, serve
from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.errors import ConfigError, ErrorCode
from palisade_c.events import ConnectionClosed
from palisade_c.identity import Identity
from palisade_c.tickets import ClientTicketCache, TicketService
from palisade_c.transport.base import parse_url
from palisade_c.transport.pty import Noise, PtyLink
from palisade_c.transport.serial import HOST_BOOT_COUNTER, SerialSpec, SerialTransport

T = TypeVar("T")

TEST_BOUND = 30.0
FAST = 1_000_000
PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_bounded(coro, TEST_BOUND)


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``cond`` on the loop until it holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def configs(ids: tuple[Identity, Identity], **kw: Any) -> tuple[Config, Config]:
    server_id, client_id = ids
    kw.setdefault("close_drain_time", 0.2)
    server = Config(identity=server_id, trusted_peers=[client_id.public_key], **kw)
    client = Config(identity=client_id, trusted_peers=[server_id.public_key], **kw)
    return server, client


async def echo(tunnel: Tunnel) -> None:
    async for data in tunnel:
        tunnel.send(data)


async def echo_round(tunnel: Tunnel, payload: bytes, tries: int = 1, wait: float = 2.0) -> None:
    """Send ``payload`` until its echo comes back (up to ``tries`` sends)."""
    for _ in range(tries):
        tunnel.send(payload)
        try:
            async with asyncio.timeout(wait):
                while await tunnel.recv() != payload:
                    pass  # a late echo of an earlier try
                return
        except TimeoutError:
            continue
    raise AssertionError(f"no echo of {payload[:20]!r} after {tries} tries")


def transport_of(tunnel: Tunnel) -> SerialTransport:
    transport = tunnel._engine.transport  # white-box: the test inspects the link itself
    assert isinstance(transport, SerialTransport)
    return transport


@pytest.fixture
def line() -> Iterator[PtyLink]:
    with PtyLink(FAST) as pty:
        yield pty


# -- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "device", "params"),
    [
        ("serial:///dev/ttyUSB0", "/dev/ttyUSB0", {}),
        ("serial:///dev/ttyUSB0?baud=9600&node=0011223344556677",
         "/dev/ttyUSB0", {"baud": "9600", "node": "0011223344556677"}),
        ("serial://COM3?baud=115200", "COM3", {"baud": "115200"}),
        ("loop://", "loop://", {}),
        ("socket://localhost:7000?logging=debug&baud=9600",
         "socket://localhost:7000?logging=debug", {"baud": "9600"}),
    ],
)
def test_parse_serial_urls(url: str, device: str, params: dict[str, str]) -> None:
    parsed = parse_url(url)
    assert parsed.host == device
    assert parsed.port == 0
    assert parsed.params == params


@pytest.mark.parametrize(
    "url",
    [
        "serial://",
        "serial:///dev/ttyUSB0?speed=9600",  # a typo of baud
        "serial://host/dev/ttyUSB0",
        "serial:///dev/ttyUSB0?baud=fast",
        "serial:///dev/ttyUSB0?baud=10",
        "serial:///dev/ttyUSB0?node=00112233",
        "serial:///dev/ttyUSB0?node=zz11223344556677",
        "serial:///dev/ttyUSB0?dtr=maybe",
        "serial:///dev/ttyUSB0?mtu=10",
        "serial:///dev/ttyUSB0?role=boss",
        "serial:///dev/ttyUSB0?hupcl=2",
        "serial:///dev/ttyUSB0#frag",
    ],
)
def test_bad_serial_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        SerialSpec.parse(url)


def test_spec_defaults() -> None:
    spec = SerialSpec.parse("serial:///dev/ttyACM0")
    assert (spec.baud, spec.mtu, spec.dtr, spec.rts, spec.hupcl, spec.role) == (
        115200, 512, "keep", "keep", False, "host")
    assert SerialSpec.parse("loop://").baud is None  # a pyserial URL has no line speed
    assert SerialSpec.parse("serial:///dev/x?dtr=1&rts=off").dtr == "on"
    assert SerialSpec.parse("serial:///dev/x", role="device").role == "device"


def test_missing_port_raises(ids: tuple[Identity, Identity]) -> None:
    _server_cfg, client_cfg = configs(ids)

    async def main() -> None:
        with pytest.raises(OSError):
            await SerialTransport.open("serial:///dev/palisade-no-such-port")
        with pytest.raises(OSError):
            await connect("serial:///dev/palisade-no-such-port", client_cfg)

    run(main())


# -- the link on its own ------------------------------------------------------------------------


def test_loopback_url_hello_data_and_ping() -> None:
    """pyserial's loop:// sends every frame back: our HELLO answers itself, our PING is
    answered by our own PONG logic, and a datagram comes back intact."""

    async def main() -> None:
        t = await SerialTransport.open("loop://?ping=0.1", hello_timeout=2.0)
        try:
            assert t.ready and t.mtu == 512 and t.link_bits_per_second is None
            got: list[bytes] = []
            t.on_datagram = lambda data, addr: got.append(data)
            t.send(b"QP" + bytes(200), t.peer_address)
            await until(lambda: got == [b"QP" + bytes(200)], what="the looped datagram")
            await until(lambda: t.pongs_received >= 1, what="a PONG")
            assert t.rtt is not None and t.rtt < 1.0
        finally:
            t.close()
            await t.wait_closed()

    run(main())


def test_write_queue_is_bounded_and_drops_duplicates() -> None:
    """A slow line cannot make the transport buffer without bound: past ``queue`` bytes a
    datagram is dropped and counted; a copy of a datagram still queued is dropped too."""

    async def main() -> None:
        with PtyLink(9600) as slow:
            device = await SerialTransport.open(slow.url("a", role="device"), hello_timeout=0)
            host = await SerialTransport.open(slow.url("b", queue=2048), hello_timeout=5)
            try:
                assert host.ready
                host.send(b"same" * 50, None)
                host.send(b"same" * 50, None)
                assert host.dropped_duplicate == 1
                for i in range(50):
                    host.send(i.to_bytes(2, "big") * 200, None)
                    assert host.queued_bytes <= 2048
                assert host.dropped_queue_full > 0
                host.send(bytes(513), None)  # above the link MTU
                assert host.dropped_too_large == 1
            finally:
                for t in (host, device):
                    t.close()
                    await t.wait_closed()

    run(main())


def test_send_before_hello_is_dropped(line: PtyLink) -> None:
    async def main() -> None:
        # Nobody on end a: the host gets no HELLO and must not send datagrams yet.
        host = await SerialTransport.open(line.url("b"), hello_timeout=0.2)
        try:
            assert host.connected and not host.ready
            host.send(b"too early", None)
            assert host.dropped_not_ready == 1
        finally:
            host.close()
            await host.wait_closed()

    run(main())


def test_hand_made_device_control_plane(
    line: PtyLink, caplog: pytest.LogCaptureFixture
) -> None:
    """LINK.md §6-7 against the host transport, byte by byte: garbage and a boot banner
    before the first frame, HELLO answered, MTU negotiated down, device logs passed to the
    host logger, PING answered, a new boot counter reported as a reset."""
    caplog.set_level(logging.INFO, logger="palisade_c.device")

    async def main() -> None:
        dev = serial.Serial(line.path("a"), FAST, timeout=0.05)
        decoder = link.FrameDecoder(512)
        seen: list[tuple[int, bytes]] = []

        def read_device() -> list[tuple[int, bytes]]:
            seen.extend(decoder.feed(dev.read(4096)))
            return seen

        host = await SerialTransport.open(line.url("b"), hello_timeout=0)
        resets: list[str] = []
        host.on_reset = resets.append
        got: list[bytes] = []
        host.on_datagram = lambda data, addr: got.append(data)
        try:
            await until(lambda: any(ch == link.CHANNEL_CONTROL for ch, _ in read_device()),
                        what="the host's HELLO")
            hello = link.parse_hello(next(p for ch, p in seen if ch == link.CHANNEL_CONTROL))
            assert hello.mtu == 512 and hello.boot_counter == HOST_BOOT_COUNTER
            # A bootloader banner and line noise run into the frame after them, which is
            # lost (LINK.md §7)...
            dev.write(b"U-Boot 2024.01\r\n\xff\x13garbage")
            dev.write(link.encode_frame(link.CHANNEL_LOG, b"lost with the banner"))
            # ... so the device sends a lone delimiter, then its HELLO (MTU 300), a log line
            # and a datagram.
            dev.write(b"\x00")
            dev.write(link.encode_frame(link.CHANNEL_CONTROL, link.encode_hello(1, 300, 7)))
            dev.write(link.encode_frame(link.CHANNEL_LOG, b"sensor ready\x1b[2J\n"))
            dev.write(link.encode_frame(link.CHANNEL_DATA, b"QP from the device"))
            dev.write(link.encode_frame(9, b"a reserved channel"))
            await until(lambda: got == [b"QP from the device"], what="the device datagram")
            assert host.ready and host.mtu == 300 and host.max_datagram_size == 300
            assert host.counters["decoder"]["cobs_errors"] >= 1  # the banner, counted
            assert host.unknown_channel == 1
            await until(lambda: "sensor ready" in caplog.text, what="the device log line")
            assert "\x1b" not in caplog.text  # control characters are escaped
            assert "lost with the banner" not in caplog.text
            # PING from the device: the host answers with the same token.
            seen.clear()
            dev.write(link.encode_frame(link.CHANNEL_CONTROL, link.encode_ping(0xBEEF)))
            await until(lambda: any(ch == link.CHANNEL_CONTROL
                                    and link.control_type(p) == link.CTL_PONG
                                    for ch, p in read_device()), what="a PONG")
            pong = next(p for ch, p in seen if link.control_type(p) == link.CTL_PONG)
            assert link.parse_token(pong) == 0xBEEF
            # The same boot counter again (a repeat) changes nothing; a new one is a reset.
            dev.write(link.encode_frame(link.CHANNEL_CONTROL, link.encode_hello(1, 300, 7)))
            await until(lambda: host.hellos_received == 2, what="the repeated HELLO")
            assert resets == []
            dev.write(link.encode_frame(link.CHANNEL_CONTROL, link.encode_hello(1, 300, 8)))
            await until(lambda: len(resets) == 1, what="the reset")
            assert "restarted" in resets[0] and host.peer_resets == 1
        finally:
            host.close()
            await host.wait_closed()
            dev.close()

    run(main())


def test_line_policies(line: PtyLink) -> None:
    """DTR/RTS policies open the port (a pty refuses modem-line ioctls, which must not
    matter), and HUPCL is cleared unless asked for, so closing does not drop DTR."""

    async def main() -> None:
        for params, hupcl in (({}, False), ({"dtr": "on", "rts": "off"}, False),
                              ({"hupcl": 1}, True)):
            t = await SerialTransport.open(line.url("b", **params), hello_timeout=0)
            try:
                assert t.connected
                fd = os.open(line.path("b"), os.O_RDWR | os.O_NOCTTY)
                try:
                    assert bool(termios.tcgetattr(fd)[2] & termios.HUPCL) is hupcl
                finally:
                    os.close(fd)
            finally:
                t.close()
                await t.wait_closed()

    run(main())


# -- PALISADE over the link ---------------------------------------------------------------------


def test_tunnel_over_pty(line: PtyLink, ids: tuple[Identity, Identity]) -> None:
    server_cfg, client_cfg = configs(ids)

    async def main() -> None:
        async with served(line.url("a"), server_cfg, echo):
            tunnel = await connect(line.url("b"), client_cfg)
            conn = tunnel.connection
            # The session was configured from the link: its MTU and speed.
            assert conn.config.max_datagram_size == 512
            assert conn.config.link_bits_per_second == FAST
            for i in range(20):
                await echo_round(tunnel, f"datagram {i}".encode() * (1 + i * 2))
            await echo_round(tunnel, bytes(400))
            event = await tunnel.close()
            assert event.error_code == 0
            link_counters = transport_of(tunnel).counters
            assert link_counters["drops"] == {}
            assert link_counters["decoder"]["crc_errors"] == 0

    run(main())


def test_mtu_negotiated_down(line: PtyLink, ids: tuple[Identity, Identity]) -> None:
    server_cfg, client_cfg = configs(ids)

    async def main() -> None:
        async with served(line.url("a", mtu=300), server_cfg, echo):
            tunnel = await connect(line.url("b"), client_cfg)
            assert tunnel.connection.config.max_datagram_size == 300
            await echo_round(tunnel, b"fits in 300" * 10)
            await tunnel.close()

    run(main())


def test_noisy_line_session_survives(ids: tuple[Identity, Identity]) -> None:
    """Bit flips, lost bytes and garbage on the line: frames are dropped and counted, and
    PALISADE's retransmissions carry the handshake and the data through."""
    server_cfg, client_cfg = configs(ids)
    noise = Noise(bit_flip=1e-4, drop=5e-5, garbage=5e-5, seed=11)

    async def main() -> None:
        with PtyLink(FAST, noise=noise) as noisy:
            async with served(noisy.url("a"), server_cfg, echo) as server:
                tunnel = await connect(noisy.url("b"), client_cfg)
                for i in range(30):
                    await echo_round(tunnel, f"through the noise {i}".encode() * 20,
                                     tries=10, wait=0.5)
                damage = noisy.counters
                assert damage["bit_flips"] + damage["dropped"] + damage["garbage"] > 0
                client_link = transport_of(tunnel).counters["decoder"]
                device_transport = server._engine.transport
                assert isinstance(device_transport, SerialTransport)
                device_link = device_transport.counters["decoder"]
                bad = sum(d[k] for d in (client_link, device_link)
                          for k in ("crc_errors", "cobs_errors", "short_frames", "oversize"))
                assert bad > 0, (client_link, device_link)
                await tunnel.close()

    run(main())


def test_unplug_and_replug_keeps_the_session(
    line: PtyLink, ids: tuple[Identity, Identity]
) -> None:
    """The host's cable is pulled and put back; the device kept running, so its HELLO has the
    same boot counter: the transport reconnects and the same session carries on."""
    server_cfg, client_cfg = configs(ids)

    async def main() -> None:
        async with served(line.url("a"), server_cfg, echo):
            tunnel = await connect(line.url("b"), client_cfg)
            await echo_round(tunnel, b"before")
            link_b = transport_of(tunnel)
            hs_bytes = tunnel.connection.hs_bytes_out
            line.unplug("b")
            await until(lambda: not link_b.connected, what="the unplug to be noticed")
            tunnel.send(b"lost while unplugged")  # dropped, not an error
            await asyncio.sleep(0.3)
            line.replug("b")
            await until(lambda: link_b.ready, timeout=10, what="the reconnect")
            assert link_b.reconnects == 1 and link_b.link_downs == 1
            assert link_b.peer_resets == 0
            await echo_round(tunnel, b"after", tries=3)
            assert tunnel.connection.established
            assert tunnel.connection.hs_bytes_out == hs_bytes  # no new handshake
            await tunnel.close()

    run(main())


def test_after_a_device_reboot_the_session_comes_back_by_resumption(
    line: PtyLink, ids: tuple[Identity, Identity]
) -> None:
    """PLUS: the device reboots (new boot counter) but keeps its ticket keys and used-ticket
    store (in flash on real hardware; here the same TicketService), so the client's
    reconnect resumes with the ticket of its first session: no certificates, no signatures,
    about a third of the bytes on the slow line."""
    server_id, _ = ids
    tickets = TicketService(bytes.fromhex(server_id.fingerprint))
    server_cfg, client_cfg = configs(ids, plus_features=PLUS_RESUMPTION)
    server_cfg.tickets = tickets
    cache = ClientTicketCache()

    async def main() -> None:
        server = await serve(line.url("a", boot=1), server_cfg, echo)
        tunnel = await connect(line.url("b"), client_cfg, tickets=cache)
        await echo_round(tunnel, b"first life")
        await until(lambda: len(cache) == 1, what="the first session's ticket")
        full_bytes = tunnel.connection.hs_bytes_out + tunnel.connection.hs_bytes_in
        line.unplug("b")
        line.unplug("a")
        server.close()
        await server.wait_closed()
        line.replug("a")
        async with served(line.url("a", boot=2), server_cfg, echo) as server:
            line.replug("b")
            closed = await asyncio.wait_for(tunnel.wait_closed(), timeout=10)
            assert closed.error_code == ErrorCode.ErrorSessionNotFound
            await tunnel.close()
            again = await connect(line.url("b"), client_cfg, tickets=cache)
            assert again.handshake is not None and again.handshake.resumed
            await echo_round(again, b"second life")
            resumed_bytes = again.connection.hs_bytes_out + again.connection.hs_bytes_in
            assert resumed_bytes < full_bytes / 2
            await again.close()

    run(main())


def test_device_reboot_means_a_new_handshake(
    line: PtyLink, ids: tuple[Identity, Identity]
) -> None:
    """The device loses power while unplugged and boots again (a new boot counter): the host
    transport reconnects, sees the new counter, and the tunnel ends with
    ErrorSessionNotFound; connecting again re-handshakes and data flows."""
    server_cfg, client_cfg = configs(ids)

    async def main() -> None:
        server = await serve(line.url("a", boot=1), server_cfg, echo)
        tunnel = await connect(line.url("b"), client_cfg)
        await echo_round(tunnel, b"first life")
        # Power loss: both ends go, the device dies without a word.
        line.unplug("b")
        line.unplug("a")
        server.close()
        await server.wait_closed()
        line.replug("a")
        async with served(line.url("a", boot=2), server_cfg, echo) as server:
            line.replug("b")
            closed = await asyncio.wait_for(tunnel.wait_closed(), timeout=10)
            assert isinstance(closed, ConnectionClosed)
            assert closed.error_code == ErrorCode.ErrorSessionNotFound
            assert "restarted" in closed.reason
            await tunnel.close()
            again = await connect(line.url("b"), client_cfg)
            await echo_round(again, b"second life")
            assert again.connection.hs_bytes_out > 0
            await again.close()

    run(main())


# -- the command line -----------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _keys(directory: Path) -> None:
    for name in ("device", "client"):
        ident = Identity.generate()
        ident.save(directory / f"{name}.key")
        ident.save_public(directory / f"{name}.key.pub")


def _wait_for_line(path: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r}: {path.read_text(errors='replace')}")
        time.sleep(0.05)


@pytest.mark.parametrize("baud", [None, 115200], ids=["unpaced", "paced-115200"])
def test_cli_serve_and_connect_over_serial(tmp_path: Path, baud: int | None) -> None:
    """``palisade serve serial://`` on one end, ``palisade connect serial://`` on the other;
    at 115200 baud connect reports its handshake progress on stderr."""
    _keys(tmp_path)
    with PtyLink(baud) as pty:
        err = tmp_path / "serve.err"
        with err.open("wb") as err_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "palisade_c", "serve", pty.url("a"), "--echo",
                 "--key", "device.key", "--trust", "client.key.pub",
                 "--node-id", "0011223344556677"],
                cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err_file,
            )
        try:
            _wait_for_line(err, "palisade: listening on serial://", server)
            result = subprocess.run(
                [sys.executable, "-m", "palisade_c", "connect", pty.url("b"),
                 "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=_env(), input="one\ntwo\nthree\n", capture_output=True,
                text=True, timeout=30, check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["one", "two", "three"]
            if baud is not None:
                assert "palisade: handshake" in result.stderr  # progress on a slow link
            else:
                assert result.stderr == ""
        finally:
            server.terminate()
            assert server.wait(timeout=10) == 0, err.read_text()


def test_cli_connect_reconnects_after_a_device_reboot(tmp_path: Path) -> None:
    """The device process dies and a new one starts on the same port (a new boot counter):
    ``palisade connect`` notices, handshakes again and keeps sending stdin lines."""
    _keys(tmp_path)

    def start_device(log_name: str) -> tuple[subprocess.Popen[bytes], Path]:
        err = tmp_path / log_name
        with err.open("wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "palisade_c", "serve", pty.url("a"), "--echo",
                 "--key", "device.key", "--trust", "client.key.pub"],
                cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err_file,
            )
        _wait_for_line(err, "palisade: listening on serial://", proc)
        return proc, err

    def readline(stream: Any, timeout: float = 15.0) -> bytes:
        ready, _, _ = select.select([stream], [], [], timeout)
        assert ready, "no reply in time"
        return bytes(stream.readline())

    with PtyLink(None) as pty:
        device, _ = start_device("device1.err")
        client_err = tmp_path / "client.err"
        with client_err.open("wb") as err_file:
            client = subprocess.Popen(
                [sys.executable, "-m", "palisade_c", "connect", pty.url("b"),
                 "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err_file,
            )
        try:
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"before\n")
            client.stdin.flush()
            assert readline(client.stdout) == b"before\n"
            device.kill()  # no goodbye: the session dies with the process
            device.wait(timeout=10)
            device, _ = start_device("device2.err")
            # The new device's HELLO carries a new boot counter: the client starts over.
            _wait_for_line(client_err, "connecting again", client)
            client.stdin.write(b"after\n")  # waits for the new tunnel if need be
            client.stdin.flush()
            assert readline(client.stdout) == b"after\n"
            client.stdin.close()
            assert client.wait(timeout=15) == 0, client_err.read_text()
        finally:
            for proc in (client, device):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
