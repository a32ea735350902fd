"""Scale-out: the RID layout, in-kernel worker steering, ``serve --workers`` and a stateless
RID-routing relay in front of several hosts (docs/protocol.md §3.3, docs/architecture.md).

The end-to-end tests run real processes on real loopback UDP sockets. They are bounded by
wall-clock limits generous enough for a loaded 2-core machine; nothing here times anything.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import pytest
from aiohelpers import run_bounded, served
from fleet import (  # noqa: F401  (fixtures)
    Fleet,
    _children,
    _client_config,
    _env,
    _round_trip,
    fleet_fixture,
    keyfiles_fixture,
)
from hypothesis import given
from hypothesis import strategies as st
from simlink import free_udp_port

import palisade_c
from palisade_c import ridlayout, workers
from palisade_c.aio import Tunnel, connect
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.errors import ConfigError
from palisade_c.identity import Identity
from palisade_c.ridlayout import RidLayout

PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)
START_TIMEOUT = 30.0


# -- the layout ------------------------------------------------------------------------------------


@given(st.integers(0, 6), st.integers(0, 0xFFFF), st.integers(0, 255),
       st.binary(min_size=11, max_size=11))
def test_layout_fields_decode_from_an_issued_rid(cid: int, host: int, worker: int,
                                                  rand: bytes) -> None:
    tail = RidLayout(cid, host, worker).tail(lambda n: rand[:n])
    rid = bytes(8) + b"\x00\x00" + tail
    assert len(tail) == 14
    assert ridlayout.decode(rid) == (cid, host, worker)
    assert rid[14:] == rand[1:]  # ten bytes fresh per session
    assert ridlayout.worker_for(rid, worker + 1) == worker
    assert ridlayout.host_for(rid, host + 1, cid) == host


def test_session_rids_of_one_worker_share_only_the_routing_fields() -> None:
    """Unlinkability: what differs between two sessions' RIDs is all random."""
    layout = RidLayout(1, 7, 3)
    tails = {layout.tail(os.urandom) for _ in range(200)}
    assert len(tails) == 200
    assert {(t[0] >> 5, t[1:4]) for t in tails} == {(1, b"\x00\x07\x03")}
    assert len({t[0] & 0x1F for t in tails}) > 16  # the config octet's low bits are random


@pytest.mark.parametrize("bad", [dict(config_id=7), dict(host_id=1 << 16),
                                 dict(worker_id=256), dict(worker_id=-1)])
