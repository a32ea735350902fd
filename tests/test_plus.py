"""PALISADE-PLUS: tickets, resumption with 0-RTT early data, and soft migration.

Seed §4 and §5, spec §12 and §13, PROFILE §7 and §8.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, SimLink, make_pair, seeded_rng

from palisade_c import frames as F
from palisade_c import hsrecord as hs
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import EpochStateError, ErrorCode, StateError
from palisade_c.events import (
    ConnectionClosed,
    DataReceived,
    HandshakeCompleted,
    NewTicket,
    PathMigrated,
)
from palisade_c.identity import Identity
from palisade_c.record import RecordLayer
from palisade_c.tickets import (
    ClientTicket,
    ClientTicketCache,
    MemoryTicketStore,
    SqliteTicketStore,
    TicketInner,
    TicketKeyRing,
    TicketService,
    decode_new_ticket,
    encode_new_ticket,
)

PLUS = PLUS_RESUMPTION | PLUS_MIGRATION


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def configs(ids: tuple[Identity, Identity], seed: int = 1, *, plus: int = PLUS,
            server_plus: int | None = None, **kw: Any) -> tuple[Config, Config]:
    ci, si = ids
    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed),
                plus_features=plus, **kw)
    sc = Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed + 7),
                plus_features=plus if server_plus is None else server_plus, **kw)
    return cc, sc


def first_session(ids: tuple[Identity, Identity], **kw: Any) -> tuple[Pair, Connection,
                                                                       ClientTicket]:
    pair = make_pair(*configs(ids, **kw))
    session = pair.handshake()
    pair.run(duration=0.5)
    tickets = [e.event.ticket for e in pair.link.events_of("client", NewTicket)]
    assert len(tickets) == 1
    return pair, session, tickets[0]


def resume(pair: Pair, ticket: ClientTicket, early: bytes | None = None, *,
           addr: Any = ("10.0.0.9", 40000), name: str = "resumer",
           config: Config | None = None) -> Connection:
    conn = Connection(config or pair.client.config, True, name=name, event_log=pair.log.append)
    pair.link.add(name, addr, conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=ticket, early_data=early)
    pair.run(lambda: conn.established or conn.closed, duration=10)
    pair.run(duration=0.5)  # let the server take the client's Finished
    return conn


def server_events(pair: Pair, kind: type) -> list[Any]:
    return [e.event for e in pair.link.events_of("server", kind)]


# -- tickets -----------------------------------------------------------------------------------


def test_new_ticket_after_a_full_handshake(ids: tuple[Identity, Identity]) -> None:
    _, _, ticket = first_session(ids)
    assert ticket.server_fingerprint == ids[1].fingerprint
    assert ticket.max_early_data == 4096
    assert len(ticket.psk) == 32 and ticket.psk not in ticket.ticket  # opaque to the client


def test_core_sessions_get_no_ticket(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, plus=0))
    pair.handshake()
    pair.run(duration=0.5)
    assert pair.link.events_of("client", NewTicket) == []


def test_ticket_sealing_binds_key_and_server() -> None:
    clock = FakeClock()
    ring = TicketKeyRing(b"S" * 32, rotate_every=100, clock=clock)
    inner = TicketInner(b"i" * 16, clock(), 60, b"p" * 32, 10, b"c" * 32, 0x11, 0x21, 1)
    sealed = ring.seal(inner)
    assert ring.open(sealed) == inner
    for i in range(len(sealed)):  # any tampered byte makes it unopenable
        bad = bytearray(sealed)
        bad[i] ^= 1
        assert ring.open(bytes(bad)) is None
    assert TicketKeyRing(b"T" * 32, clock=clock).open(sealed) is None  # another server
    ring.rotate()
    assert ring.open(sealed) == inner  # previous key still opens
    ring.rotate()
    assert ring.open(sealed) is None  # two rotations later it is gone
    assert ring.open(b"short") is None and ring.open(b"x" * 5000) is None


def test_ticket_service_expiry_and_single_use() -> None:
    clock = FakeClock()
    svc = TicketService(b"S" * 32, clock=clock, lifetime=60)
    t = svc.issue(b"p" * 32, b"n" * 16, b"c" * 32, 0x11, 0x21, 1)
    inner, why = svc.redeem(t)
    assert inner is not None and why == ""
    assert svc.redeem(t) == (None, "replayed")
    t2 = svc.issue(b"p" * 32, b"m" * 16, b"c" * 32, 0x11, 0x21, 1)
    clock.t += 61
    assert svc.redeem(t2) == (None, "expired")


def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "used.sqlite"
    store = SqliteTicketStore(db)
    assert store.claim(b"a" * 16, 100.0, 0.0)
    assert not store.claim(b"a" * 16, 100.0, 0.0)
    store.close()
    again = SqliteTicketStore(db)
    assert not again.claim(b"a" * 16, 100.0, 1.0)
    assert again.purge(200.0) == 1
    assert again.claim(b"a" * 16, 300.0, 200.0)  # forgotten only after expiry
    again.close()


def test_memory_store_refuses_when_full_of_live_ids() -> None:
    store = MemoryTicketStore(max_entries=2)
    assert store.claim(b"a", 10.0, 0.0) and store.claim(b"b", 10.0, 0.0)
    assert not store.claim(b"c", 10.0, 0.0)  # never forgets a live id to make room
    assert store.claim(b"c", 30.0, 11.0)  # expired ones are purged first


def test_new_ticket_frame_codec() -> None:
    frame = encode_new_ticket(3600, 4096, b"n" * 16, b"opaque")
    assert decode_new_ticket(frame) == (3600, 4096, b"n" * 16, b"opaque")
    for bad in (frame.data[:-1], frame.data + b"x", frame.data[:10]):
        with pytest.raises(ValueError):
            decode_new_ticket(F.ControlFrame(F.CTRL_NEW_TICKET, bad))


def test_client_ticket_file(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "tickets.json"
    cache = ClientTicketCache(path, clock=clock)
    t = ClientTicket(b"t", b"p" * 32, "fp", clock() + 10, 5)
    cache.add(t)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reread = ClientTicketCache(path, clock=clock)
    assert reread.take("fp") == t
    assert ClientTicketCache(path, clock=clock).take("fp") is None  # single use, persisted
    cache.add(ClientTicket(b"u", b"p" * 32, "fp", clock() + 10, 5))
    clock.t += 11
    assert ClientTicketCache(path, clock=clock).take() is None  # expired


# -- resumption -----------------------------------------------------------------------------


def test_resumption_with_early_data(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    conn = resume(pair, ticket, b"GET /status")
    assert conn.established and conn.resumed
    done = [e.event for e in pair.link.events_of("resumer", HandshakeCompleted)]
    assert done == [HandshakeCompleted(ids[1].fingerprint, resumed=True, plus_features=PLUS,
                                       early_data_accepted=True)]
    early = [d for d in server_events(pair, DataReceived) if d.early]
    assert early == [DataReceived(0, b"GET /status", early=True)]
    # The resumed session is a real one: data both ways, and it gets its own fresh ticket.
    conn.send_data(b"after")
    pair.run(duration=0.5)
    assert DataReceived(0, b"after") in server_events(pair, DataReceived)
    assert len(pair.link.events_of("resumer", NewTicket)) == 1


def test_resumption_costs_no_signature(ids: tuple[Identity, Identity],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = Identity.sign

    def counting_sign(self: Identity, data: bytes, context: bytes) -> bytes:
        calls.append("sign")
        return original(self, data, context)

    monkeypatch.setattr(Identity, "sign", counting_sign)
    pair, _, ticket = first_session(ids)
    assert calls == ["sign", "sign"]  # the counter sees a full handshake's two signatures
    calls.clear()
    conn = resume(pair, ticket)
    assert conn.established and calls == []


def _fallback_case(pair: Pair, ticket: ClientTicket, code: int) -> None:
    conn = resume(pair, ticket, b"early")
    assert conn.established and not conn.resumed, conn.state
    refused = [e for e in pair.log if e["kind"] == "resumption-refused" and e["conn"] == "resumer"]
    assert [e["code"] for e in refused] == [code]
    assert not [d for d in server_events(pair, DataReceived) if d.early]


def test_tampered_ticket_falls_back(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    bad = bytearray(ticket.ticket)
    bad[20] ^= 0x40
    _fallback_case(pair, dataclasses.replace(ticket, ticket=bytes(bad)),
                   ErrorCode.ErrorTicketInvalid)


def test_expired_ticket_falls_back(ids: tuple[Identity, Identity]) -> None:
    clock = FakeClock()
    pair, _, ticket = first_session(ids, ticket_clock=clock)
    clock.t += 3601
    # The client still believes it usable (its own clock says so): the server decides.
    _fallback_case(pair, dataclasses.replace(ticket, expires_at=clock.t + 10),
                   ErrorCode.ErrorTicketExpired)


def test_wrong_server_ticket_falls_back(ids: tuple[Identity, Identity]) -> None:
    _, _, ticket = first_session(ids)
    other = make_pair(*configs(ids, seed=99))  # same identity, fresh ticket keys
    _fallback_case(other, ticket, ErrorCode.ErrorTicketInvalid)


def test_a_ticket_is_single_use(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    assert resume(pair, ticket, name="first").resumed
    second = resume(pair, ticket, addr=("10.0.0.10", 1), name="second")
    assert second.established and not second.resumed


def test_resumption_refused_by_a_core_server(ids: tuple[Identity, Identity]) -> None:
    _, _, ticket = first_session(ids)
    core = make_pair(*configs(ids, seed=5, server_plus=0))
    _fallback_case(core, ticket, ErrorCode.ErrorTicketInvalid)


# -- 0-RTT rules -------------------------------------------------------------------------------


def _capture_first_flight(pair: Pair, ticket: ClientTicket, early: bytes) -> list[bytes]:
    """Resume once, keeping a copy of the resumer's first flight (CHR and the 0-RTT packets
    that connect() queued together), then let the resumption finish normally."""
    addr = ("10.0.0.9", 40000)
    conn = Connection(pair.client.config, True, name="resumer")
    pair.link.add("resumer", addr, conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=ticket, early_data=early)
    flight = [d for d, _ in conn.datagrams_to_send(pair.link.now)]
    assert [d[:2] for d in flight].count(b"QP") >= 1 and flight[0][:2] == b"QH"
    for i, d in enumerate(flight):
        pair.link.inject(d, addr, SERVER_ADDR, delay=0.001 * i)
    pair.run(lambda: conn.established, duration=10)
    pair.run(duration=0.5)
    assert conn.resumed
    return flight


def test_replayed_zero_rtt_flight_is_accepted_at_most_once(
        ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    flight = _capture_first_flight(pair, ticket, b"pay 1 coin")
    for replay in range(3):
        for d in flight:
            pair.link.inject(d, ("10.66.0.1", 1000 + replay), SERVER_ADDR)
        pair.run(duration=2.0)
    early = [d for d in server_events(pair, DataReceived) if d.early]
    assert early == [DataReceived(0, b"pay 1 coin", early=True)]


def test_zero_rtt_replay_refused_after_a_server_restart(
        ids: tuple[Identity, Identity], tmp_path: Path) -> None:
    ci, si = ids
    clock = FakeClock()
    db = tmp_path / "used.sqlite"

    def server_config(seed: int) -> Config:
        svc = TicketService(bytes.fromhex(si.fingerprint), SqliteTicketStore(db),
                            rng=lambda n: b"K" * n, clock=clock)  # the same ticket keys
        return Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed),
                      plus_features=PLUS, tickets=svc, ticket_clock=clock)

    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(3),
                plus_features=PLUS, ticket_clock=clock)
    pair = make_pair(cc, server_config(4))
    pair.handshake()
    pair.run(duration=0.5)
    (ticket,) = [e.event.ticket for e in pair.link.events_of("client", NewTicket)]
    flight = _capture_first_flight(pair, ticket, b"once only")
    # "Restart": a brand-new endpoint on the same SQLite file and ticket keys.
    link = SimLink(8)
    restarted = ServerEndpoint(server_config(5))
    link.add("server", SERVER_ADDR, restarted)
    for d in flight:
        link.inject(d, ("10.66.0.2", 5), SERVER_ADDR)
    events = link.run(duration=3.0)
    assert not [e for e in events if isinstance(e.event, DataReceived)]
    closes = [e.event for e in events if isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closes] == [ErrorCode.ErrorTicketReplayed]


def test_early_data_over_the_ticket_limit_is_refused(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    # The client is honest about its ticket, so forge a larger allowance on its side: the
    # server must enforce the one sealed in the ticket (4096), not the client's idea of it.
    greedy = dataclasses.replace(ticket, max_early_data=100_000)
    conn = resume(pair, greedy, bytes(3000) + bytes(3000))
    assert conn.resumed
    early = [d for d in server_events(pair, DataReceived) if d.early]
    assert sum(len(d.data) for d in early) <= 4096
    resumed_session = next(c for c in pair.server.connections if c.resumed)
    assert resumed_session.drop_counts.get("early-data-limit", 0) >= 1


def test_control_frames_in_early_data_are_ignored(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    conn = Connection(pair.client.config, True, name="resumer")
    pair.link.add("resumer", ("10.0.0.9", 40000), conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=ticket, early_data=b"ok")
    early = conn._early
    assert early is not None
    # Timed to land after the CHR that creates the session, before the CFR that ends 0-RTT.
    for frame in (F.encode_close(0, True, "x"), F.encode_rekey(1, F.REKEY_ANNOUNCE),
                  F.encode_migrate(b"m" * 32, 0)):
        pkt = early.seal(F.encode_frames([frame]), 0, True)
        pair.link.inject(pkt, ("10.0.0.9", 40000), SERVER_ADDR, delay=0.015)
    pkt = early.seal(b"not allowlisted", 9)
    pair.link.inject(pkt, ("10.0.0.9", 40000), SERVER_ADDR, delay=0.015)
    pair.run(lambda: conn.established, duration=10)
    pair.run(duration=1.0)
    session = next(c for c in pair.server.connections if c.resumed)
    assert session.established and session.epoch == 0
    assert session.drop_counts.get("early-control-ignored") == 3
    assert session.drop_counts.get("early-stream-refused") == 1
    assert [d.data for d in server_events(pair, DataReceived) if d.early] == [b"ok"]


def test_early_record_layer_epoch_and_sequence() -> None:
    a = RecordLayer(bytes(32), True, bytes(24), early=True)
    b = RecordLayer(bytes(32), False, bytes(24), early=True)
    rec = b.open(a.seal(b"x"))
    assert rec is not None and rec.epoch == 0xFFFFFFFF and rec.seq == 1
    with pytest.raises(EpochStateError):
        a.arm_next_epoch()  # 0-RTT keys never rekey


# -- migration ----------------------------------------------------------------------------------


def _move_client(pair: Pair, new_addr: Any) -> None:
    """The client's address changes: detach it and attach it at ``new_addr``."""
    link = pair.link
    node = link.nodes.pop("client")
    del link._by_addr[node.addr]
    link.add("client", new_addr, pair.client)


