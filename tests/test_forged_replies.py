"""One forged datagram must not end a client's handshake (issue 10, item 1).

The client's socket is not connected, so anyone who knows its address can send it handshake
records. A reply counts only if it comes from the server's address and carries a RID the client
can tie to its own hello (§8.4: the session RID ends in check bytes over the hello RID).
Anything else is dropped and counted; a reply that fails verification is discarded while the
genuine one may still come.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, hs_type, make_pair, seeded_rng

from palisade_c import hsrecord as hs
from palisade_c import wire
from palisade_c.config import Config
from palisade_c.connection import answers_hello, session_rid
from palisade_c.errors import ErrorCode
from palisade_c.events import ConnectionClosed
from palisade_c.identity import Identity

ELSEWHERE = ("10.6.6.6", 4433)


@dataclass(frozen=True)
class Ids:
    client: Identity
    server: Identity


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(Identity.generate(), Identity.generate())


def configs(ids: Ids, seed: int, **server: object) -> tuple[Config, Config]:
    client = Config(identity=ids.client, trusted_peers=[ids.server.public_key],
                    rng=seeded_rng(seed))
    server_cfg = Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                        rng=seeded_rng(seed + 7919), **server)  # type: ignore[arg-type]
    return client, server_cfg


def record(msg_type: int, rid: bytes, body: bytes, *, msg_length: int | None = None) -> bytes:
    length = len(body) if msg_length is None else msg_length
    return hs.HandshakeRecord(msg_type, rid, 0, 0, length, body).encode()


def established(pair: Pair) -> bool:
    return pair.client.established and any(c.established for c in pair.server.connections)


def finish(pair: Pair) -> None:
    pair.run(lambda: established(pair) or pair.client.closed, duration=30)
    assert established(pair), (pair.client.state, pair.client.drop_counts,
                               pair.link.closes("client"))
    assert not pair.link.closes("client")


def test_a_session_rid_is_tied_to_its_hello() -> None:
    hello = os.urandom(24)
    rid = session_rid(hello, b"N" * 8, os.urandom(7))
    assert len(rid) == 24 and rid[:10] == b"N" * 8 + b"\0\0"
    assert answers_hello(hello, rid)
    assert not answers_hello(os.urandom(24), rid)
    assert not answers_hello(hello, rid[:-1] + bytes([rid[-1] ^ 1]))
    assert not answers_hello(hello, rid[:-1])


def test_a_forged_server_hello_under_a_random_rid_is_dropped(ids: Ids) -> None:
    """A 40-byte datagram from the server's address (spoofed): a complete 'SH' under a RID
    the client never saw. Before the fix this ended the handshake with 0x0105."""
    pair = make_pair(*configs(ids, 1))
    pair.connect()
    forged = record(hs.MSG_SERVER_HELLO, os.urandom(24), b"\x00" * 10)
    pair.link.inject(forged, SERVER_ADDR, CLIENT_ADDR)
    finish(pair)
    assert pair.client.drop_counts.get("unknown-rid", 0) >= 1


def test_a_forged_fragment_does_not_stop_the_hello(ids: Ids) -> None:
    """A forged fragment arrives, the genuine CH is lost: the client must keep resending its
    hello. Before the fix any fragment stopped the retransmission, and the handshake died."""
    lost = {"ch": 0}

    def drop_first_hello(data: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if hs_type(data) == hs.MSG_CLIENT_HELLO and now < 0.05:
            lost["ch"] += 1
            return []
        return None

    pair = make_pair(*configs(ids, 2), mitm=drop_first_hello)
    pair.connect()
    forged = record(hs.MSG_SERVER_HELLO, os.urandom(24), b"\x00" * 10, msg_length=5000)
    pair.link.inject(forged, SERVER_ADDR, CLIENT_ADDR, delay=0.01)
    finish(pair)
    assert lost["ch"] >= 1


def test_replies_from_elsewhere_are_dropped(ids: Ids) -> None:
    """Records from another address, even with the right RIDs (an ErrorResponse echoing the
    hello, a Retry), are not the server's: dropped and counted, never fatal."""
    pair = make_pair(*configs(ids, 3))
    pair.connect()
    hello_rid = pair.client.rid
    err = wire.ErrorResponse(error_code=int(ErrorCode.ErrorCertificateInvalid),
                             details="go away").encode()
    pair.link.inject(record(hs.MSG_ERROR_RESPONSE, hello_rid, err), ELSEWHERE, CLIENT_ADDR)
    retry_rid = hello_rid[:8] + os.urandom(16)
    pair.link.inject(record(hs.MSG_RETRY, hello_rid, retry_rid), ELSEWHERE, CLIENT_ADDR)
    finish(pair)
    assert pair.client.drop_counts.get("wrong-source", 0) == 2


