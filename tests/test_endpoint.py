"""ServerEndpoint: many sessions on one transport, the amplification bound, cookies, replays.

Everything runs over the seeded in-memory link of ``simlink.py``. The amplification checks
measure the wire itself (bytes the endpoint emitted towards an address against bytes the link
delivered from it), not the endpoint's own counters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from simlink import (
    CLIENT_ADDR,
    SERVER_ADDR,
    SimLink,
    hs_type,
    is_handshake,
    make_pair,
    record_rid,
    seeded_rng,
)

from palisade_c import hsrecord as hs
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import ErrorCode
from palisade_c.events import ConnectionClosed, DataReceived, HandshakeCompleted
from palisade_c.identity import Identity

FACTOR = 3


@dataclass(frozen=True)
class Ids:
    client: Identity
    server: Identity


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(Identity.generate(), Identity.generate())


def client_config(ids: Ids, seed: int, **kw: Any) -> Config:
    return Config(identity=ids.client, trusted_peers=[ids.server.public_key],
                  rng=seeded_rng(seed), **kw)


def server_config(ids: Ids, seed: int, **kw: Any) -> Config:
    return Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                  rng=seeded_rng(seed + 7919), **kw)


def client_hello_datagrams(ids: Ids, seed: int) -> list[bytes]:
    """The first flight of a real client: its ClientHello fragments."""
    client = Connection(client_config(ids, seed), True)
    client.connect(SERVER_ADDR, 0.0)
    out = [d for d, _ in client.datagrams_to_send()]
    assert len(out) >= 3 and all(hs_type(d) == hs.MSG_CLIENT_HELLO for d in out)
    return out


def amplification_walk(link: SimLink, client_addr: Any, session_rid: bytes | None
                       ) -> tuple[int, int, bool]:
    """Replay the wire in order. Until the client proves it saw the ServerHello (a handshake
    record from it carrying the session RID), every datagram the server emits towards the
    client's address must keep the total within FACTOR x the bytes delivered from there.
    Returns (sent, received, validated) at the moment of validation, or at the end."""
    timeline: list[tuple[float, int, int, bytes]] = []
    for i, e in enumerate(link.delivered):
        if e.src == client_addr and e.dst == SERVER_ADDR:
            timeline.append((e.time, 0, i, e.data))
    for i, e in enumerate(link.emitted):
        if e.src == SERVER_ADDR and e.dst == client_addr:
            timeline.append((e.time, 1, i, e.data))
    timeline.sort(key=lambda x: x[:3])  # at one instant, deliveries come before what they cause
    sent = received = 0
    for _, kind, _, data in timeline:
        if kind == 0:
            received += len(data)
            if session_rid is not None and is_handshake(data) and record_rid(data) == session_rid:
                return sent, received, True
        else:
            sent += len(data)
            assert sent <= FACTOR * received, (sent, received)
    return sent, received, False


# --- the amplification bound -------------------------------------------------------------------


def test_amplification_first_client_hello_fragment_only(ids: Ids) -> None:
    server = ServerEndpoint(server_config(ids, 1))
    link = SimLink(1)
    link.add("server", SERVER_ADDR, server)
    first = client_hello_datagrams(ids, 1)[0]
    link.inject(first, CLIENT_ADDR, SERVER_ADDR)
    link.run(duration=60)
    sent, received, _ = amplification_walk(link, CLIENT_ADDR, None)
    assert received == len(first) and 0 < sent <= FACTOR * received
    # It acknowledged what it holds (and nothing else: no ServerHello without a ClientHello).
    assert {hs_type(e.data) for e in link.emitted} == {hs.MSG_HANDSHAKE_ACK}
    # The half-open session is bounded in time.
    closed = [e.event for e in link.events if isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closed] == [0x010A]
    assert server.connections == [] and server.get_timer() is None


def test_amplification_client_that_only_ever_sends_its_first_fragment(ids: Ids) -> None:
    """A real client whose other ClientHello fragments never arrive keeps retransmitting; each
    copy buys the server a little budget, which it spends on acks only."""
    pair = make_pair(client_config(ids, 2, handshake_timeout=10.0), server_config(ids, 2),
                     mitm=lambda d, s, dst, now: []
                     if hs_type(d) == hs.MSG_CLIENT_HELLO and hs.decode(d).frag_offset > 0
                     else None)
    pair.connect()
    pair.run(lambda: pair.client.closed and not pair.server.connections, duration=30)
    sent, received, _ = amplification_walk(pair.link, CLIENT_ADDR, None)
    assert 0 < sent <= FACTOR * received
    assert pair.client.state == "C_CLOSED"
    assert not any(hs_type(e.data) == hs.MSG_SERVER_HELLO for e in pair.link.emitted)


def test_amplification_client_silent_after_its_hello(ids: Ids) -> None:
    server = ServerEndpoint(server_config(ids, 3))
    link = SimLink(3)
    link.add("server", SERVER_ADDR, server)
    hello = client_hello_datagrams(ids, 3)
    for d in hello:
        link.inject(d, CLIENT_ADDR, SERVER_ADDR)
    link.run(duration=60)
    sent, received, _ = amplification_walk(link, CLIENT_ADDR, None)
    assert received == sum(map(len, hello))
    # The budget is nearly used up by the ServerHello, and its retransmissions stop there
    # instead of going on for the whole handshake timeout.
    sh_bytes = sum(len(e.data) for e in link.emitted if hs_type(e.data) == hs.MSG_SERVER_HELLO)
    assert FACTOR * received - 1200 < sent <= FACTOR * received
    assert sh_bytes == sent
    closed = [e.event for e in link.events if isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closed] == [0x010A]
    assert server.connections == []


def test_amplification_server_hello_lost_once(ids: Ids) -> None:
    """The whole first ServerHello flight is lost: the client's retransmitted hello buys the
    budget for the retransmitted ServerHello, and the handshake completes within the bound."""
    lost: list[bytes] = []

    def lose_first_sh(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        if hs_type(data) == hs.MSG_SERVER_HELLO and now < 0.05:
            lost.append(data)
            return []
        return None

    pair = make_pair(client_config(ids, 4), server_config(ids, 4), mitm=lose_first_sh)
    session = pair.handshake(duration=20)
    assert lost
    sent, received, validated = amplification_walk(pair.link, CLIENT_ADDR, session.rid)
    # Before the client proved its address the server sent the lost flight and (part of) a
    # second one, all within the bound the walk checked datagram by datagram.
    assert validated and sent > sum(map(len, lost)) and sent <= FACTOR * received


@pytest.mark.parametrize("seed", [31, 32, 33, 34, 35, 36])
def test_amplification_bound_over_a_hostile_link(ids: Ids, seed: int) -> None:
    pair = make_pair(client_config(ids, seed), server_config(ids, seed), seed=seed, loss=0.2,
                     duplicate=0.2, min_delay=0.005, max_delay=0.15)
    session = pair.handshake(duration=30)
    _, _, validated = amplification_walk(pair.link, CLIENT_ADDR, session.rid)
    assert validated


# --- many clients, cookies, limits ----------------------------------------------------------------


@pytest.mark.parametrize("cookie_threshold", [256, 20])
def test_two_hundred_clients_on_one_endpoint(ids: Ids, cookie_threshold: int) -> None:
    server = ServerEndpoint(server_config(ids, 5, cookie_threshold=cookie_threshold))
    link = SimLink(5, min_delay=0.005, max_delay=0.015)
    link.add("server", SERVER_ADDR, server)
    cfg = client_config(ids, 5)
    clients: list[tuple[Any, Connection]] = []
    for i in range(200):
        addr = (f"10.1.{i // 200}.{i % 200 + 1}", 40000 + i)
        client = Connection(cfg, True)
        link.add(f"client-{i}", addr, client)
        clients.append((addr, client))
    for _, client in clients:  # all at once, so the half-open count really climbs
        client.connect(SERVER_ADDR, 0.0)
    link.run(lambda: all(c.established for _, c in clients)
             and len(server.connections) == 200 and server.half_open == 0, duration=20)

    assert all(c.state == "C_ESTABLISHED" for _, c in clients)
    sessions = server.connections
    assert len(sessions) == 200 and all(s.state == "S_ESTABLISHED" for s in sessions)
    assert {s.rid for s in sessions} == {c.rid for _, c in clients}
    assert {s.peer_addr for s in sessions} == {a for a, _ in clients}
    done = [e for e in link.events if e.node == "server" and isinstance(e.event,
                                                                        HandshakeCompleted)]
    assert len(done) == 200
    if cookie_threshold < 200:
        assert server.retries_sent > 0
        # While the first cookie_threshold sessions were half-open, every other client was
        # sent away with a Retry; each came back under a cookie RID and made it.
        retry_targets = {e.dst for e in link.emitted
                         if e.src == SERVER_ADDR and hs_type(e.data) == hs.MSG_RETRY}
        assert len(retry_targets) >= 200 - cookie_threshold - 10
        by_addr = dict(clients)
        assert all(by_addr[a].established for a in retry_targets)
    else:
        assert server.retries_sent == 0
    # Every session carries its own data.
    for i, (_, c) in enumerate(clients[:20]):
        c.send_data(b"client %d" % i)
    link.run(duration=0.5)
    got = sorted(e.event.data for e in link.events if isinstance(e.event, DataReceived))
    assert got == sorted(b"client %d" % i for i in range(20))


def test_retry_cookie_is_bound_to_the_address(ids: Ids) -> None:
    server = ServerEndpoint(server_config(ids, 6, cookie_threshold=0))
    client = Connection(client_config(ids, 6), True)
    addr_a, addr_b = ("192.0.2.1", 1111), ("198.51.100.7", 2222)
    client.connect(SERVER_ADDR, 0.0)
    first = [d for d, _ in client.datagrams_to_send()]
    server.receive_datagram(first[0], addr_a, 0.0)
    retry = server.datagrams_to_send()
    assert [(hs_type(d), a) for d, a in retry] == [(hs.MSG_RETRY, addr_a)]
    assert server.connections == [] and server.retries_sent == 1
    client.receive_datagram(retry[0][0], SERVER_ADDR, 0.01)
    with_cookie = [d for d, _ in client.datagrams_to_send()]
    assert with_cookie and all(record_rid(d) != record_rid(first[0]) for d in with_cookie)
    # From another address the cookie is worthless: another Retry, no session.
    server.receive_datagram(with_cookie[0], addr_b, 0.02)
    second_retry = server.datagrams_to_send()
    assert [(hs_type(d), a) for d, a in second_retry] == [(hs.MSG_RETRY, addr_b)]
    assert server.connections == []
    # From the address it was made for, it opens a session that is validated from the start.
    for d in with_cookie:
        server.receive_datagram(d, addr_a, 0.03)
    (session,) = server.connections
    assert session.state == "S_WAIT_FIN"
    out = server.datagrams_to_send()
    assert sum(hs_type(d) == hs.MSG_SERVER_HELLO for d, _ in out) >= 1
    # A client follows one Retry only: neither a repeat of the first nor a Retry answering
    # its cookie hello moves it again.
    client.receive_datagram(retry[0][0], SERVER_ADDR, 0.04)
    client.receive_datagram(second_retry[0][0], SERVER_ADDR, 0.04)
    assert record_rid(second_retry[0][0]) == record_rid(with_cookie[0])
    assert client.datagrams_to_send() == []
    assert client.drop_counts.get("stale-retry") == 2
    assert client.rid == record_rid(with_cookie[0])


def test_retry_works_with_non_ip_transport_addresses(ids: Ids) -> None:
    """Transport addresses are opaque to the core (a serial device path, a gateway name): the
    cookie path must not choke on them."""
    server = ServerEndpoint(server_config(ids, 7, cookie_threshold=0))
    client = Connection(client_config(ids, 7), True)
    link = SimLink(7)
    link.add("server", "/dev/ttyUSB0:server", server)
    link.add("client", "/dev/ttyUSB0", client)
    client.connect("/dev/ttyUSB0:server", 0.0)
    link.run(lambda: client.established and any(s.established for s in server.connections),
             duration=10)
    assert client.established and server.retries_sent >= 1


def test_half_open_limit_drops_then_admits(ids: Ids) -> None:
    server = ServerEndpoint(server_config(ids, 8, max_half_open=4))
    link = SimLink(8, min_delay=0.005, max_delay=0.015)
    link.add("server", SERVER_ADDR, server)
    clients = []
    for i in range(10):
        c = Connection(client_config(ids, 80 + i), True)
        link.add(f"c{i}", (f"10.2.0.{i + 1}", 5000), c)
        clients.append(c)
        c.connect(SERVER_ADDR, 0.0)
    max_half_open = 0

    def watch(now: float) -> None:
        nonlocal max_half_open
        max_half_open = max(max_half_open, server.half_open)
        if not all(c.established or c.closed for c in clients):
            link.schedule(now + 0.001, watch)

    link.schedule(0.0, watch)
    link.run(lambda: all(c.established or c.closed for c in clients) and server.half_open == 0,
             duration=30)
    # Those beyond the cap are told at once (0x0202) instead of timing out; the rest connect.
    refused = [i for i, c in enumerate(clients) if not c.established]
    assert 0 < len(refused) < len(clients)
    for i in refused:
        assert [(ev.error_code, ev.by_peer) for ev in link.closes(f"c{i}")] == [
            (ErrorCode.ErrorSessionLimitExceeded, True)]
    assert server.drop_counts.get("half-open-limit", 0) > 0
    assert max_half_open <= 4


# --- replayed hellos ------------------------------------------------------------------------------


def test_replayed_hello_while_established_creates_no_session(ids: Ids) -> None:
    pair = make_pair(client_config(ids, 9), server_config(ids, 9))
    session = pair.handshake()
    hello = [e.data for e in pair.link.emitted if hs_type(e.data) == hs.MSG_CLIENT_HELLO]
    attacker = ("203.0.113.66", 666)
    pair.link.add("attacker", attacker, Connection(client_config(ids, 99), True))
    for i, d in enumerate(hello * 3):
        pair.link.inject(d, attacker, SERVER_ADDR, delay=0.001 * i)
        pair.link.inject(d, CLIENT_ADDR, SERVER_ADDR, delay=0.001 * i)
    pair.run(duration=2)
    assert pair.server.connections == [session] and session.state == "S_ESTABLISHED"
    assert pair.link.bytes_emitted(SERVER_ADDR, attacker) == 0
    assert session.drop_counts.get("unexpected-handshake", 0) == 2 * len(hello) * 3


def test_replayed_hello_after_close_is_bounded(ids: Ids) -> None:
    """Once the session is gone, a replayed ClientHello does open a new half-open session (the
    endpoint keeps no history), but it never completes: the answer goes to a client that has
    moved on, the ClientFinished replay finds no session, the bytes stay within the bound and
    the session times out."""
    scfg = server_config(ids, 10, handshake_timeout=5.0)
    pair = make_pair(client_config(ids, 10), scfg)
    session = pair.handshake()
    pair.client.close(0, "done")
    pair.run(lambda: pair.client.closed and session.closed, duration=5)
    assert pair.server.connections == []
    recorded = [e for e in pair.link.emitted if e.src == CLIENT_ADDR and is_handshake(e.data)]
    mark_emitted, mark_delivered = len(pair.link.emitted), len(pair.link.delivered)
    for i, e in enumerate(recorded):
        pair.link.inject(e.data, CLIENT_ADDR, SERVER_ADDR, delay=0.001 * i)
    pair.run(duration=0.5)
    replays = pair.server.connections
    assert len(replays) == 1 and replays[0].state == "S_WAIT_FIN"
    assert pair.server.drop_counts.get("unknown-rid", 0) > 0  # the CF under the old RID
    pair.run(duration=20)
    assert pair.server.connections == []
    closes = [e.event for e in pair.link.events
              if e.connection is replays[0] and isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closes] == [0x010A]
    assert not any(e.connection is replays[0] and isinstance(e.event, HandshakeCompleted)
                   for e in pair.link.events)
    sent = sum(len(e.data) for e in pair.link.emitted[mark_emitted:] if e.src == SERVER_ADDR)
    received = sum(len(e.data) for e in pair.link.delivered[mark_delivered:]
                   if e.dst == SERVER_ADDR)
    assert 0 < sent <= FACTOR * received


# --- hostile input never raises -------------------------------------------------------------------


def test_garbage_never_raises_and_never_establishes(ids: Ids) -> None:
    rng = random.Random(12)
    hello = client_hello_datagrams(ids, 12)
    server = ServerEndpoint(server_config(ids, 12))
    client = Connection(client_config(ids, 13), True)
    client.connect(SERVER_ADDR, 0.0)
    client.datagrams_to_send()
    now = 0.0
    for _ in range(1500):
        now += 0.001
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.randrange(0, 1300))
        elif kind == 1:
            data = b"QH" + rng.randbytes(rng.randrange(0, 200))
        elif kind == 2:
            data = b"QH\x12" + bytes([rng.choice([1, 2, 3, 0x7D, 0x7E, 0x7F])]) \
                + rng.randbytes(rng.randrange(26, 400))
        else:
            base = bytearray(rng.choice(hello))
            for _ in range(rng.randrange(1, 6)):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            data = bytes(base[: rng.randrange(1, len(base) + 1)])
        server.receive_datagram(data, ("192.0.2.9", rng.randrange(1, 65535)), now)
        client.receive_datagram(data, SERVER_ADDR, now)
        server.handle_timer(now)
        client.handle_timer(now)
        server.datagrams_to_send()
        client.datagrams_to_send()
    assert not any(s.established for s in server.connections)
    assert client.state in ("C_WAIT_SH", "C_CLOSED") and client.record is None
    assert sum(server.drop_counts.values()) > 0
    # Whatever state the garbage created is bounded in time: every half-open session has a
    # deadline, and they are all gone once the handshake timeout has passed.
    assert all(s.get_timer() is not None for s in server.connections)
    server.handle_timer(now + 60.0)
    assert server.connections == []


def test_amplification_blocked_server_resumes_when_the_client_speaks_again(ids: Ids) -> None:
    """Everything the server sends is lost for two seconds, so its ServerHello retransmissions
    run into the bound and wait. The client's next retransmitted hello (its first timeout is
    set past the outage) raises the budget, the waiting datagrams go out, and the handshake
    completes, all within the bound."""
    pair = make_pair(client_config(ids, 14, initial_rto=3.0), server_config(ids, 14),
                     mitm=lambda d, src, dst, now: [] if src == SERVER_ADDR and now < 2.0
                     else None)
    session = pair.handshake(duration=20)
    sent, received, validated = amplification_walk(pair.link, CLIENT_ADDR, session.rid)
    assert validated and sent <= FACTOR * received
    # The server really ran into the bound during the outage: it had spent the whole budget
    # (to within one datagram) that the client's hellos had bought until then.
    before_heal = [e for e in pair.link.emitted if e.src == SERVER_ADDR and e.time < 2.0]
    assert sum(len(e.data) for e in before_heal) >= FACTOR * sum(
        len(e.data) for e in pair.link.delivered if e.dst == SERVER_ADDR and e.time < 2.0
    ) - 1200


def test_endpoint_close_soft_closes_every_session(ids: Ids) -> None:
    server = ServerEndpoint(server_config(ids, 15, close_drain_time=0.5))
    link = SimLink(15)
    link.add("server", SERVER_ADDR, server)
    clients = []
    for i in range(3):
        c = Connection(client_config(ids, 150 + i), True)
        link.add(f"c{i}", (f"10.3.0.{i + 1}", 7000), c)
        c.connect(SERVER_ADDR, 0.0)
        clients.append(c)
    link.run(lambda: all(c.established for c in clients)
             and all(s.established for s in server.connections), duration=5)
    link.run(duration=0.2)
    # One more peer is half-way through its handshake (hello only, no client attached).
    for d in client_hello_datagrams(ids, 159):
        link.inject(d, ("10.3.0.99", 7000), SERVER_ADDR)
    link.run(duration=0.1)
    assert len(server.connections) == 4 and server.half_open == 1
    server.close(0x0001, "shutting down")
    link.run(lambda: not server.connections and all(c.closed for c in clients), duration=5)
    assert server.connections == [] and server.get_timer() is None
    for i, c in enumerate(clients):
        closes = link.closes(f"c{i}")
        assert [(x.error_code, x.reason, x.by_peer) for x in closes] == [
            (0x0001, "shutting down", True)]
        assert c.state == "C_CLOSED" and c.record is not None and c.record.erased
    server_closes = link.closes("server")
    assert len(server_closes) == 4
    assert all(x.error_code == 0x0001 and not x.by_peer for x in server_closes)


def test_undecodable_hello_lookalikes_hold_no_half_open_slot(ids: Ids) -> None:
    """A datagram that only looks like a ClientHello record (magic, type byte, 24 bytes of
    RID, nothing decodable) must not leave a session behind: such a session would never time
    out, and max_half_open of them would lock every real client out for good."""
    server = ServerEndpoint(server_config(ids, 16, max_half_open=8))
    rng = random.Random(16)
    for i in range(40):
        lookalike = b"QH\x12\x01" + rng.randbytes(2) + rng.randbytes(24) + rng.randbytes(i % 9)
        server.receive_datagram(lookalike, (f"10.4.0.{i + 1}", 9), 0.0)
    assert server.datagrams_to_send() == []
    assert all(s.get_timer() is not None for s in server.connections)
    server.handle_timer(100.0)
    assert server.connections == [] and server.half_open == 0
    # And the endpoint still serves a real client.
    link = SimLink(16)
    link.add("server", SERVER_ADDR, server)
    client = Connection(client_config(ids, 16), True)
    link.add("client", CLIENT_ADDR, client)
    client.connect(SERVER_ADDR, 100.0)
    link.now = 100.0
    link.run(lambda: client.established, duration=5)
    assert client.established
