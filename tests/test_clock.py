"""A fresh clock for every deadline (issue 10, item 5).

``close()``, ``send_data()``, ``request_rekey()`` and ``migrate()`` are application calls: they
may come long after the connection last saw a time (a sender that receives nothing). Every
deadline they arm must still count from the present: the call takes ``now``, or, when the
caller gives none, the deadline is re-based on the next call that carries a time
(``datagrams_to_send(now)``, ``handle_timer(now)``, ``receive_datagram``).
"""

from __future__ import annotations

import pytest
from simlink import CLIENT_ADDR, SERVER_ADDR, make_pair, seeded_rng

from palisade_c.config import Config
from palisade_c.identity import Identity


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def _configs(ids: tuple[Identity, Identity], **kw: object) -> tuple[Config, Config]:
    c, s = ids
    return (Config(identity=c, trusted_peers=[s.public_key], rng=seeded_rng(5),
                   **kw),  # type: ignore[arg-type]
            Config(identity=s, trusted_peers=[c.public_key], rng=seeded_rng(6),
                   **kw))  # type: ignore[arg-type]


def _is_close(d: bytes) -> bool:
    return d[:2] == b"QP" and bool(d[3] & 0x01)


@pytest.mark.parametrize("pass_now", [False, True])
def test_close_after_a_minute_of_one_way_traffic_drains_in_full(
        ids: tuple[Identity, Identity], pass_now: bool) -> None:
    """The client sends for 60 s and hears nothing back (every server datagram is lost), then
    closes. Its close must be resent over the whole drain time, counted from the close, not
    from the last time the client heard anything."""
    drain = 1.5
    pair = make_pair(*_configs(ids, close_drain_time=drain, idle_timeout=600.0,
                               keepalive_interval=100.0))
    session = pair.handshake()
    pair.run(duration=0.1)
    one_way = {"on": False}
    pair.link.mitm = lambda d, src, dst, now: [] if one_way["on"] and src == SERVER_ADDR else None
    one_way["on"] = True
    start = pair.link.now
    client = pair.client

    def send(now: float) -> None:
        if pass_now:
            client.send_data(b"tick", now=now)
        else:
            client.send_data(b"tick")

    for i in range(120):
        pair.link.schedule(start + 0.5 * i, send)
    closed_at: list[float] = []

    def close(now: float) -> None:
        closed_at.append(now)
        if pass_now:
            client.close(9, "done", now=now)
        else:
            client.close(9, "done")

    pair.link.schedule(start + 60.2, close)
    pair.run(lambda: client.closed, duration=80)
    assert client.closed and closed_at
    t0 = closed_at[0]
    closes = [e.time for e in pair.link.emitted if e.src == CLIENT_ADDR and e.time >= t0
              and _is_close(e.data)]
    # The first close and a resend every third of the drain time.
    assert len(closes) == 3, closes
    assert closes[-1] >= t0 + 2 * drain / 3 - 1e-9
    end = [e.time for e in pair.link.events if e.node == "client"
           and type(e.event).__name__ == "ConnectionClosed"]
    assert end and end[0] >= t0 + drain - 1e-9
    # The server heard the close and answered it (its answer is lost on the way back).
    assert session.state in ("S_CLOSING", "S_CLOSED")


def test_request_rekey_long_after_the_last_time_seen_counts_from_now(
        ids: tuple[Identity, Identity]) -> None:
    """A rekey requested after a long silence does not fire its retransmission at once."""
    pair = make_pair(*_configs(ids, rekey_retransmit=0.5, idle_timeout=600.0,
                               keepalive_interval=100.0))
    pair.handshake()
    pair.run(duration=0.1)
    client = pair.client
    last = pair.link.now
    assert client.get_timer() is not None and client.get_timer() >= last + 50.0
    client.request_rekey()  # no time given: the connection last saw `last`
    client.datagrams_to_send(last + 50.0)  # the shell's next call carries the present
    t = client.get_timer()
    assert t is not None and t >= last + 50.0 + 0.5 - 1e-9
    client.request_rekey(now=last + 50.0)  # already pending: no change, no error


def test_server_shutdown_long_after_the_last_datagram_drains_in_full(
        ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*_configs(ids, close_drain_time=1.2, idle_timeout=600.0,
                               keepalive_interval=100.0))
    session = pair.handshake()
    last = pair.link.now
    pair.server.close(now=last + 40.0)
    assert session.state == "S_CLOSING"
    t = pair.server.get_timer()
    assert t is not None and t >= last + 40.0 + 0.4 - 1e-9
    # Without a time, the deadline is re-based by the next call that carries one.
    pair2 = make_pair(*_configs(ids, close_drain_time=1.2, idle_timeout=600.0,
                                keepalive_interval=100.0))
    session2 = pair2.handshake()
    last2 = pair2.link.now
    pair2.server.close()
    pair2.server.datagrams_to_send(last2 + 40.0)
    pair2.server.handle_timer(last2 + 40.0)
    assert session2.state == "S_CLOSING"
    t2 = pair2.server.get_timer()
    assert t2 is not None and t2 >= last2 + 40.0 + 0.4 - 1e-9


def test_an_application_call_on_a_server_session_counts_from_the_endpoints_next_time(
        ids: tuple[Identity, Identity]) -> None:
    pair = make_pair(*_configs(ids, rekey_retransmit=0.5, idle_timeout=600.0,
                               keepalive_interval=100.0))
    session = pair.handshake()
    pair.run(duration=0.1)
    last = pair.link.now
    session.request_rekey()  # no time: the session last saw `last`
    pair.server.datagrams_to_send(last + 50.0)
    t = pair.server.get_timer()
    assert t is not None and t >= last + 50.0 + 0.5 - 1e-9