def test_a_replayed_flight_of_another_session_is_dropped(ids: Ids) -> None:
    """Anyone who recorded a genuine SH flight can replay it from the server's own address;
    it answers another hello, so its RID does not tie to ours."""
    first = make_pair(*configs(ids, 4))
    first.handshake()
    flight = [w.data for w in first.link.emitted
              if w.src == SERVER_ADDR and hs_type(w.data) == hs.MSG_SERVER_HELLO]
    assert flight
    pair = make_pair(*configs(ids, 5))
    pair.connect()
    for data in flight:
        pair.link.inject(data, SERVER_ADDR, CLIENT_ADDR)
    finish(pair)
    assert pair.client.drop_counts.get("unknown-rid", 0) >= len(flight)


def test_a_reply_failing_verification_does_not_end_the_attempt(ids: Ids) -> None:
    """An on-path forger who saw the hello can make a RID that ties to it; its reply then
    fails verification. The client discards it and the genuine reply still completes."""
    pair = make_pair(*configs(ids, 6), min_delay=0.05, max_delay=0.05)
    pair.connect()
    rid = session_rid(pair.client.rid, pair.client.rid[:8], os.urandom(7))
    pair.link.inject(record(hs.MSG_SERVER_HELLO, rid, os.urandom(300)), SERVER_ADDR,
                     CLIENT_ADDR)
    finish(pair)
    assert pair.client.drop_counts.get("reply-rejected", 0) == 1


def test_an_unpinned_server_still_fails_with_its_error(ids: Ids) -> None:
    """A genuine reply that keeps failing (the server's key is not pinned) ends the attempt
    after a short grace with the real error, not a timeout, and the server hears of it."""
    stranger = Identity.generate()
    client = Config(identity=ids.client, trusted_peers=[stranger.public_key],
                    rng=seeded_rng(7))
    _, server = configs(ids, 7)
    pair = make_pair(client, server)
    pair.connect()
    pair.run(lambda: pair.client.closed, duration=30)
    (closed,) = pair.link.closes("client")
    assert closed.error_code == ErrorCode.ErrorCertificateInvalid
    assert pair.link.now < 5.0
    pair.run(duration=1)  # the ErrorResponse crosses the link
    server_closes = pair.link.closes("server")
    assert server_closes and server_closes[0].error_code == ErrorCode.ErrorCertificateInvalid
    assert server_closes[0].by_peer


def test_a_forged_server_hello_resume_is_dropped(ids: Ids) -> None:
    """The same rule for resumption: a forged SHR under a RID that does not answer the CHR."""
    from palisade_c.config import PLUS_RESUMPTION
    from palisade_c.connection import Connection
    from palisade_c.events import NewTicket

    client = Config(identity=ids.client, trusted_peers=[ids.server.public_key],
                    rng=seeded_rng(8), plus_features=PLUS_RESUMPTION)
    server = Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                    rng=seeded_rng(8 + 7919), plus_features=PLUS_RESUMPTION)
    pair = make_pair(client, server)
    pair.handshake()
    pair.run(duration=0.5)
    (ticket,) = [e.event.ticket for e in pair.link.events_of("client", NewTicket)]
    addr = ("10.0.0.9", 40000)
    conn = Connection(client, True, name="resumer")
    pair.link.add("resumer", addr, conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=ticket)
    pair.link.inject(record(hs.MSG_SERVER_HELLO_RESUME, os.urandom(24), b"\x01" * 40),
                     SERVER_ADDR, addr)
    pair.run(lambda: conn.established or conn.closed, duration=10)
    assert conn.established and conn.resumed, (conn.state, conn.drop_counts)
    assert conn.drop_counts.get("unknown-rid", 0) == 1
    assert not [e for e in pair.link.events_of("resumer", ConnectionClosed)]