def test_migration_to_a_new_source_port_keeps_the_session(
        ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=21))
    session = pair.handshake()
    new_addr = (CLIENT_ADDR[0], CLIENT_ADDR[1] + 1)
    _move_client(pair, new_addr)
    pair.client.migrate()
    pair.client.send_data(b"from the new port")
    pair.run(duration=1.0)
    assert session.peer_addr == new_addr
    assert server_events(pair, PathMigrated) == [PathMigrated(new_addr)]
    session.send_data(b"reply reaches the new port")
    pair.run(duration=0.5)
    got = [e.event for e in pair.link.events_of("client", DataReceived)]
    assert DataReceived(0, b"reply reaches the new port") in got
    assert session.epoch == pair.client.epoch == 0  # keys and epochs untouched


def test_nat_rebinding_is_validated_like_a_migration(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=22))
    session = pair.handshake()
    new_addr = ("192.0.2.7", 61000)
    _move_client(pair, new_addr)
    pair.client.send_data(b"rebound")  # no CTRL_MIGRATE at all
    pair.run(duration=1.0)
    assert session.peer_addr == new_addr


def test_replayed_migrate_is_rejected(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=23))
    session = pair.handshake()
    assert pair.client.record is not None
    nonce = b"N" * 32
    frame = F.encode_frames([F.encode_migrate(nonce, 0)])
    first = pair.client.record.seal(frame, 0, True)
    again = pair.client.record.seal(frame, 0, True)  # same nonce, fresh packet
    pair.link.inject(first, CLIENT_ADDR, SERVER_ADDR)
    pair.link.inject(first, CLIENT_ADDR, SERVER_ADDR, delay=0.01)  # the packet replayed
    pair.link.inject(again, CLIENT_ADDR, SERVER_ADDR, delay=0.02)  # the nonce replayed
    pair.run(duration=0.5)
    assert session.drop_counts.get("replay") == 1
    assert session.drop_counts.get("migrate-replay") == 1


