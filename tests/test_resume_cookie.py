"""Resumption under the cookie regime (issue 10, item 6): a server above its cookie threshold
answers a ClientHelloResume with a Retry, and the client must honour it in C_RESUME_PENDING,
with and without 0-RTT, or fall back cleanly (§8.6)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from simlink import SERVER_ADDR, Pair, make_pair, seeded_rng

from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.errors import ErrorCode
from palisade_c.events import DataReceived, HandshakeCompleted, NewTicket
from palisade_c.identity import Identity
from palisade_c.tickets import ClientTicket


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def cookie_pair(ids: tuple[Identity, Identity], seed: int, **link: Any
                ) -> tuple[Pair, ClientTicket]:
    """A full handshake against a server that demands a cookie from every hello
    (cookie_threshold 0), and the ticket it issued."""
    ci, si = ids
    client = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed),
                    plus_features=PLUS_RESUMPTION)
    server = Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed + 7),
                    plus_features=PLUS_RESUMPTION, cookie_threshold=0)
    pair = make_pair(client, server, seed=seed, **link)
    pair.handshake()
    pair.run(duration=0.5)
    (ticket,) = [e.event.ticket for e in pair.link.events_of("client", NewTicket)]
    return pair, ticket


def resume(pair: Pair, ticket: ClientTicket, early: bytes | None = None) -> Connection:
    conn = Connection(pair.client.config, True, name="resumer", event_log=pair.log.append)
    pair.link.add("resumer", ("10.0.0.9", 40000), conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=ticket, early_data=early)
    pair.run(lambda: conn.established or conn.closed, duration=20)
    pair.run(duration=0.5)
    return conn


def retries_of(pair: Pair) -> int:
    return sum(1 for e in pair.log if e["kind"] == "retry" and e["conn"] == "resumer")


@pytest.mark.parametrize("early", [None, b"GET /status"])
def test_resumption_honours_a_retry(ids: tuple[Identity, Identity], early: bytes | None) -> None:
    pair, ticket = cookie_pair(ids, 1)
    conn = resume(pair, ticket, early)
    assert conn.established and conn.resumed, (conn.state, conn.drop_counts)
    assert retries_of(pair) == 1
    got = [e.event for e in pair.link.events_of("server", DataReceived) if e.event.early]
    done = [e.event for e in pair.link.events_of("resumer", HandshakeCompleted)]
    if early is None:
        assert got == [] and not done[0].early_data_accepted
    else:
        # Sealed again under the cookie RID, the early data arrives, once.
        assert got == [DataReceived(0, early, early=True)]
        assert done[0].early_data_accepted


def test_resumption_with_retry_over_a_lossy_link(ids: tuple[Identity, Identity]) -> None:
    pair, ticket = cookie_pair(ids, 2, loss=0.2, duplicate=0.1, min_delay=0.005,
                               max_delay=0.08)
    conn = resume(pair, ticket, b"x")
    assert conn.established and conn.resumed, (conn.state, conn.drop_counts)


def test_a_refused_ticket_falls_back_through_a_second_retry(
        ids: tuple[Identity, Identity]) -> None:
    """The ticket is refused after the Retry; the full handshake that follows starts a new
    hello, which gets (and must honour) its own Retry."""
    pair, ticket = cookie_pair(ids, 3)
    bad = bytearray(ticket.ticket)
    bad[20] ^= 0x40
    conn = resume(pair, dataclasses.replace(ticket, ticket=bytes(bad)), b"early")
    assert conn.established and not conn.resumed, (conn.state, conn.drop_counts)
    assert retries_of(pair) == 2
    refused = [e["code"] for e in pair.log
               if e["kind"] == "resumption-refused" and e["conn"] == "resumer"]
    assert refused == [ErrorCode.ErrorTicketInvalid]
