"""Rekeying under hostile paths and mismatched settings (issue 10, items 3 and 4).

Item 3: TRANSITION ends within a bound measured from arming. An announcing side that never
sees evidence that its peer moved abandons the armed epoch (it never commits to keys the peer
lacks), retries with back-off, and after a bounded number of attempts closes the session with
ErrorRekeyTimeout. The control flag sits in the cleartext header, so an on-path attacker can
drop exactly the control packets; that must cost the session at most a bounded rekey, never an
endless TRANSITION.

Item 4: ``commit_threshold`` and ``max_transition_time`` are local, un-negotiated settings. No
pair of valid settings may lose a packet while data flows both ways through rekeys.
"""

from __future__ import annotations

from typing import Any

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, make_pair, seeded_rng

from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.errors import StateError
from palisade_c.events import ConnectionClosed, EpochChanged
from palisade_c.identity import Identity

REKEY_TIMEOUT = 0x0204  # ErrorRekeyTimeout [profile]


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def _pair(ids: tuple[Identity, Identity], client_kw: dict[str, Any], server_kw: dict[str, Any],
          **link: Any) -> Pair:
    c, s = ids
    client = Config(identity=c, trusted_peers=[s.public_key], rng=seeded_rng(11), **client_kw)
    server = Config(identity=s, trusted_peers=[c.public_key], rng=seeded_rng(12), **server_kw)
    return make_pair(client, server, **link)


def _stream(pair: Pair, session: Connection, until: float, period: float = 0.005) -> None:
    """Both sides send a numbered packet every ``period`` until ``until``."""
    counters = {"c": 0, "s": 0}

    def tick(now: float) -> None:
        for name, conn in (("c", pair.client), ("s", session)):
            if conn.established:
                try:
                    conn.send_data(b"%s%d" % (name.encode(), counters[name]), now=now)
                    counters[name] += 1
                except StateError:
                    pass
        if now + period < until:
            pair.link.schedule(now + period, tick)

    pair.link.schedule(pair.link.now, tick)


def _received(pair: Pair, node: str, prefix: bytes) -> list[int]:
    return [int(d[1:]) for d in pair.link.data_received(node) if d[:1] == prefix]


def _transition_spans(pair: Pair, conn: Connection) -> list[float]:
    """Record, every simulation step, how long ``conn``'s receiver has been in TRANSITION."""
    spans: list[float] = []
    since: list[float | None] = [None]

    def sample(now: float) -> None:
        rec = conn.record
        busy = rec is not None and not rec.erased and rec.epochs.rx_state_name == "TRANSITION"
        if busy and since[0] is None:
            since[0] = now
        elif not busy and since[0] is not None:
            spans.append(now - since[0])
            since[0] = None
        if busy and since[0] is not None:
            spans.append(now - since[0])

    pair.link.on_step(sample)
    return spans


# --- item 4: any pair of local settings, no loss ------------------------------------------------

SETTINGS = [
    ({"commit_threshold": 1000}, {"commit_threshold": 1}),
    ({"commit_threshold": 1}, {"commit_threshold": 1000}),
    ({"commit_threshold": 16}, {"commit_threshold": 16}),
    ({"max_transition_time": 0.1}, {"max_transition_time": 10.0}),
    ({"max_transition_time": 10.0}, {"max_transition_time": 0.1}),
    ({"commit_threshold": 1000, "max_transition_time": 10.0},
     {"commit_threshold": 1, "max_transition_time": 0.1}),
    ({"commit_threshold": 1, "max_transition_time": 0.1},
     {"commit_threshold": 1000, "max_transition_time": 10.0}),
]


@pytest.mark.parametrize(("client_kw", "server_kw"), SETTINGS)
@pytest.mark.parametrize("initiator", ["server", "client"])
def test_no_packet_lost_through_rekeys_whatever_the_local_settings(
        ids: tuple[Identity, Identity], client_kw: dict[str, Any], server_kw: dict[str, Any],
        initiator: str) -> None:
    pair = _pair(ids, client_kw, server_kw, min_delay=0.01, max_delay=0.01)
    session = pair.handshake()
    pair.run(duration=0.1)
    start = pair.link.now
    _stream(pair, session, start + 6.0, period=0.01)
    rekeyer = session if initiator == "server" else pair.client
    for k in range(5):
        pair.link.schedule(start + 0.3 + k * 1.1,
                           lambda now: rekeyer.request_rekey(now=now) if rekeyer.established
                           else None)
    pair.run(duration=7.0)
    assert pair.client.established and session.established
    for node, prefix in (("server", b"c"), ("client", b"s")):
        got = _received(pair, node, prefix)
        assert got == list(range(len(got))) and len(got) > 500, (node, len(got))
    for conn in (pair.client, session):
        drops = conn.drop_counts
        assert not {k: v for k, v in drops.items() if k.startswith("Error")}, drops
    # Rekeys happened (how many depends on the slower side's settings), in order. A side may
    # skip reporting an epoch it committed explicitly on the way to the next one.
    for conn in (pair.client, session):
        assert conn.record is not None and conn.record.send_epoch >= 1
    for node in ("client", "server"):
        epochs = [e.event.epoch for e in pair.link.events_of(node, EpochChanged)]
        assert epochs == sorted(set(epochs)), (node, epochs)


# --- item 3: TRANSITION is bounded ---------------------------------------------------------------

