"""Handshake liveness under loss: neither side may wait for the other forever (issue 10, item 2).

A client holding part of the server's flight keeps sending something the server counts (an ack
under the session RID, with back-off) until it has the whole flight or its handshake budget
ends, as QUIC's anti-deadlock rule does (RFC 9002 §6.2.2.1). The seeded sweep below runs
hundreds of handshakes over lossy, duplicating, reordering links, with asymmetric loss and
loss bursts; every one must complete. It reuses two identities, so a handshake costs only the
KEM and one signature each way, and runs on the simulated clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, hs_type, make_pair, seeded_rng

from palisade_c import hsrecord as hs
from palisade_c.config import Config
from palisade_c.errors import ErrorCode
from palisade_c.events import ConnectionClosed
from palisade_c.identity import Identity


@dataclass(frozen=True)
class Ids:
    client: Identity
    server: Identity


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(Identity.generate(), Identity.generate())


def configs(ids: Ids, seed: int, **common: object) -> tuple[Config, Config]:
    client = Config(identity=ids.client, trusted_peers=[ids.server.public_key],
                    rng=seeded_rng(seed), **common)  # type: ignore[arg-type]
    server = Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                    rng=seeded_rng(seed + 7919), **common)  # type: ignore[arg-type]
    return client, server


def both_established(pair: Pair) -> bool:
    return pair.client.established and any(c.established for c in pair.server.connections)


def run_handshake(pair: Pair) -> bool:
    """Connect and run for the whole handshake budget (and a little more, for CF)."""
    pair.connect()
    pair.run(lambda: both_established(pair) or pair.client.closed,
             duration=pair.client.handshake_budget + 5)
    return both_established(pair)


#: name -> make_pair keyword arguments. Every profile duplicates and reorders.
PROFILES: dict[str, dict[str, object]] = {
    "loss20": {"loss": 0.2, "duplicate": 0.2, "min_delay": 0.005, "max_delay": 0.15},
    "loss30": {"loss": 0.3, "duplicate": 0.1, "min_delay": 0.005, "max_delay": 0.12},
    # Replies lost more often than requests (the reproduction's shape) and the other way round.
    "asym-down": {"loss": 0.1, "loss_to": {CLIENT_ADDR: 0.3}, "duplicate": 0.1,
                  "min_delay": 0.005, "max_delay": 0.1},
    "asym-up": {"loss": 0.1, "loss_to": {SERVER_ADDR: 0.3}, "duplicate": 0.1,
                "min_delay": 0.005, "max_delay": 0.1},
    # Independent loss plus outages of up to half a second that swallow everything sent.
    "bursts": {"loss": 0.2, "burst": (0.05, 0.5), "duplicate": 0.1,
               "min_delay": 0.005, "max_delay": 0.1},
}
SEEDS_PER_PROFILE = 64  # 5 profiles x 64 = 320 handshakes


def sweep(ids: Ids, profile: str, seeds: Iterable[int]) -> list[tuple[int, str, dict[str, int]]]:
    failures = []
    for seed in seeds:
        pair = make_pair(*configs(ids, seed), seed=seed, **PROFILES[profile])  # type: ignore[arg-type]
        if not run_handshake(pair):
            failures.append((seed, pair.client.state, pair.client.counters["drops"]))
    return failures


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_handshake_completes_over_a_lossy_link(ids: Ids, profile: str) -> None:
    failures = sweep(ids, profile, range(1000, 1000 + SEEDS_PER_PROFILE))
    assert not failures, f"{len(failures)}/{SEEDS_PER_PROFILE} failed: {failures[:5]}"


def test_partial_reply_with_lost_acks_does_not_deadlock(ids: Ids) -> None:
    """The reproduction's schedule, forced: the client gets the first SH fragment only, every
    ack it sends for a while is lost, and the server runs into its 3x amplification budget.
    The client must keep probing until the server can send again."""
    state = {"sh_seen": 0, "acks_dropped": 0}

    def mitm(data: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        t = hs_type(data)
        if t == hs.MSG_SERVER_HELLO:
            state["sh_seen"] += 1
            # Only the first fragment of the first SH flight gets through; the server's first
            # resends are lost too.
            return None if state["sh_seen"] == 1 or now >= 1.0 else []
        if t == hs.MSG_HANDSHAKE_ACK and dst == SERVER_ADDR and state["acks_dropped"] < 2:
            state["acks_dropped"] += 1
            return []
        return None

    pair = make_pair(*configs(ids, 5), seed=5, mitm=mitm)
    assert run_handshake(pair), (pair.client.state, pair.client.counters)
    assert state["acks_dropped"] == 2


def test_timeout_tells_silence_from_a_stall(ids: Ids) -> None:
    """'Nothing received' and 'received N bytes, then stalled' are different failures, and the
    close detail says which one happened."""
    # Silence: the server never answers.
    pair = make_pair(*configs(ids, 6), seed=6,
                     mitm=lambda d, s, dst, now: [] if dst == CLIENT_ADDR else None)
    pair.connect()
    pair.run(lambda: pair.client.closed, duration=60)
    (closed,) = [e.event for e in pair.link.events_of("client", ConnectionClosed)]
    assert closed.error_code == ErrorCode.ErrorHandshakeTimeout
    assert "nothing received" in closed.reason, closed.reason

    # A stall: the first SH fragment arrives, then the server goes silent for good.
    seen = {"sh": 0}

    def stall(data: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if dst != CLIENT_ADDR:
            return None
        seen["sh"] += 1
        return None if seen["sh"] == 1 else []

    pair = make_pair(*configs(ids, 7), seed=7, mitm=stall)
    pair.connect()
    pair.run(lambda: pair.client.closed, duration=60)
    (closed,) = [e.event for e in pair.link.events_of("client", ConnectionClosed)]
    assert closed.error_code == ErrorCode.ErrorHandshakeTimeout
    assert f"received {pair.client.hs_bytes_in} bytes" in closed.reason, closed.reason
    assert "stalled" in closed.reason


def test_a_server_holding_part_of_the_hello_keeps_acking(ids: Ids) -> None:
    """The mirror image: the server holds part of the ClientHello and the rest is lost. It
    acks again, backing off, while nothing new comes, so the client's resends are prompted
    and do not wait on its own backed-off timer alone."""
    sent = {"ch": 0}

    def lose_the_hello_tail(data: bytes, src: object, dst: object, now: float
                            ) -> list[bytes] | None:
        if hs_type(data) == hs.MSG_CLIENT_HELLO:
            sent["ch"] += 1
            return None if sent["ch"] == 1 else []  # only the first fragment, ever
        return None

    pair = make_pair(*configs(ids, 8), seed=8, mitm=lose_the_hello_tail)
    pair.connect()
    pair.run(duration=4.0)
    acks = [w for w in pair.link.emitted
            if w.src == SERVER_ADDR and hs_type(w.data) == hs.MSG_HANDSHAKE_ACK]
    assert len(acks) >= 3, [round(w.time, 2) for w in acks]
    gaps = [b.time - a.time for a, b in itertools.pairwise(acks)]
    assert gaps == sorted(gaps)  # backing off


def test_handshakes_through_the_cookie_retry_over_a_lossy_link(ids: Ids) -> None:
    """A server that demands a cookie from every hello: the Retry adds a round trip, and its
    loss must be recovered like any other (a resent hello is answered with a new Retry)."""
    failures = []
    for seed in range(2000, 2032):
        client, server = configs(ids, seed)
        server.cookie_threshold = 0
        pair = make_pair(client, server, seed=seed, **PROFILES["loss20"])  # type: ignore[arg-type]
        if not run_handshake(pair):
            failures.append((seed, pair.client.state, pair.client.drop_counts))
    assert not failures, failures


def resume_once(ids: Ids, seed: int) -> tuple[int, str, dict[str, int]] | None:
    """A full handshake, then a resumption with 0-RTT data, over a lossy link (every other
    seed under the cookie regime). The failure, or None."""
    from palisade_c.config import PLUS_RESUMPTION
    from palisade_c.connection import Connection
    from palisade_c.events import NewTicket

    client, server = configs(ids, seed, plus_features=PLUS_RESUMPTION)
    server.cookie_threshold = 0 if seed % 2 else 256
    pair = make_pair(client, server, seed=seed, **PROFILES["loss20"])  # type: ignore[arg-type]
    assert run_handshake(pair)
    pair.run(lambda: bool(pair.link.events_of("client", NewTicket)), duration=30)
    tickets = [e.event.ticket for e in pair.link.events_of("client", NewTicket)]
    if not tickets:
        return None  # the ticket itself was lost: data, not the handshake
    conn = Connection(client, True, name="resumer")
    pair.link.add("resumer", ("10.0.0.9", 40000), conn)
    conn.connect(SERVER_ADDR, pair.link.now, ticket=tickets[0], early_data=b"hello")
    pair.run(lambda: conn.established or conn.closed, duration=conn.handshake_budget + 5)
    return None if conn.established and conn.resumed else (seed, conn.state, conn.drop_counts)


def test_resumptions_with_early_data_over_a_lossy_link(ids: Ids) -> None:
    """Resumption (with 0-RTT) follows the same liveness rules as the full handshake, with and
    without the cookie regime."""
    failures = [f for seed in range(2100, 2132) if (f := resume_once(ids, seed)) is not None]
    assert not failures, failures


def test_handshakes_over_a_lossy_slow_link(ids: Ids) -> None:
    """A 115200-baud serial link with its 512-byte MTU: every timer is stretched by airtime,
    and none may stretch so far that both sides wait out the budget. (The simulated link
    scales the timers only; it does not queue bytes the way a UART does.)"""
    air = 512 * 10 / 115_200
    failures = []
    for seed in range(4000, 4064):
        client, server = configs(ids, seed, link_bits_per_second=115_200.0,
                                 max_datagram_size=512)
        pair = make_pair(client, server, seed=seed, loss=0.2, duplicate=0.1, min_delay=air,
                         max_delay=3 * air)
        if not run_handshake(pair):
            failures.append((seed, pair.client.state))
    assert not failures, failures
