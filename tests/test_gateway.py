"""The UDP-to-serial gateway (palisade_c.gateway).

Two kinds of test: the routing table alone, with stand-in transports that record what they
are given (every rule of the module docstring, deterministic, no I/O), and real tunnels from
UDP clients on the loopback through the gateway to devices on virtual serial lines
(palisade_c.transport.pty), in process and through the ``palisade`` command line.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from aiohelpers import run_bounded
from test_cli import cli_env, start_palisade, write_keys

import palisade_c
from palisade_c import hsrecord as hs
from palisade_c import link, pathinfo
from palisade_c.aio import HandshakeTimeoutError, Tunnel, connect, serve
from palisade_c.config import Config
from palisade_c.errors import ConfigError, ErrorCode
from palisade_c.gateway import Gateway
from palisade_c.identity import Identity
from palisade_c.transport.base import tune_for_link
from palisade_c.transport.pty import PtyLink

T = TypeVar("T")

TEST_BOUND = 30.0
FAST = 1_000_000
NODE_A = bytes.fromhex("00000000000000a1")
NODE_B = bytes.fromhex("00000000000000b2")
PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_bounded(coro, TEST_BOUND)


# -- stand-ins for the routing tests ----------------------------------------------------------


@dataclass
class _Spec:
    baud: int | None = FAST


@dataclass
class FakeSerial:
    name: str
    node_id: bytes | None
    mtu: int = 512
    spec: _Spec = field(default_factory=_Spec)
    sent: list[bytes] = field(default_factory=list)
    on_datagram: Any = None
    on_reset: Any = None
    on_hello: Any = None
    peer_hello: Any = None
    peer_address: str = "dev"
    counters: dict[str, Any] = field(default_factory=dict)

    def send(self, data: bytes, addr: Any) -> None:
        self.sent.append(data)

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass

    def from_device(self, data: bytes) -> None:
        self.on_datagram(data, self.peer_address)


@dataclass
class FakeUdp:
    sent: list[tuple[bytes, Any]] = field(default_factory=list)
    #: Gateway notices (palisade_c.pathinfo), kept apart from the relayed datagrams.
    notices: list[tuple[Any, Any]] = field(default_factory=list)
    on_datagram: Any = None
    local_address: tuple[str, int] = ("127.0.0.1", 9)

    def send(self, data: bytes, addr: Any) -> None:
        if pathinfo.is_notice(data):
            self.notices.append((pathinfo.parse_notice(data), addr))
        else:
            self.sent.append((data, addr))

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


def record(kind: bytes, msg_type: int, rid: bytes, size: int = 60) -> bytes:
    """A datagram with the shape the gateway reads: magic, version, type/flags, length, rid."""
    assert len(rid) == 24
    return kind + bytes([0x12, msg_type]) + (size - 6).to_bytes(2, "big") + rid + bytes(size - 30)


def rid(prefix: bytes, tag: int) -> bytes:
    return prefix + b"\x00\x00" + tag.to_bytes(14, "big")


def make_gateway(*devices: FakeSerial, **kw: Any) -> tuple[Gateway, FakeUdp]:
    udp = FakeUdp()
    return Gateway(cast(Any, udp), cast(Any, list(devices)), **kw), udp


def test_routes_by_prefix_and_binds_the_session_rid() -> None:
    async def main() -> None:
        a, b = FakeSerial("a", NODE_A), FakeSerial("b", NODE_B)
        gw, udp = make_gateway(a, b)
        client1, client2 = ("10.0.0.1", 1000), ("10.0.0.2", 2000)
        hello_rid = rid(NODE_A, 1)
        # ClientHello fragments go to the device whose node id is the prefix.
        ch = record(b"QH", hs.MSG_CLIENT_HELLO, hello_rid)
        udp.on_datagram(ch, client1)
        assert a.sent == [ch] and b.sent == []
        # The device acks under the client's rid (known), then answers under a new RID.
        ack = record(b"QH", hs.MSG_HANDSHAKE_ACK, hello_rid)
        a.from_device(ack)
        session = rid(NODE_A, 99)
        sh = record(b"QH", hs.MSG_SERVER_HELLO, session)
        a.from_device(sh)
        assert udp.sent == [(ack, client1), (sh, client1)]
        assert gw.route_for(session) == client1
        # Encrypted packets both ways under the session RID.
        udp.on_datagram(record(b"QP", 0, session), client1)
        a.from_device(record(b"QP", 0, session))
        assert udp.sent[-1][1] == client1
        # The slot was released by the ServerHello: a second client may start now.
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 2)), client2)
        assert len(a.sent) == 3
        # The other device is reached by its own prefix.
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_B, 3)), client1)
        assert len(b.sent) == 1
        assert gw.counters["drops"] == {}

    run(main())


def test_one_handshake_at_a_time_per_device() -> None:
    async def main() -> None:
        a = FakeSerial("a", NODE_A)
        gw, udp = make_gateway(a)
        first, second = ("10.0.0.1", 1), ("10.0.0.2", 2)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), first)
        # The second client's ClientHello waits (dropped; it will retransmit) ...
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 2)), second)
        assert len(a.sent) == 1 and gw.counters["drops"] == {"handshake-busy": 1}
        # ... but the first client's retransmissions pass.
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), first)
        assert len(a.sent) == 2

    run(main())


def test_drops_are_counted() -> None:
    async def main() -> None:
        a = FakeSerial("a", NODE_A, mtu=300)
        gw, udp = make_gateway(a)
        addr = ("10.0.0.1", 1)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_B, 1)), addr)
        udp.on_datagram(b"not palisade at all, but long enough to have a rid", addr)
        udp.on_datagram(record(b"QP", 0, rid(NODE_A, 1), size=400), addr)
        a.from_device(record(b"QP", 0, rid(NODE_A, 77)))  # a RID nobody sent
        assert a.sent == [] and udp.sent == []
        assert gw.counters["drops"] == {"unknown-prefix": 1, "not-palisade": 1,
                                        "too-large": 1, "no-route": 1}

    run(main())


def test_clients_are_told_the_path_once_per_handshake_and_on_every_oversize_drop() -> None:
    async def main() -> None:
        a = FakeSerial("a", NODE_A, mtu=300, spec=_Spec(baud=9600))
        gw, udp = make_gateway(a)
        client = ("10.0.0.1", 1)
        hello_rid = rid(NODE_A, 1)
        for _ in range(3):  # fragments and retransmissions of one ClientHello
            udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, hello_rid), client)
        assert udp.notices == [(pathinfo.PathNotice(hello_rid, 300, 9600), client)]
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, hello_rid, size=1200), client)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, hello_rid, size=1200), client)
        assert len(udp.notices) == 2  # the second drop came too soon after the first
        await asyncio.sleep(0.11)
        udp.on_datagram(record(b"QP", 0, rid(NODE_A, 2), size=400), client)
        assert udp.notices[-1] == (pathinfo.PathNotice(rid(NODE_A, 2), 300, 9600), client)
        assert gw.counters["notices_sent"] == 3
        assert gw.counters["drops"] == {"too-large": 3}

    run(main())


def test_rid_routes_are_bounded_and_expire() -> None:
    async def main() -> None:
        a = FakeSerial("a", NODE_A)
        gw, udp = make_gateway(a, max_rids=4, rid_ttl=0.2)
        for i in range(10):
            udp.on_datagram(record(b"QP", 0, rid(NODE_A, i)), ("10.0.0.1", i))
        assert gw.counters["rids"] == 4  # the least recently used were forgotten
        assert gw.route_for(rid(NODE_A, 0)) is None
        assert gw.route_for(rid(NODE_A, 9)) == ("10.0.0.1", 9)
        await asyncio.sleep(0.25)
        assert gw.route_for(rid(NODE_A, 9)) is None  # expired
        a.from_device(record(b"QP", 0, rid(NODE_A, 9)))
        assert udp.sent == [] and gw.counters["drops"] == {"no-route": 1}

    run(main())


def test_node_id_learned_from_the_device_and_reset_forgets_routes() -> None:
    async def main() -> None:
        a = FakeSerial("a", None)  # no ?node=: learned from what the device sends
        gw, udp = make_gateway(a)
        addr = ("10.0.0.1", 1)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), addr)
        assert gw.counters["drops"] == {"unknown-prefix": 1}
        a.from_device(record(b"QP", 0, rid(NODE_A, 5)))  # no route yet, but a prefix
        assert gw.counters["devices"]["a"]["learned"] == [NODE_A.hex()]
        udp.on_datagram(record(b"QP", 0, rid(NODE_A, 5)), addr)
        assert len(a.sent) == 1
        assert gw.route_for(rid(NODE_A, 5)) == addr
        a.peer_hello = hello(NODE_A, boot=0x1234)
        a.on_reset("serial link reset: the device on a restarted")
        assert gw.route_for(rid(NODE_A, 5)) is None
        # Its client is told, so that it probes the session at once.
        assert udp.notices[-1] == (pathinfo.RebootNotice(rid(NODE_A, 5), 0x1234), addr)

    run(main())


def hello(node: bytes | None, boot: int = 1) -> link.Hello:
    return link.parse_hello(link.encode_hello(link.LINK_VERSION, 512, boot, node))


def test_routes_from_the_first_hello_that_announces_a_node_id() -> None:
    async def main() -> None:
        a, b = FakeSerial("a", None), FakeSerial("b", None)
        gw, udp = make_gateway(a, b)
        addr = ("10.0.0.1", 1)
        a.on_hello(hello(NODE_A))
        b.on_hello(hello(NODE_B))
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), addr)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_B, 1)), addr)
        assert len(a.sent) == 1 and len(b.sent) == 1
        assert gw.counters["devices"]["a"]["announced"] == NODE_A.hex()
        # A version 1 HELLO (no node id) changes nothing; a new id replaces the old one.
        a.on_hello(hello(None))
        udp.on_datagram(record(b"QP", 0, rid(NODE_A, 2)), addr)
        assert len(a.sent) == 2
        a.on_hello(hello(bytes(7) + b"\x01", boot=2))
        udp.on_datagram(record(b"QP", 0, rid(NODE_A, 3)), addr)
        assert len(a.sent) == 2 and gw.counters["drops"] == {"unknown-prefix": 1}

    run(main())


def test_a_hello_that_came_before_the_gateway_listened_still_counts() -> None:
    async def main() -> None:
        a = FakeSerial("a", None, peer_hello=hello(NODE_A))
        gw, udp = make_gateway(a)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), ("10.0.0.1", 1))
        assert len(a.sent) == 1 and gw.counters["devices"]["a"]["announced"] == NODE_A.hex()

    run(main())


def test_a_pin_must_match_and_a_duplicate_node_id_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        a, b, c = FakeSerial("a", NODE_A), FakeSerial("b", None), FakeSerial("c", NODE_B)
        gw, udp = make_gateway(a, b, c)
        addr = ("10.0.0.1", 1)
        b.on_hello(hello(NODE_A))  # a already has it, by its pin
        c.on_hello(hello(NODE_A))  # pinned to B, announces A
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_A, 1)), addr)
        udp.on_datagram(record(b"QH", hs.MSG_CLIENT_HELLO, rid(NODE_B, 1)), addr)
        assert len(a.sent) == 1 and b.sent == [] and c.sent == []
        drops = gw.counters["drops"]
        assert drops["duplicate-node"] == 1 and drops["node-mismatch"] == 1
        assert "already used by a" in gw.counters["devices"]["b"]["refused"]
        assert "pins node=" + NODE_B.hex() in gw.counters["devices"]["c"]["refused"]
        # A refused device learns nothing from its own traffic either.
        c.from_device(record(b"QP", 0, rid(NODE_B, 9)))
        udp.on_datagram(record(b"QP", 0, rid(NODE_B, 9)), addr)
        assert c.sent == []
        # Reflashed with the right id: routed again.
        c.on_hello(hello(NODE_B, boot=2))
        udp.on_datagram(record(b"QP", 0, rid(NODE_B, 9)), addr)
        assert len(c.sent) == 1 and gw.counters["devices"]["c"]["refused"] is None

    with caplog.at_level("ERROR", logger="palisade_c.gateway"):
        run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "refusing the second device" in errors[0]


def test_bad_gateway_configuration() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError):
            await Gateway.start("serial:///dev/x", ["serial:///dev/y"])
        with pytest.raises(ConfigError):
            await Gateway.start("udp://127.0.0.1:0", [])
        with pytest.raises(ConfigError):
            await Gateway.start("udp://127.0.0.1:0", ["serial:///dev/x?node=00000000000000a1",
                                                      "serial:///dev/y?node=00000000000000a1"])

    run(main())


# -- real tunnels through the gateway ---------------------------------------------------------


def _tagging_echo(tag: bytes) -> Any:
    async def handler(tunnel: Tunnel) -> None:
        async for data in tunnel:
            tunnel.send(tag + data)

    return handler


def test_two_devices_through_the_gateway() -> None:
    """Two devices, each on its own line with its own identity and node id; two clients reach
    each its own device through one UDP gateway; a third with an unknown node id cannot."""
    dev_a, dev_b, client_id = Identity.generate(), Identity.generate(), Identity.generate()

    def device_cfg(ident: Identity, node: bytes) -> Config:
        return Config(identity=ident, trusted_peers=[client_id.public_key], node_id=node,
                      close_drain_time=0.2)

    def client_cfg(node: bytes, **kw: Any) -> Config:
        cfg = Config(identity=client_id, trusted_peers=[dev_a.public_key, dev_b.public_key],
                     node_id=node, close_drain_time=0.2, **kw)
        return tune_for_link(cfg, 512, FAST)

    async def main() -> None:
        with PtyLink(FAST) as line_a, PtyLink(FAST) as line_b:
            server_a = await serve(line_a.url("a"), device_cfg(dev_a, NODE_A),
                                   _tagging_echo(b"A:"))
            server_b = await serve(line_b.url("a"), device_cfg(dev_b, NODE_B),
                                   _tagging_echo(b"B:"))
            # No ?node=: each device announces its node id in its link HELLO.
            gw = await Gateway.start("udp://127.0.0.1:0", [line_a.url("b"), line_b.url("b")])
            try:
                for d in gw.devices:
                    assert await d.transport.wait_ready(5)
                host, port = gw.address
                url = f"udp://{host}:{port}"
                ta, tb = await asyncio.gather(connect(url, client_cfg(NODE_A)),
                                              connect(url, client_cfg(NODE_B)))
                assert ta.peer_fingerprint == dev_a.fingerprint
                assert tb.peer_fingerprint == dev_b.fingerprint
                for i in range(5):
                    ta.send(b"%d" % i)
                    tb.send(b"%d" % i)
                    assert await ta.recv() == b"A:%d" % i
                    assert await tb.recv() == b"B:%d" % i
                with pytest.raises(HandshakeTimeoutError):
                    await connect(url, client_cfg(bytes(8)), timeout=0.5)
                assert gw.counters["drops"].get("unknown-prefix", 0) >= 1
                await asyncio.gather(ta.close(), tb.close())
            finally:
                gw.close()
                await gw.wait_closed()
                for server in (server_a, server_b):
                    server.close()
                    await server.wait_closed()

    run(main())


def test_a_device_restart_behind_the_gateway_reaches_its_client_in_seconds() -> None:
    """The device reboots (same line, new boot counter): the gateway's REBOOT notice makes the
    client probe its session, which the new device cannot answer, so the tunnel ends with
    ErrorSessionNotFound in seconds (not at the 60 s idle timeout), and a new one works."""
    dev, client_id = Identity.generate(), Identity.generate()
    device_cfg = Config(identity=dev, trusted_peers=[client_id.public_key], node_id=NODE_A,
                        close_drain_time=0.2)
    client_cfg = Config(identity=client_id, trusted_peers=[dev.public_key], node_id=NODE_A,
                        close_drain_time=0.2)

    async def main() -> None:
        with PtyLink(FAST) as line:
            server = await serve(line.url("a", boot=1), device_cfg, _tagging_echo(b"1:"))
            gw = await Gateway.start("udp://127.0.0.1:0", [line.url("b")])
            try:
                assert await gw.devices[0].transport.wait_ready(5)
                host, port = gw.address
                url = f"udp://{host}:{port}"
                tunnel = await connect(url, client_cfg)
                tunnel.send(b"x")
                assert await tunnel.recv() == b"1:x"
                # Power loss: the device dies without a word, then boots again.
                line.unplug("a")
                server.close()
                await server.wait_closed()
                line.replug("a")
                server = await serve(line.url("a", boot=2), device_cfg, _tagging_echo(b"2:"))
                # Seconds (the probe's 3 s), not the 60 s idle timeout.
                closed = await asyncio.wait_for(tunnel.wait_closed(), timeout=10)
                assert closed.error_code == ErrorCode.ErrorSessionNotFound, closed
                assert gw.counters["notices_sent"] >= 2  # a PATH and a REBOOT notice
                again = await connect(url, client_cfg)
                again.send(b"y")
                assert await again.recv() == b"2:y"
                await again.close()
            finally:
                gw.close()
                await gw.wait_closed()
                server.close()
                await server.wait_closed()

    run(main())


def test_cli_gateway_serve_and_connect(tmp_path: Path) -> None:
    """``palisade serve serial://`` as the device, ``palisade gateway`` in between and
    ``palisade connect udp://... --node-id`` as the client, each its own process."""
    env = cli_env()
    write_keys(tmp_path, "device", "client")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = NODE_A.hex()

    def start(name: str, *args: str, ready: str) -> subprocess.Popen[bytes]:
        return start_palisade(tmp_path, name, *args, ready=ready)

    with PtyLink(FAST) as line:
        procs = []
        try:
            procs.append(start("device", "serve", line.url("a"), "--echo", "--node-id", node,
                               "--key", "device.key", "--trust", "client.key.pub",
                               ready="palisade: listening on serial://"))
            procs.append(start("gateway", "gateway", "--listen", f"udp://127.0.0.1:{port}",
                               "--serial", line.url("b"),
                               ready="palisade: gateway listening on udp://127.0.0.1"))
            result = subprocess.run(
                [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
                 "--node-id", node, "--mtu", "512", "--link-bps", str(FAST),
                 "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=env, input="alpha\nbeta\n", capture_output=True, text=True,
                timeout=30, check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["alpha", "beta"]
            # A reload by habit (SIGHUP) stops neither the device nor the gateway.
            for proc in procs:
                proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert [proc.poll() for proc in procs] == [None, None]
            again = subprocess.run(
                [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
                 "--node-id", node, "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=env, input="gamma\n", capture_output=True, text=True,
                timeout=30, check=False,
            )
            assert again.returncode == 0 and again.stdout == "gamma\n", again.stderr
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                assert proc.wait(timeout=10) == 0


def test_connect_shows_progress_once_the_gateway_says_the_path_is_slow(tmp_path: Path) -> None:
    """A client behind a gateway learns the line's speed only from the PATH notice, after its
    first flight; it must still show handshake progress on a slow line (issue 11), not only
    when the speed was given by hand or stderr is a terminal."""
    write_keys(tmp_path, "device", "client")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = NODE_A.hex()
    with PtyLink(38400) as line:  # about 4.5 s of handshake airtime
        procs = [
            start_palisade(tmp_path, "device", "serve", line.url("a"), "--echo", "--node-id",
                           node, "--key", "device.key", "--trust", "client.key.pub",
                           ready="palisade: listening on serial://"),
            start_palisade(tmp_path, "gateway", "gateway", "--listen",
                           f"udp://127.0.0.1:{port}", "--serial", line.url("b"),
                           ready="palisade: gateway listening on udp://127.0.0.1"),
        ]
        try:
            result = subprocess.run(
                [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
                 "--node-id", node, "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=cli_env(), input="slow\n", capture_output=True, text=True,
                timeout=60, check=False,
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=10)
    assert result.returncode == 0 and result.stdout == "slow\n", result.stderr
    progress = [ln for ln in result.stderr.splitlines() if ln.startswith("palisade: handshake")]
    assert any("bit/s" in ln for ln in progress), result.stderr  # the learned speed is shown
    assert progress[-1].startswith("palisade: handshake done in"), result.stderr