FAST = {"max_transition_time": 0.5, "rekey_retransmit": 0.1, "max_rto": 1.0,
        "idle_timeout": 600.0, "keepalive_interval": 1.0, "commit_threshold": 4}


def test_dropped_announcements_end_in_a_bounded_rekey_failure(
        ids: tuple[Identity, Identity]) -> None:
    """An attacker drops every server control packet (the flag is in the cleartext header)
    while data flows. The server's receiver never stays in TRANSITION longer than
    max_transition_time, it retries with back-off, and then closes with ErrorRekeyTimeout."""
    def drop_server_control(d: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        return [] if src == SERVER_ADDR and d[:2] == b"QP" and d[3] & 0x01 else None

    pair = _pair(ids, FAST, FAST)
    session = pair.handshake()
    pair.run(duration=0.1)
    pair.link.mitm = drop_server_control
    spans = _transition_spans(pair, session)
    start = pair.link.now
    _stream(pair, session, start + 60.0, period=0.05)
    session.request_rekey(now=start)
    pair.run(lambda: session.closed, duration=60.0)
    assert session.closed, session.state
    assert [c.error_code for c in pair.link.closes("server")] == [REKEY_TIMEOUT]
    assert spans and max(spans) <= 0.5 + 0.011, max(spans)
    # Bounded in total: four attempts with their back-off.
    end = next(e.time for e in pair.link.events_of("server", ConnectionClosed))
    assert end - start < 4 * (0.5 + 1.0) + 0.5
    assert session.epoch == 0  # never committed to keys the client lacks


def test_a_rekey_whose_first_attempt_is_lost_succeeds_on_a_retry(
        ids: tuple[Identity, Identity]) -> None:
    state = {"drop": True}

    def drop_server_control(d: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if state["drop"] and src == SERVER_ADDR and d[:2] == b"QP" and d[3] & 0x01:
            return []
        return None

    pair = _pair(ids, FAST, FAST, mitm=drop_server_control)
    state["drop"] = False
    session = pair.handshake()
    pair.run(duration=0.1)
    state["drop"] = True
    start = pair.link.now
    spans = _transition_spans(pair, session)
    _stream(pair, session, start + 4.0, period=0.02)
    session.request_rekey(now=start)
    pair.link.schedule(start + 0.55, lambda now: state.update(drop=False))
    pair.run(duration=5.0)
    assert session.established and pair.client.established
    assert session.epoch == 1 and pair.client.epoch == 1
    assert spans and max(spans) <= 0.5 + 0.011
    for node, prefix in (("server", b"c"), ("client", b"s")):
        got = _received(pair, node, prefix)
        assert got == list(range(len(got))) and len(got) > 100, (node, len(got))
    assert [e.event.epoch for e in pair.link.events_of("client", EpochChanged)] == [1]


def test_a_client_that_is_never_heard_on_the_new_epoch_is_bounded_too(
        ids: tuple[Identity, Identity]) -> None:
    """The client arms and moves its sender, but nothing it sends on the new epoch reaches the
    server, and after that nothing at all comes back. Both ends give up within the rekey
    budget with ErrorRekeyTimeout instead of waiting (here) for a 600 s idle timeout."""
    state = {"client_moved": False}

    def mitm(d: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if d[:2] != b"QP":
            return None
        if src == CLIENT_ADDR and d[3] & 0x04:
            state["client_moved"] = True
            return []
        if src == SERVER_ADDR and state["client_moved"]:
            return []
        return None

    pair = _pair(ids, FAST, FAST, mitm=mitm)
    session = pair.handshake()
    pair.run(duration=0.1)
    client_spans = _transition_spans(pair, pair.client)
    start = pair.link.now
    session.request_rekey(now=start)
    pair.run(lambda: session.closed and pair.client.closed, duration=120.0)
    assert [c.error_code for c in pair.link.closes("server")] == [REKEY_TIMEOUT]
    assert [c.error_code for c in pair.link.closes("client")] == [REKEY_TIMEOUT]
    assert pair.link.now - start < 4 * (2 * 0.5 + 1.0) + 1.0
    assert client_spans and max(client_spans) < 4 * (2 * 0.5 + 1.0) + 1.0


def test_a_path_longer_than_max_transition_time_still_rekeys(
        ids: tuple[Identity, Identity]) -> None:
    """max_transition_time 0.1 s on a 0.3 s round trip: evidence can never come within 0.1 s
    of arming, so an attempt lasts a few measured round trips instead (the handshake gave
    the sample). Every rekey completes and nothing is lost."""
    kw = {"max_transition_time": 0.1, "commit_threshold": 4, "idle_timeout": 600.0}
    pair = _pair(ids, kw, kw, min_delay=0.15, max_delay=0.15)
    session = pair.handshake()
    pair.run(duration=0.5)
    start = pair.link.now
    _stream(pair, session, start + 8.0, period=0.02)
    for k in range(4):
        pair.link.schedule(start + 0.3 + k * 1.8,
                           lambda now: session.request_rekey(now=now) if session.established
                           else None)
    pair.run(duration=9.0)
    assert pair.client.established and session.established
    assert not pair.link.closes("server") and not pair.link.closes("client")
    assert session.record is not None and session.record.send_epoch == 4
    assert session.record.epochs.abandons == 0
    for node, prefix in (("server", b"c"), ("client", b"s")):
        got = _received(pair, node, prefix)
        assert got == list(range(len(got))) and len(got) > 300, (node, len(got))
