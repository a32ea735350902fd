"""The asyncio shell over real UDP on the loopback interface.

Every test binds 127.0.0.1 port 0 (the OS picks a free port), so tests never collide with
each other or with anything else on the machine, and each one runs under a hard time bound so
that a bug shows up as a failure rather than a hung suite. No pytest-asyncio: each test drives
its own event loop with :func:`asyncio.run`.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import warnings
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohelpers import run_bounded
from simlink import free_udp_port

from palisade_c.aio import HandshakeTimeoutError, Server, Tunnel, connect, serve
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.errors import (
    ConfigError,
    ConnectionClosedError,
    ErrorCode,
    HandshakeError,
)
from palisade_c.events import ConnectionClosed, DataReceived
from palisade_c.identity import Identity
from palisade_c.tickets import ClientTicketCache
from palisade_c.transport import UdpTransport, parse_url

T = TypeVar("T")

TEST_BOUND = 20.0  # seconds; far above what any test here needs


def run(coro: Coroutine[Any, Any, T]) -> T:
    return run_bounded(coro, TEST_BOUND)


@pytest.fixture(scope="module")
def server_id() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def client_id() -> Identity:
    return Identity.generate()


def make_configs(server_id: Identity, client_id: Identity, **kw: Any) -> tuple[Config, Config]:
    # Short drains keep close tests fast; the behaviour under test does not depend on them.
    kw.setdefault("close_drain_time", 0.2)
    server = Config(identity=server_id, trusted_peers=[client_id.public_key], **kw)
    client = Config(identity=client_id, trusted_peers=[server_id.public_key], **kw)
    return server, client


def url_of(server: Server) -> str:
    host, port = server.address
    return f"udp://{host}:{port}"


async def echo(tunnel: Tunnel) -> None:
    async for data in tunnel:
        tunnel.send(b"echo:" + data)


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_both_ways(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)
    server_got: list[bytes] = []

    async def handler(tunnel: Tunnel) -> None:
        assert tunnel.peer_fingerprint == client_id.fingerprint
        tunnel.send(b"hello from server")  # the server may speak first
        async for data in tunnel:
            server_got.append(data)
            tunnel.send(b"echo:" + data)

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            assert server.address[0] == "127.0.0.1" and server.address[1] > 0
            tunnel = await connect(url_of(server), cconf)
            assert tunnel.peer_fingerprint == server_id.fingerprint
            assert tunnel.connection.state == "C_ESTABLISHED"
            assert await tunnel.recv() == b"hello from server"
            messages = [b"m%d" % i * (i + 1) for i in range(8)]
            for m in messages:
                tunnel.send(m)
            replies = [await tunnel.recv() for _ in messages]
            assert replies == [b"echo:" + m for m in messages]
            # Larger payloads and another stream id also round-trip.
            tunnel.send(bytes(range(256)) * 3, stream_id=7)
            event = await tunnel.recv_event()
            assert isinstance(event, DataReceived)
            assert event.data == b"echo:" + bytes(range(256)) * 3
            counters = tunnel.counters
            # Data-plane packets only: 9 sent, 10 received (the greeting too).
            assert counters["packets_in"] >= 10 and counters["packets_out"] >= 9
            assert counters["drops"] == {}
            await tunnel.close()
        assert server_got[: len(messages)] == messages

    run(main())


def test_async_iteration_ends_when_server_closes(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def handler(tunnel: Tunnel) -> None:
        for i in range(5):
            tunnel.send(b"item %d" % i)
        await tunnel.close(0, "done sending")  # returning would close it too

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            tunnel = await connect(url_of(server), cconf)
            got = [data async for data in tunnel]
            assert got == [b"item %d" % i for i in range(5)]
            closed = await tunnel.closed
            assert closed == ConnectionClosed(0, "done sending", by_peer=True)
            with pytest.raises(ConnectionClosedError):
                await tunnel.recv()
            with pytest.raises(ConnectionClosedError):
                tunnel.send(b"too late")

    run(main())


def test_client_close_is_seen_by_server_handler(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)
    handler_done: asyncio.Future[ConnectionClosed] | None = None

    async def handler(tunnel: Tunnel) -> None:
        async for data in tunnel:
            tunnel.send(data)
        assert handler_done is not None
        handler_done.set_result(await tunnel.closed)

    async def main() -> None:
        nonlocal handler_done
        handler_done = asyncio.get_running_loop().create_future()
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            tunnel = await connect(url_of(server), cconf)
            tunnel.send(b"ping")
            assert await tunnel.recv() == b"ping"
            assert len(server.tunnels) == 1
            started = time.monotonic()
            ours = await tunnel.close(0x0000, "bye")
            assert ours.by_peer is False and ours.error_code == 0
            assert time.monotonic() - started < 1.0  # the peer answered; no full drain needed
            assert tunnel.is_closed and tunnel.connection.closed
            with pytest.raises(ConnectionClosedError):
                tunnel.send(b"after close")
            theirs = await asyncio.wait_for(handler_done, 3.0)
            assert theirs.by_peer is True
            assert theirs.error_code == 0 and theirs.reason == "bye"
            assert server.tunnels == []
            assert server.endpoint.connections == []

    run(main())


def test_several_clients_at_once(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, echo) as server:
            tunnels = await asyncio.gather(*(connect(url_of(server), cconf) for _ in range(3)))
            for i, tunnel in enumerate(tunnels):
                tunnel.send(b"client %d" % i)
            for i, tunnel in enumerate(tunnels):
                assert await tunnel.recv() == b"echo:client %d" % i
            assert len(server.tunnels) == 3
            await asyncio.gather(*(t.close() for t in tunnels))

    run(main())


def test_server_close_closes_tunnels_and_socket(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def main() -> None:
        server = await serve("udp://127.0.0.1:0", sconf, echo)
        tunnel = await connect(url_of(server), cconf)
        tunnel.send(b"x")
        assert await tunnel.recv() == b"echo:x"
        server.close()
        await server.wait_closed()
        closed = await asyncio.wait_for(tunnel.wait_closed(), 3.0)
        assert closed.by_peer and closed.error_code == 0
        assert not server.is_serving
        await tunnel.close()  # already closed: returns the same event at once
        assert (await tunnel.close()) == closed

    run(main())


def test_handler_exception_closes_tunnel_with_internal_error(
    server_id: Identity, client_id: Identity
) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def handler(tunnel: Tunnel) -> None:
        await tunnel.recv()
        raise RuntimeError("handler bug (expected by the test)")

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            tunnel = await connect(url_of(server), cconf)
            tunnel.send(b"boom")
            closed = await asyncio.wait_for(tunnel.wait_closed(), 3.0)
            assert closed.by_peer
            assert closed.error_code == ErrorCode.ErrorInternal

    run(main())


# -- handshake failures ------------------------------------------------------------------------


def test_unpinned_client_key_is_refused(server_id: Identity, client_id: Identity) -> None:
    sconf, _ = make_configs(server_id, client_id)
    stranger = Config(identity=Identity.generate(), trusted_peers=[server_id.public_key])
    called = False

    async def handler(tunnel: Tunnel) -> None:
        nonlocal called
        called = True

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            with pytest.raises(HandshakeError) as info:
                await connect(url_of(server), stranger)
            assert server.tunnels == []
        assert info.value.code == ErrorCode.ErrorCertificateInvalid
        assert int(info.value.code) == 0x0107
        assert "ErrorCertificateInvalid" in str(info.value)
        assert not isinstance(info.value, TimeoutError)
        assert not called

    run(main())


def test_unpinned_server_key_is_refused(server_id: Identity, client_id: Identity) -> None:
    sconf, _ = make_configs(server_id, client_id)
    wrong_pin = Config(identity=client_id, trusted_peers=[Identity.generate().public_key])

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, echo) as server:
            with pytest.raises(HandshakeError) as info:
                await connect(url_of(server), wrong_pin)
        assert info.value.code == ErrorCode.ErrorCertificateInvalid

    run(main())


def test_nothing_listening_times_out_quickly(client_id: Identity) -> None:
    config = Config(identity=client_id, trusted_peers=[client_id.public_key],
                    handshake_timeout=1.0)
    port = free_udp_port()

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(HandshakeTimeoutError) as info:
            await connect(f"udp://127.0.0.1:{port}", config)
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 3.0, elapsed
        # Both spellings of "it timed out" catch it.
        assert isinstance(info.value, asyncio.TimeoutError)
        assert isinstance(info.value, HandshakeError)
        assert info.value.code == ErrorCode.ErrorHandshakeTimeout
        assert "timed out" in str(info.value) or "no answer" in str(info.value)

    run(main())


def test_connect_timeout_argument_bounds_the_wait(client_id: Identity) -> None:
    config = Config(identity=client_id, trusted_peers=[client_id.public_key])  # 15 s default
    port = free_udp_port()

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"timed out after 0\.5 s"):
            await connect(f"udp://127.0.0.1:{port}", config, timeout=0.5)
        assert time.monotonic() - started < 2.0

    run(main())


# -- misuse and URLs ------------------------------------------------------------------------------


def test_send_validation(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, echo) as server:
            async with await connect(url_of(server), cconf) as tunnel:
                with pytest.raises(ValueError):
                    tunnel.send(b"x", stream_id=0xFE)  # reserved for keepalives
                tunnel.send(bytearray(b"buffer types work"))
                assert await tunnel.recv() == b"echo:buffer types work"
            assert tunnel.is_closed

    run(main())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("udp://127.0.0.1:4433", ("udp", "127.0.0.1", 4433, {})),
        ("UDP://example.org:1", ("udp", "example.org", 1, {})),
        ("udp://[::1]:0", ("udp", "::1", 0, {})),
        ("udp://localhost:65535/?mtu=1200", ("udp", "localhost", 65535, {"mtu": "1200"})),
    ],
)
def test_parse_url_accepts(url: str, expected: tuple[str, str, int, dict[str, str]]) -> None:
    assert tuple(parse_url(url)) == expected


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:4433",  # no scheme
        "tcp://127.0.0.1:4433",  # unsupported scheme
        "udp://127.0.0.1",  # no port
        "udp://127.0.0.1:",  # empty port
        "udp://127.0.0.1:65536",  # port out of range
        "udp://127.0.0.1:-1",
        "udp://127.0.0.1:http",
        "udp://::1:4433",  # IPv6 without brackets
        "udp://[::1:4433",  # unterminated bracket
        "udp://[nothex]:4433",
        "udp://300.1.1.1:4433",  # not an IPv4 address
        "udp://:4433",  # no host
        "udp://bad_host!:4433",
        "udp://user@127.0.0.1:4433",
        "udp://127.0.0.1:4433/path",
        "udp://127.0.0.1:4433#frag",
        "udp://127.0.0.1:\uff14\uff14\uff13\uff13",  # fullwidth (non-ASCII) digits
    ],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(ConfigError, match="bad URL"):
        parse_url(url)


def test_connect_rejects_bad_urls_before_any_io(client_id: Identity) -> None:
    config = Config(identity=client_id, trusted_peers=[client_id.public_key])

    async def main() -> None:
        with pytest.raises(ConfigError):
            await connect("udp://127.0.0.1", config)
        with pytest.raises(ConfigError, match="port cannot be 0"):
            await connect("udp://127.0.0.1:0", config)

    run(main())


def test_udp_transport_delivers_datagrams() -> None:
    async def main() -> None:
        a = await UdpTransport.bind("127.0.0.1", 0)
        b = await UdpTransport.bind("127.0.0.1", 0)
        got: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        b.on_datagram = lambda data, addr: got.put_nowait((data, addr))
        assert a.max_datagram_size == 1200 and a.link_bits_per_second is None
        a.send(b"datagram", b.local_address)
        data, addr = await asyncio.wait_for(got.get(), 2.0)
        assert data == b"datagram" and addr == a.local_address
        for t in (a, b):
            t.close()
            await t.wait_closed()
            assert t.is_closing
        a.send(b"dropped, not raised", b.local_address)

    run(main())


def test_serve_reports_a_busy_port(server_id: Identity, client_id: Identity) -> None:
    sconf, _ = make_configs(server_id, client_id)

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, echo) as server:
            with pytest.raises(OSError):
                await serve(url_of(server), sconf, echo)

    run(main())


def test_slow_reader_drops_beyond_the_queue_bound(
    server_id: Identity, client_id: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    import palisade_c.aio

    monkeypatch.setattr(palisade_c.aio, "MAX_QUEUED_EVENTS", 3)
    sconf, cconf = make_configs(server_id, client_id)
    go = asyncio.Event()

    async def handler(tunnel: Tunnel) -> None:
        await go.wait()
        for i in range(10):
            tunnel.send(b"%d" % i)
        await tunnel.recv()  # the client says when it is done

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            async with await connect(url_of(server), cconf) as tunnel:
                go.set()
                deadline = time.monotonic() + 3
                while tunnel.connection.counters["packets_in"] < 10:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                assert [await tunnel.recv() for _ in range(3)] == [b"0", b"1", b"2"]
                assert tunnel.counters["drops"] == {"rx-queue-full": 7}
                tunnel.send(b"done")

    run(main())


def test_recv_event_reports_the_close_once(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def handler(tunnel: Tunnel) -> None:
        tunnel.send(b"only")

    async def main() -> None:
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            tunnel = await connect(url_of(server), cconf)
            first = await tunnel.recv_event()
            assert first == DataReceived(0, b"only")
            last = await tunnel.recv_event()  # the handler returned: the server closed
            assert isinstance(last, ConnectionClosed) and last.by_peer
            with pytest.raises(ConnectionClosedError):
                await tunnel.recv_event()
            await tunnel.close()

    run(main())


def test_cancelled_connect_releases_its_socket(client_id: Identity) -> None:
    config = Config(identity=client_id, trusted_peers=[client_id.public_key])
    port = free_udp_port()

    async def main() -> None:
        task = asyncio.create_task(connect(f"udp://127.0.0.1:{port}", config))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    # A socket left open would warn (ResourceWarning) when collected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(main())
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_package_exports_the_asyncio_api() -> None:
    import palisade_c
    import palisade_c.aio

    assert palisade_c.connect is palisade_c.aio.connect
    assert palisade_c.serve is palisade_c.aio.serve
    assert palisade_c.Tunnel is palisade_c.aio.Tunnel
    assert palisade_c.Server is palisade_c.aio.Server
    with pytest.raises(AttributeError):
        _ = palisade_c.not_a_name


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback(server_id: Identity, client_id: Identity) -> None:
    sconf, cconf = make_configs(server_id, client_id)

    async def main() -> None:
        async with await serve("udp://[::1]:0", sconf, echo) as server:
            host, port = server.address
            assert host == "::1"
            async with await connect(f"udp://[::1]:{port}", cconf) as tunnel:
                tunnel.send(b"six")
                assert await tunnel.recv() == b"echo:six"

    run(main())


# -- PALISADE-PLUS over real UDP ------------------------------------------------------------


def test_resumption_with_early_data_and_migration_over_udp(
        server_id: Identity, client_id: Identity, tmp_path: Path) -> None:
    """Full handshake with the ticket saved to a file; a second connection resumes from it
    with 0-RTT data, then moves to a new UDP source port mid-session and keeps talking."""
    plus = PLUS_RESUMPTION | PLUS_MIGRATION
    sconf, cconf = make_configs(server_id, client_id, plus_features=plus)
    seen: list[tuple[bytes, bool]] = []

    async def handler(tunnel: Tunnel) -> None:
        while True:
            event = await tunnel.recv_event()
            if isinstance(event, DataReceived):
                seen.append((event.data, event.early))
                tunnel.send(b"echo:" + event.data)

    async def main() -> None:
        path = tmp_path / "tickets.json"
        cache = ClientTicketCache(path)
        async with await serve("udp://127.0.0.1:0", sconf, handler) as server:
            url = url_of(server)
            first = await connect(url, cconf, tickets=cache)
            first.send(b"one")
            assert await first.recv() == b"echo:one"
            await first.close()
            assert len(ClientTicketCache(path)) == 1  # persisted for the next process

            second = await connect(url, cconf, tickets=cache, early_data=b"zero-rtt")
            assert second.handshake is not None and second.handshake.resumed
            assert second.handshake.early_data_accepted
            assert await second.recv() == b"echo:zero-rtt"
            before = second.connection.counters["packets_out"]
            await second.migrate()
            second.send(b"after the move")
            assert await second.recv() == b"echo:after the move"
            assert second.connection.counters["packets_out"] > before
            await second.close()

    run(main())
    assert (b"zero-rtt", True) in seen and (b"after the move", False) in seen
