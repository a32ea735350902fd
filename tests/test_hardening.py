"""Issue 10, item 6: bounded buffers, escaped peer text, ticket purging, migration rules,
session limits and erasure of ephemeral secrets.

Each test here failed on the code before its fix (see the commit that added it).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, hs_type, make_pair, seeded_rng

from palisade_c import frames as F
from palisade_c import handshake as H
from palisade_c import hsrecord as hs
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.connection import MAX_EARLY_PACKETS, MAX_MIGRATE_NONCES, Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import ConnectionClosedError, ErrorCode, HandshakeError
from palisade_c.events import ConnectionClosed, NewTicket
from palisade_c.identity import Identity
from palisade_c.tickets import SqliteTicketStore, TicketService

PLUS = PLUS_RESUMPTION | PLUS_MIGRATION
EVIL = "bye\nFORGED palisade_c: all good\x1b[2J\u202e\x85"


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def configs(ids: tuple[Identity, Identity], seed: int = 1, *, plus: int = PLUS,
            server: dict[str, Any] | None = None, **kw: Any) -> tuple[Config, Config]:
    ci, si = ids
    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed),
                plus_features=plus, **kw)
    sc = Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed + 7),
                plus_features=plus, **{**kw, **(server or {})})
    return cc, sc


def closes(pair: Pair, node: str) -> list[ConnectionClosed]:
    return pair.link.closes(node)


# -- early-packet buffer ---------------------------------------------------------------------


def _chr_fragment(rid: bytes) -> bytes:
    """One small ClientHelloResume fragment: enough to open a half-open session."""
    return hs.HandshakeRecord(hs.MSG_CLIENT_HELLO_RESUME, rid, 0, 0, 2000, b"\x00" * 10).encode()


def _junk_packet(rid: bytes, size: int) -> bytes:
    return b"QP" + b"\x00" * 4 + rid + b"\xaa" * (size - 30)


def test_early_packet_buffer_is_bounded_per_session_and_in_total(
        ids: tuple[Identity, Identity]) -> None:
    _, sc = configs(ids, max_early_buffer_bytes=100_000)
    ep = ServerEndpoint(sc)
    per_session = MAX_EARLY_PACKETS * sc.max_datagram_size
    for i in range(20):
        rid = bytes([i + 1]) * 24
        addr = ("198.51.100.1", 1000 + i)
        ep.receive_datagram(_chr_fragment(rid), addr, 0.0)
        for _ in range(MAX_EARLY_PACKETS + 4):
            ep.receive_datagram(_junk_packet(rid, 60_000), addr, 0.0)  # far over the MTU
            ep.receive_datagram(_junk_packet(rid, 1000), addr, 0.0)
    sessions = ep.connections
    assert len(sessions) == 20
    assert all(c.early_buffered_bytes <= per_session for c in sessions)
    assert ep.early_buffered_bytes == sum(c.early_buffered_bytes for c in sessions)
    assert ep.early_buffered_bytes <= 100_000
    assert ep.drop_counts.get("early-buffer-full", 0) >= 20 * (MAX_EARLY_PACKETS + 4)
    # Closing the sessions gives the bytes back to the endpoint's pool.
    ep.handle_timer(1000.0)
    assert ep.connections == [] and ep.early_buffered_bytes == 0


def test_data_overtaking_finished_still_waits_within_the_bound(
        ids: tuple[Identity, Identity]) -> None:
    """The bound does not break what the buffer is for: data that overtakes CF."""
    pair = make_pair(*configs(ids, seed=3))

    def hold_cf(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        if hs_type(data) == hs.MSG_CLIENT_FINISHED and now < 0.5:
            pair.link.inject(data, src, dst, delay=0.6 - now)
            return []
        return None

    pair.link.mitm = hold_cf
    pair.connect()
    pair.run(lambda: pair.client.established, 5)
    pair.client.send_data(b"early bird")
    pair.run(duration=2.0)
    assert pair.link.data_received("server") == [b"early bird"]
    assert pair.server.early_buffered_bytes == 0


# -- peer-chosen text ------------------------------------------------------------------------


def _clean(caplog: pytest.LogCaptureFixture) -> list[str]:
    msgs = [r.getMessage() for r in caplog.records]
    for m in msgs:
        assert "\n" not in m and "\x1b" not in m and "\u202e" not in m and "\x85" not in m, m
    return msgs


def test_printable_escapes_controls_and_is_idempotent() -> None:
    from palisade_c.safetext import printable

    out = printable(EVIL)
    assert out.isprintable()
    assert "\\n" in out and "\\x1b" in out and "\\u202e" in out
    assert printable(out) == out


def test_peer_hard_close_reason_is_logged_escaped(
        ids: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture) -> None:
    pair = make_pair(*configs(ids, seed=4))
    session = pair.handshake()
    caplog.set_level(logging.INFO, logger="palisade_c")
    pair.client._send_control(F.encode_close(int(ErrorCode.ErrorProtocolViolation), True, EVIL))
    pair.run(duration=0.5)
    assert session.closed
    msgs = _clean(caplog)
    assert any("FORGED" in m for m in msgs)


def test_peer_soft_close_reason_is_logged_by_the_core_escaped(
        ids: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture) -> None:
    pair = make_pair(*configs(ids, seed=5))
    session = pair.handshake()
    caplog.set_level(logging.INFO, logger="palisade_c.connection")
    pair.client.close(7, EVIL)
    pair.run(duration=3.0)
    assert session.closed
    msgs = _clean(caplog)
    peer_lines = [m for m in msgs if "closed by peer" in m]
    assert len(peer_lines) == 1 and "FORGED" in peer_lines[0] and "0x0007" in peer_lines[0]


def test_error_response_details_are_escaped_in_logs_and_exceptions(
        ids: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="palisade_c")
    cc, _ = configs(ids)
    client = Connection(cc, True)
    client.connect(SERVER_ADDR, 0.0)
    rid = client.rid
    body = b"\x01\x07" + len(EVIL.encode()).to_bytes(2, "big") + EVIL.encode()
    rec = hs.HandshakeRecord(hs.MSG_ERROR_RESPONSE, rid, 0, 0, len(body), body)
    client.receive_datagram(rec.encode(), SERVER_ADDR, 0.1)
    assert client.closed
    _clean(caplog)
    for exc in (HandshakeError(ErrorCode.ErrorCertificateInvalid, EVIL),
                ConnectionClosedError(1, EVIL)):
        assert str(exc).isprintable() and "FORGED" in str(exc)


# -- used-ticket table purging ---------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_endpoint_purges_expired_ticket_ids_in_bounded_batches(
        ids: tuple[Identity, Identity], tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteTicketStore(tmp_path / "used.db")
    for i in range(2500):
        assert store.claim(i.to_bytes(16, "big"), clock.t - 10, clock.t - 100)  # expired
    for i in range(30):
        assert store.claim(b"live" + i.to_bytes(12, "big"), clock.t + 3600, clock.t)
    service = TicketService(bytes(32), store, clock=clock)
    _, sc = configs(ids, tickets=service, ticket_clock=clock)
    ep = ServerEndpoint(sc)

    def rows() -> int:
        with sqlite3.connect(tmp_path / "used.db") as db:
            return int(db.execute("SELECT COUNT(*) FROM used_tickets").fetchone()[0])

    counts = []
    now = 0.0
    for _ in range(10):
        deadline = ep.get_timer()
        assert deadline is not None  # the purge is scheduled on the sans-IO timer
        now = max(now, deadline)
        ep.handle_timer(now)
        counts.append(rows())
    # Never the whole backlog in one call, and in the end only the live ids remain.
    assert counts[0] >= 2530 - 1000 and counts[0] < 2530
    assert counts[-1] == 30
    store.close()


# -- migration -------------------------------------------------------------------------------


def test_migrate_nonce_memory_forgets_the_oldest_first(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=6))
    session = pair.handshake()
    record = pair.client.record
    assert record is not None
    nonces = [i.to_bytes(4, "big") * 8 for i in range(MAX_MIGRATE_NONCES + 100)]
    now = pair.link.now

    def send(nonce: bytes) -> None:
        frame = F.encode_frames([F.encode_migrate(nonce, 0)])
        session.receive_datagram(record.seal(frame, 0, True), CLIENT_ADDR, now)

    for n in nonces:
        send(n)
    assert session.drop_counts.get("migrate-replay", 0) == 0
    for n in nonces[-MAX_MIGRATE_NONCES:]:  # the last 1024 are all remembered
        send(n)
    assert session.drop_counts.get("migrate-replay", 0) == MAX_MIGRATE_NONCES
    send(nonces[0])  # the oldest was forgotten
    assert session.drop_counts.get("migrate-replay", 0) == MAX_MIGRATE_NONCES


@pytest.mark.parametrize("bad", ["reason", "replay"])
def test_invalid_migrate_does_not_make_its_address_a_candidate(
        ids: tuple[Identity, Identity], bad: str) -> None:
    pair = make_pair(*configs(ids, seed=7, migration_packets=1))
    session = pair.handshake()
    record = pair.client.record
    assert record is not None
    nonce = b"R" * 32
    if bad == "replay":
        pair.link.inject(record.seal(F.encode_frames([F.encode_migrate(nonce, 0)]), 0, True),
                         CLIENT_ADDR, SERVER_ADDR)
        pair.run(duration=0.2)
    reason = 0x02 if bad == "reason" else F.MIGRATE_REASON_SOFT
    elsewhere = ("203.0.113.77", 4000)
    pkt = record.seal(F.encode_frames([F.encode_migrate(nonce, 0, reason)]), 0, True)
    pair.link.inject(pkt, elsewhere, SERVER_ADDR)
    pair.run(duration=1.0)
    assert session.peer_addr == CLIENT_ADDR
    assert pair.link.bytes_emitted(SERVER_ADDR, elsewhere) == 0  # no PATH_CHALLENGE there
    assert session.drop_counts.get("migrate-replay" if bad == "replay" else "migrate-invalid")
    # A valid migration from there still works.
    pair.link.inject(record.seal(F.encode_frames([F.encode_migrate(b"V" * 32, 0)]), 0, True),
                     elsewhere, SERVER_ADDR)
    pair.run(duration=1.0)
    assert session.peer_addr == elsewhere


# -- session limits --------------------------------------------------------------------------


def _hello(cc: Config, addr: Any) -> tuple[Connection, list[bytes]]:
    conn = Connection(cc, True)
    conn.connect(SERVER_ADDR, 0.0)
    return conn, [d for d, _ in conn.datagrams_to_send()]


def _deliver_replies(ep: ServerEndpoint, clients: dict[Any, Connection], now: float) -> None:
    for data, addr in ep.datagrams_to_send():
        if addr in clients:
            clients[addr].receive_datagram(data, SERVER_ADDR, now)


def test_half_open_cap_answers_session_limit_exceeded(ids: tuple[Identity, Identity]) -> None:
    cc, sc = configs(ids, server={"max_half_open": 2, "cookie_threshold": 2})
    ep = ServerEndpoint(sc)
    clients: dict[Any, Connection] = {}
    for i in range(3):
        addr = ("192.0.2.1", 2000 + i)
        conn, hello = _hello(cc, addr)
        clients[addr] = conn
        ep.receive_datagram(hello[0], addr, 0.0)
    _deliver_replies(ep, clients, 0.01)
    third = clients[("192.0.2.1", 2002)]
    assert third.closed
    ev = third.next_event()
    assert isinstance(ev, ConnectionClosed)
    assert ev.error_code == ErrorCode.ErrorSessionLimitExceeded and ev.by_peer
    assert not any(c.closed for a, c in clients.items() if a[1] != 2002)
    assert ep.drop_counts.get("half-open-limit") == 1


def test_session_limit_answers_are_rate_limited(ids: tuple[Identity, Identity]) -> None:
    cc, sc = configs(ids, server={"max_half_open": 1, "cookie_threshold": 1})
    ep = ServerEndpoint(sc)
    _, hello = _hello(cc, None)
    ep.receive_datagram(hello[0], ("192.0.2.1", 1), 0.0)
    ep.datagrams_to_send()
    for i in range(500):  # a flood of (spoofed) hellos at one instant
        rid = i.to_bytes(4, "big") * 6
        rec = hs.HandshakeRecord(hs.MSG_CLIENT_HELLO, rid, 0, 0, 5000, b"\x12" * 100)
        ep.receive_datagram(rec.encode(), ("198.51.100.9", 3000 + i), 0.0)
    burst = len(ep.datagrams_to_send())
    assert 0 < burst <= 50
    for i in range(500):
        rid = (i + 1000).to_bytes(4, "big") * 6
        rec = hs.HandshakeRecord(hs.MSG_CLIENT_HELLO, rid, 0, 0, 5000, b"\x12" * 100)
        ep.receive_datagram(rec.encode(), ("198.51.100.9", 3000 + i), 1.0)
    assert 0 < len(ep.datagrams_to_send()) <= 50
    assert ep.drop_counts.get("half-open-limit") == 1000


def test_session_cap_answers_session_limit_exceeded(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=8, server={"max_sessions": 1}))
    pair.handshake()
    second = Connection(pair.client.config, True, name="second")
    pair.link.add("second", ("10.0.0.3", 50001), second)
    second.connect(SERVER_ADDR, pair.link.now)
    pair.run(lambda: second.closed, 5.0)
    assert [c.error_code for c in closes(pair, "second")] == [ErrorCode.ErrorSessionLimitExceeded]
    assert pair.server.drop_counts.get("session-limit", 0) >= 1


def test_resumption_at_the_cap_does_not_fall_back_forever(ids: tuple[Identity, Identity]) -> None:
    """0x0202 answering a ClientHelloResume ends the attempt; it is not a ticket refusal."""
    cc, sc = configs(ids, server={"max_half_open": 1, "cookie_threshold": 1})
    ep = ServerEndpoint(sc)
    _, hello = _hello(cc, None)
    ep.receive_datagram(hello[0], ("192.0.2.1", 1), 0.0)
    ep.datagrams_to_send()
    pair = make_pair(*configs(ids, seed=9))
    pair.handshake()
    pair.run(duration=0.5)
    ticket = next(e.event.ticket for e in pair.link.events_of("client", NewTicket))
    client = Connection(cc, True)
    client.connect(SERVER_ADDR, 0.0, ticket=ticket)
    assert client.state == "C_RESUME_PENDING"
    addr = ("192.0.2.5", 5)
    for data, _ in client.datagrams_to_send():
        ep.receive_datagram(data, addr, 0.1)
    _deliver_replies(ep, {addr: client}, 0.2)
    assert client.closed
    ev = client.next_event()
    assert isinstance(ev, ConnectionClosed)
    assert ev.error_code == ErrorCode.ErrorSessionLimitExceeded


def test_server_handshake_expiry_tells_the_client_session_expired(
        ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=10, server={"handshake_timeout": 2.0}))

    def drop_cf(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        # Every CF but its first fragment is lost (a path that eats one size of datagram):
        # the server sees the client (its address is validated) but never a whole CF.
        if hs_type(data) == hs.MSG_CLIENT_FINISHED and hs.decode(data).frag_offset > 0:
            return []
        return None

    pair.link.mitm = drop_cf
    pair.connect()
    pair.run(lambda: pair.client.closed, 10.0)
    got = closes(pair, "client")
    assert [c.error_code for c in got] == [ErrorCode.ErrorSessionExpired]
    assert got[0].by_peer
    assert pair.link.now < 4.0  # told at the server's expiry, not after its own resends ran out


# -- ephemeral secrets -----------------------------------------------------------------------


def _full_handshake_objects(ids: tuple[Identity, Identity],
                            monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    real = H.ks.early_ikm

    def spy(ss_c: Any, ss_s: Any, cn: bytes, sn: bytes) -> bytearray:
        seen.extend([ss_c, ss_s])
        return real(ss_c, ss_s, cn, sn)

    monkeypatch.setattr(H.ks, "early_ikm", spy)
    cc, sc = configs(ids)
    client = H.ClientHandshake(cc)
    server = H.ServerHandshake(sc)
    sh = server.on_client_hello(client.client_hello_bytes)
    held = server._ss_c
    assert isinstance(held, bytearray) and any(held)
    cf = client.on_server_hello(sh)
    server.on_client_finished(cf)
    return [held, *seen]


def test_kem_shared_secrets_live_in_wiped_buffers(
        ids: tuple[Identity, Identity], monkeypatch: pytest.MonkeyPatch) -> None:
    buffers = _full_handshake_objects(ids, monkeypatch)
    assert len(buffers) == 5  # the server's held ss_c, then (ss_c, ss_s) on each side
    for buf in buffers:
        assert isinstance(buf, bytearray) and len(buf) == 32 and not any(buf)


def test_server_erase_zeroes_a_half_done_handshake(ids: tuple[Identity, Identity]) -> None:
    cc, sc = configs(ids)
    client = H.ClientHandshake(cc)
    server = H.ServerHandshake(sc)
    server.on_client_hello(client.client_hello_bytes)
    held = server._ss_c
    assert isinstance(held, bytearray) and any(held)
    server.erase()
    assert not any(held)


def test_session_limit_surfaces_as_a_clear_error_over_udp(ids: tuple[Identity, Identity]) -> None:
    from aiohelpers import run_bounded, served

    from palisade_c.aio import Tunnel, connect

    cc, sc = configs(ids, plus=0, server={"max_sessions": 1})

    async def hold(tunnel: Tunnel) -> None:
        await tunnel.wait_closed()

    async def main() -> None:
        async with served("udp://127.0.0.1:0", sc, hold) as server:
            url = f"udp://127.0.0.1:{server.address[1]}"
            first = await connect(url, cc, timeout=5)
            with pytest.raises(HandshakeError) as info:
                await connect(url, cc, timeout=5)
            assert info.value.code == ErrorCode.ErrorSessionLimitExceeded
            # What the CLI prints after "palisade: handshake failed: ", on one line.
            assert str(info.value).startswith("ErrorSessionLimitExceeded (0x0202): ")
            assert "session limit" in str(info.value) and str(info.value).isprintable()
            await first.close()

    run_bounded(main(), 20)


def test_a_failing_ticket_purge_does_not_stop_the_endpoint(
        ids: tuple[Identity, Identity], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A locked or broken SQLite file must not raise out of handle_timer: the asyncio shell
    shuts a server down when its core raises there."""
    store = SqliteTicketStore(tmp_path / "used.db")

    def locked(now: float, limit: int | None = None) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "purge", locked)
    clock = FakeClock()
    _, sc = configs(ids, tickets=TicketService(bytes(32), store, clock=clock),
                    ticket_clock=clock)
    ep = ServerEndpoint(sc)
    ep.handle_timer(0.0)  # must not raise
    deadline = ep.get_timer()
    assert deadline is not None and deadline > 0.0  # tried again later
    store.close()


def test_resumption_kem_secrets_live_in_wiped_buffers(
        ids: tuple[Identity, Identity], monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(*configs(ids, seed=11))
    pair.handshake()
    pair.run(duration=0.5)
    ticket = next(e.event.ticket for e in pair.link.events_of("client", NewTicket))
    seen: list[Any] = []
    real = H.ks.early_ikm

    def spy(ss_c: Any, ss_s: Any, cn: bytes, sn: bytes) -> bytearray:
        seen.extend([ss_c, ss_s])
        return real(ss_c, ss_s, cn, sn)

    monkeypatch.setattr(H.ks, "early_ikm", spy)
    again = Connection(pair.client.config, True, name="again")
    pair.link.add("again", ("10.0.0.4", 50002), again)
    again.connect(SERVER_ADDR, pair.link.now, ticket=ticket)
    pair.run(lambda: again.established, 5.0)
    pair.run(duration=0.5)
    assert again.established and again.resumed
    assert len(seen) == 4  # (ss_c, ss_s) on each side
    for buf in seen:
        assert isinstance(buf, bytearray) and len(buf) == 32 and not any(buf)