def test_unvalidated_path_gets_at_most_three_times_its_bytes(
        ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=24, migration_packets=1000))
    session = pair.handshake()
    spoofed = ("203.0.113.5", 9)
    assert pair.client.record is not None
    pkt = pair.client.record.seal(b"x", 0)
    pair.link.inject(pkt, spoofed, SERVER_ADDR)
    pair.run(duration=1.0)
    sent = pair.link.bytes_emitted(SERVER_ADDR, spoofed)
    assert 0 < sent <= 3 * len(pkt)
    assert session.peer_addr == CLIENT_ADDR  # never promoted without validation


def test_core_ignores_migration(ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*configs(ids, seed=25, plus=0))
    session = pair.handshake()
    with pytest.raises(StateError):
        pair.client.migrate()
    assert pair.client.record is not None
    frame = F.encode_frames([F.encode_migrate(b"M" * 32, 0)])
    pair.link.inject(pair.client.record.seal(frame, 0, True), ("198.51.100.1", 7), SERVER_ADDR)
    pair.run(duration=1.0)
    assert session.peer_addr == CLIENT_ADDR
    assert session.drop_counts.get("ignored-control") == 1
    assert pair.link.bytes_emitted(SERVER_ADDR, ("198.51.100.1", 7)) == 0


def test_hard_migration_is_resumption_from_the_new_path(ids: tuple[Identity, Identity]) -> None:
    pair, _, ticket = first_session(ids)
    conn = resume(pair, ticket, addr=("192.0.2.99", 50001), name="moved")
    assert conn.resumed and conn.established
    assert any(c.resumed and c.peer_addr == ("192.0.2.99", 50001)
               for c in pair.server.connections)