def test_layout_refuses_out_of_range_fields(bad: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        RidLayout(**bad)


def test_config_carries_the_layout_and_checks_the_cookie_secret() -> None:
    ident = Identity.generate()
    Config(identity=ident, rid_layout=RidLayout(0, 1, 2), cookie_secret=bytes(32))
    with pytest.raises(ConfigError):
        Config(identity=ident, cookie_secret=b"short")


def test_first_flight_rids_hash_on_the_whole_tail_when_not_issued_under_the_config() -> None:
    rid = bytes(10) + bytes((7 << 5,)) + os.urandom(13)  # config id 7: never issued
    assert ridlayout.host_for(rid, 5) == int.from_bytes(rid[10:], "big") % 5


# -- the kernel program ----------------------------------------------------------------------------


def test_kernel_steers_every_datagram_by_its_rid_worker_byte() -> None:
    """Datagrams go to socket worker_for(rid, n) of the group, whatever their source port."""
    n = 3
    socks = ridlayout.reuseport_group("127.0.0.1", 0, n)
    try:
        port = socks[0].getsockname()[1]
        assert all(s.getsockname()[1] == port for s in socks)
        expected: dict[int, list[bytes]] = {i: [] for i in range(n)}
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
        for k in range(60):
            rid = os.urandom(24)
            data = b"QP\x12\x00\x00\x10" + rid + os.urandom(20)
            senders[k % 4].sendto(data, ("127.0.0.1", port))
            expected[ridlayout.worker_for(rid, n)].append(data)
        got: dict[int, list[bytes]] = {i: [] for i in range(n)}
        deadline = time.monotonic() + 5
        while sum(map(len, got.values())) < 60 and time.monotonic() < deadline:
            for i, s in enumerate(socks):
                try:
                    got[i].append(s.recv(2048))
                except BlockingIOError:
                    pass
        for s in senders:
            s.close()
        assert {i: sorted(v) for i, v in got.items()} == {
            i: sorted(v) for i, v in expected.items()}
        assert all(expected[i] for i in range(n))  # random RIDs reach every worker
    finally:
        for s in socks:
            s.close()


def test_program_rejects_worker_counts_it_cannot_express() -> None:
    with pytest.raises(ConfigError):
        ridlayout.steering_program(0)
    with pytest.raises(ConfigError):
        ridlayout.steering_program(257)


def test_no_steering_falls_back_to_one_worker_with_a_message(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A kernel without SO_ATTACH_REUSEPORT_CBPF: the group is not used (its sockets are
    closed, so the port is free for the single worker) and the user is told why."""

    def no_cbpf(sock: socket.socket, n: int) -> None:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    monkeypatch.setattr(ridlayout, "attach_steering", no_cbpf)
    port = free_udp_port()
    assert workers.open_group("127.0.0.1", port, 2) is None
    assert "serving with one worker" in capsys.readouterr().err
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # nothing of the failed group holds the port


# -- serve --workers 2, end to end -------------------------------------------------------------


def test_two_workers_serve_200_concurrent_clients(
        fleet: Fleet, keyfiles: tuple[Path, Path, Identity]) -> None:
    """Issue 13's bar: 200 clients at once, each with a round trip; both workers serve, and
    every session RID names the worker that holds the session (its echo came back)."""
    config = _client_config(keyfiles)

    async def one(i: int) -> int:
        tunnel = await connect(fleet.url, config, timeout=50)
        try:
            await _round_trip(tunnel, f"client {i}".encode())
            cid, host, worker = ridlayout.decode(tunnel.connection.rid)
            assert (cid, host) == (0, 0)
            return worker
        finally:
            await tunnel.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    used = run_bounded(main(), 60)
    counts = Counter(used)
    assert set(counts) == {0, 1}
    assert sum(fleet.tunnels_per_worker().values()) == 200
    assert fleet.tunnels_per_worker() == Counter(
        {f"[worker {w}]": n for w, n in counts.items()})


def test_sessions_stay_on_their_worker_through_migration(
        fleet: Fleet, keyfiles: tuple[Path, Path, Identity]) -> None:
    """A migrated client's packets come from a new port but carry the same RID, so the kernel
    hands them to the same worker, which echoes from the new path."""
    config = _client_config(keyfiles)

    async def main() -> set[int]:
        tunnels = [await connect(fleet.url, config, timeout=30) for _ in range(6)]
        try:
            for t in tunnels:
                await _round_trip(t, b"before")
                old = t.connection.rid
                await t.migrate()
                for k in range(3):
                    await _round_trip(t, b"after %d" % k)
                assert t.connection.rid == old
            return {ridlayout.decode(t.connection.rid)[2] for t in tunnels}
        finally:
            for t in tunnels:
                await t.close()

    workers_used = run_bounded(main(), 60)
    assert workers_used <= {0, 1}
    assert "unknown-rid" not in fleet.text()


def test_a_killed_worker_is_replaced_on_the_same_socket(
        fleet: Fleet, keyfiles: tuple[Path, Path, Identity]) -> None:
    """The supervisor keeps every member of the group open: a worker that dies is restarted
    with the same socket and index, and new clients reach both workers again."""
    kids = _children(fleet.proc.pid)
    assert len(kids) == 2
    os.kill(kids[0], signal.SIGKILL)
    deadline = time.monotonic() + START_TIMEOUT
    while "restarting it" not in fleet.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "restarting it" in fleet.text()
    config = _client_config(keyfiles)

    async def main() -> set[int]:
        seen: set[int] = set()
        for i in range(24):
            tunnel = await connect(fleet.url, config, timeout=40)
            try:
                await _round_trip(tunnel, b"%d" % i)
                seen.add(ridlayout.decode(tunnel.connection.rid)[2])
            finally:
                await tunnel.close()
            if seen == {0, 1}:
                break
        return seen

    assert run_bounded(main(), 90) == {0, 1}


def test_a_bad_option_is_reported_once_before_any_worker_starts(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "palisade_c", "serve", "udp://127.0.0.1:0", "--key",
         str(keyfiles[0]), "--trust", str(keyfiles[1]), "--workers", "2",
         "--ticket-store", "http://nowhere"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.count("bad ticket store URL") == 1
    assert "[worker" not in result.stderr


def test_workers_need_a_udp_url(tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "palisade_c", "serve", "serial:///dev/null", "--key",
         str(keyfiles[0]), "--trust", str(keyfiles[1]), "--workers", "2"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 1
    assert "--workers needs a udp:// URL" in result.stderr


# -- a stateless load balancer in front of two hosts ---------------------------------------------


class RidRelay(asyncio.DatagramProtocol):
    """A minimal QUIC-LB-style relay: it holds no keys and no session table. Each datagram from
    a client goes to host ``host_for(rid)``; one upstream socket per client address carries the
    replies back (the address translation any UDP relay needs, not routing state)."""

    def __init__(self, hosts: list[tuple[str, int]]) -> None:
        self.hosts = hosts
        self.routed: Counter[int] = Counter()
        self._up: dict[Any, asyncio.DatagramTransport] = {}
        self._pending: dict[Any, list[tuple[bytes, tuple[str, int]]]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) < 30:
            return
        host = ridlayout.host_for(data[6:30], len(self.hosts))
        self.routed[host] += 1
        target = self.hosts[host]
        up = self._up.get(addr)
        if up is not None:
            up.sendto(data, target)
        elif addr in self._pending:
            self._pending[addr].append((data, target))
        else:
            self._pending[addr] = [(data, target)]
            asyncio.get_running_loop().create_task(self._open(addr))

    async def _open(self, client: Any) -> None:
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                assert relay.transport is not None
                relay.transport.sendto(data, client)

        up, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            Up, local_addr=("127.0.0.1", 0))
        self._up[client] = up  # type: ignore[assignment]
        for data, target in self._pending.pop(client):
            up.sendto(data, target)  # type: ignore[attr-defined]

    def close(self) -> None:
        for up in self._up.values():
            up.close()
        if self.transport is not None:
            self.transport.close()


def test_stateless_relay_routes_sessions_to_their_host_by_rid() -> None:
    """Two hosts issue RIDs with host ids 0 and 1; the relay spreads first flights by hash and
    sends every later packet, also after a client migrates, to the host its RID names."""
    server_id, client_id = Identity.generate(), Identity.generate()
    plus = PLUS_RESUMPTION | PLUS_MIGRATION

    def host_config(h: int) -> Config:
        return Config(identity=server_id, trusted_peers=[client_id.public_key],
                      plus_features=plus, rid_layout=RidLayout(0, h, 0), close_drain_time=0.2)

    client = Config(identity=client_id, trusted_peers=[server_id.public_key],
                    plus_features=plus, close_drain_time=0.2)

    async def echo(tunnel: Tunnel) -> None:
        async for data in tunnel:
            tunnel.send(data)

    async def main() -> None:
        async with served("udp://127.0.0.1:0", host_config(0), echo) as h0, \
                served("udp://127.0.0.1:0", host_config(1), echo) as h1:
            loop = asyncio.get_running_loop()
            relay = RidRelay([h0.address, h1.address])
            transport, _ = await loop.create_datagram_endpoint(
                lambda: relay, local_addr=("127.0.0.1", 0))
            url = f"udp://127.0.0.1:{transport.get_extra_info('sockname')[1]}"
            try:
                tunnels = [await connect(url, client, timeout=20) for _ in range(12)]
                hosts = [ridlayout.decode(t.connection.rid)[1] for t in tunnels]
                assert set(hosts) == {0, 1}
                for t in tunnels:
                    await _round_trip(t, b"via relay")
                await tunnels[0].migrate()
                for k in range(3):
                    await _round_trip(tunnels[0], b"migrated %d" % k)
                # Each host holds exactly the sessions whose RIDs name it.
                assert len(h0.tunnels) == hosts.count(0)
                assert len(h1.tunnels) == hosts.count(1)
                assert all(ridlayout.decode(t.connection.rid)[1] == 0 for t in h0.tunnels)
                assert all(ridlayout.decode(t.connection.rid)[1] == 1 for t in h1.tunnels)
                assert "unknown-rid" not in h0.endpoint.drop_counts
                assert "unknown-rid" not in h1.endpoint.drop_counts
                for t in tunnels:
                    await t.close()
            finally:
                relay.close()

    run_bounded(main(), 60)


# -- the core with a layout: session RIDs and Retry cookies across workers -----------------------


@pytest.mark.parametrize("shared", [True, False])
def test_a_retry_issued_by_one_worker_is_honoured_by_another(shared: bool) -> None:
    """The cookie RID of a Retry routes by its own bytes, so the retried ClientHello may reach
    another worker: with the shared cookie key that worker admits it (validated) and issues a
    session RID naming itself; with per-worker keys it would only answer another Retry."""
    from simlink import SERVER_ADDR, hs_type

    from palisade_c import hsrecord as hs
    from palisade_c.connection import Connection
    from palisade_c.endpoint import ServerEndpoint

    server_id, client_id = Identity.generate(), Identity.generate()
    secret = os.urandom(32)

    def worker(i: int) -> ServerEndpoint:
        return ServerEndpoint(Config(
            identity=server_id, trusted_peers=[client_id.public_key], cookie_threshold=0,
            rid_layout=RidLayout(0, 0, i), cookie_secret=secret if shared else None))

    w0, w1 = worker(0), worker(1)
    client = Connection(Config(identity=client_id, trusted_peers=[server_id.public_key]), True)
    addr = ("192.0.2.1", 1111)
    client.connect(SERVER_ADDR, 0.0)
    w0.receive_datagram(client.datagrams_to_send()[0][0], addr, 0.0)
    (retry,) = w0.datagrams_to_send()
    assert hs_type(retry[0]) == hs.MSG_RETRY
    client.receive_datagram(retry[0], SERVER_ADDR, 0.01)
    for d, _ in client.datagrams_to_send():
        w1.receive_datagram(d, addr, 0.02)
    out = w1.datagrams_to_send()
    if not shared:
        assert w1.connections == [] and w1.retries_sent >= 1
        return
    (session,) = w1.connections
    assert session.state == "S_WAIT_FIN"
    assert ridlayout.decode(session.rid) == (0, 0, 1)
    for d, _ in out:
        client.receive_datagram(d, SERVER_ADDR, 0.03)
    assert client.rid == session.rid


def test_workers_die_with_their_supervisor(
        fleet: Fleet, keyfiles: tuple[Path, Path, Identity]) -> None:
    """Killed outright, the supervisor cannot stop its workers; the kernel does (they asked
    for SIGTERM on their parent's death), so no worker serves on outside the group's keeper."""
    kids = _children(fleet.proc.pid)
    assert len(kids) == 2
    fleet.proc.kill()
    fleet.proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{k}").exists() and "zombie" not in _state(k) for k in kids):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_a_port_in_use_is_an_error_not_a_fallback(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(OSError) as info:
            workers.open_group("127.0.0.1", taken.getsockname()[1], 2)
        assert not isinstance(info.value, ridlayout.SteeringUnavailable)
    assert "one worker" not in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--workers", "0"], ["--workers", "300"],
                                 ["--host-id", "65536"], ["--host-id", "x"]])
def test_scale_out_options_are_checked(bad: list[str]) -> None:
    from palisade_c.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "udp://127.0.0.1:1", "--key", "k", "--trust", "t",
                                   *bad])


def test_a_ticket_from_one_worker_resumes_on_the_other(
        fleet: Fleet, keyfiles: tuple[Path, Path, Identity]) -> None:
    """Without --ticket-key or a store, the supervisor gives its workers a private key file
    and SQLite store for the run: a ticket one worker issued resumes on the other (the first
    flight's random RID picks the worker), and each resumption earns the next ticket."""
    config = _client_config(keyfiles)

    async def main() -> None:
        tunnel = await connect(fleet.url, config, timeout=30)
        await _round_trip(tunnel, b"full")
        issuer = ridlayout.decode(tunnel.connection.rid)[2]
        ticket = await _next_ticket(tunnel)
        await tunnel.close()
        for _ in range(12):
            tunnel = await connect(fleet.url, config, ticket=ticket, timeout=30)
            try:
                assert tunnel.handshake is not None and tunnel.handshake.resumed
                await _round_trip(tunnel, b"resumed")
                worker = ridlayout.decode(tunnel.connection.rid)[2]
                if worker != issuer:
                    return
                ticket = await _next_ticket(tunnel)
            finally:
                await tunnel.close()
        raise AssertionError("12 resumptions all landed on the issuing worker")

    run_bounded(main(), 90)


async def _next_ticket(tunnel: Tunnel) -> Any:
    for _ in range(100):
        if tunnel.tickets:
            return tunnel.tickets[-1]
        await asyncio.sleep(0.05)
    raise AssertionError("no ticket issued")


def test_each_worker_has_its_own_control_socket_and_metrics_port(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> None:
    """Workers hold disjoint sessions, so each answers `show` and metrics for its own: worker
    i on PATH.i and PORT+i. One shared path or port would leave all but one worker blind."""
    from fleet import free_tcp_port

    control = tmp_path / "serve.sock"
    port = free_tcp_port()
    while port + 1 > 0xFFFF:
        port = free_tcp_port()
    fleet = Fleet(tmp_path, keyfiles[0], keyfiles[1], "--control", str(control),
                  "--metrics", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        want = [control, control.with_name("serve.sock.1")]
        while time.monotonic() < deadline and not all(p.exists() for p in want):
            time.sleep(0.05)
        assert all(p.exists() for p in want), fleet.text()
        for i in (0, 1):
            with socket.create_connection(("127.0.0.1", port + i), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = b""
                while chunk := s.recv(65536):
                    body += chunk
            assert b"200" in body.split(b"\r\n", 1)[0] and b"palisade_" in body
        for p in want:
            out = subprocess.run([sys.executable, "-m", "palisade_c", "show", "--control",
                                  str(p), "--json"], capture_output=True, text=True,
                                 timeout=30, check=False)
            assert out.returncode == 0, out.stderr
    finally:
        fleet.stop()


def test_sighup_reaches_every_worker_and_stops_none(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> None:
    """`serve --workers 2 --trust-dir D`: a key added to D and a SIGHUP to the supervisor must
    reach both workers (each holds its own trust store), and must not stop the supervisor:
    its default action would take every worker and every session down with it."""
    trust = tmp_path / "trusted"
    trust.mkdir()
    newcomer = Identity.generate()
    fleet = Fleet(tmp_path, keyfiles[0], keyfiles[1], "--trust-dir", str(trust))
    try:
        newcomer.save_public(trust / "newcomer.pub")
        fleet.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and fleet.text().count("trust reloaded") < 2:
            time.sleep(0.05)
        reloaded = [ln for ln in fleet.text().splitlines() if "trust reloaded" in ln]
        assert {ln.split("]")[0] for ln in reloaded} == {"[worker 0", "[worker 1"}, fleet.text()
        assert fleet.proc.poll() is None
        config = _client_config((keyfiles[0], keyfiles[1], newcomer))

        async def main() -> list[int]:
            async def one(i: int) -> int:
                tunnel = await connect(fleet.url, config, timeout=30)
                try:
                    await _round_trip(tunnel, f"newcomer {i}".encode())
                    return ridlayout.decode(tunnel.connection.rid)[2]
                finally:
                    await tunnel.close()
            return await asyncio.gather(*(one(i) for i in range(12)))

        assert set(run_bounded(main(), 60)) == {0, 1}  # both workers now pin the newcomer
    finally:
        fleet.stop()