def test_resumption_messages_are_rejected_when_malformed(ids: tuple[Identity, Identity]) -> None:
    pair, _, _ = first_session(ids)
    body = b"\x12" + b"\x00" * 5
    for rec in hs.fragment_message(hs.MSG_CLIENT_HELLO_RESUME, b"R" * 24, 0, body, 1200):
        pair.link.inject(rec, ("10.1.1.1", 1), SERVER_ADDR)
    events = pair.link.run(duration=1.0)
    closes = [e.event for e in events if isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closes] == [ErrorCode.ErrorInvalidClientHello]


def test_a_ticket_from_a_server_no_longer_pinned_is_not_used(
        ids: tuple[Identity, Identity]) -> None:
    """Resuming would skip the pin check a full handshake makes, so an unpinned server's
    ticket starts a full handshake (which then fails on the pin, 0x0107)."""
    _, _, ticket = first_session(ids)
    other = Identity.generate()
    cc = Config(identity=ids[0], trusted_peers=[other.public_key], rng=seeded_rng(5),
                plus_features=PLUS)
    client = Connection(cc, True)
    client.connect(SERVER_ADDR, 0.0, ticket=ticket)
    assert client.state == "C_WAIT_SH"  # a full ClientHello went out, not a resumption
    sent = client.datagrams_to_send(0.0)
    assert sent and all(d[3] == hs.MSG_CLIENT_HELLO for d, _ in sent)
