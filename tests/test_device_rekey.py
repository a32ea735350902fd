"""The C device's rekeying against the Python client, under the epoch rules of
docs/protocol.md §5 and §9 (the mirror of tests/test_rekey_bounds.py for the Python server):
TRANSITION bounded from arming with abandon, retries with back-off, ErrorRekeyTimeout after
four attempts, no packet lost whatever the two sides' local settings, and the timer invariant
(every deadline the device reports is one handle_timer services) in every state."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import SimLink, seeded_rng
from test_device_sim import NODE
from test_rekey_bounds import SETTINGS  # the pairs the Python server is held to

from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.device import Device
from palisade_c.errors import StateError
from palisade_c.events import ConnectionClosed, EpochChanged
from palisade_c.identity import Identity

REKEY_TIMEOUT = 0x0204  # ErrorRekeyTimeout [profile]
FAST = {"max_transition_time": 0.5, "rekey_retransmit": 0.1, "max_rto": 1.0,
        "idle_timeout": 600.0, "keepalive_interval": 1.0, "commit_threshold": 4}

Ids = tuple[Identity, Identity]


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Identity.generate(), Identity.generate()


def _session(ids: Ids, client_kw: dict[str, Any], dev_kw: dict[str, Any], seed: int = 21,
             **link_kw: Any) -> tuple[SimLink, Connection, Device]:
    ci, si = ids
    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed),
                max_datagram_size=512, node_id=NODE, **client_kw)
    dev = Device(si, [ci.fingerprint], node_id=NODE, mtu=512, rng=seeded_rng(seed + 1),
                 **dev_kw)
    link = SimLink(seed, **{"min_delay": 0.01, "max_delay": 0.01, **link_kw})
    client = Connection(cc, True)
    link.add("client", "C", client)
    link.add("device", "D", dev)
    client.connect("D", 0.0)
    link.run(lambda: client.established and dev.established, duration=30)
    assert client.established and dev.established
    link.run(duration=0.1)
    return link, client, dev


def _stream(link: SimLink, client: Connection, dev: Device, until: float,
            period: float) -> None:
    """Both sides send a numbered packet every ``period`` until ``until``."""
    counters = {"c": 0, "s": 0}

    def tick(now: float) -> None:
        for name, peer in (("c", client), ("s", dev)):
            if peer.established:
                try:
                    peer.send_data(b"%s%d" % (name.encode(), counters[name]), now=now)
                    counters[name] += 1
                except StateError:
                    pass
        if now + period < until:
            link.schedule(now + period, tick)

    link.schedule(link.now, tick)


def _received(link: SimLink, node: str, prefix: bytes) -> list[int]:
    return [int(d[1:]) for d in link.data_received(node) if d[:1] == prefix]


def _spans(link: SimLink, dev: Device) -> list[float]:
    """How long the device's receiver has been in TRANSITION, sampled every step."""
    spans: list[float] = []
    since: list[float | None] = [None]

    def sample(now: float) -> None:
        busy = not dev.closed and dev.rx_state_name == "TRANSITION"
        if busy and since[0] is None:
            since[0] = now
        elif not busy and since[0] is not None:
            spans.append(now - since[0])
            since[0] = None
        if busy and since[0] is not None:
            spans.append(now - since[0])

    link.on_step(sample)
    return spans


def _is_device_control(d: bytes, src: object) -> bool:
    return src == "D" and d[:2] == b"QP" and bool(d[3] & 0x01)


def test_dropped_announcements_end_in_a_bounded_rekey_failure(ids: Ids) -> None:
    """Every control packet of the device is dropped while data flows: its receiver never
    stays in TRANSITION longer than T, it retries with back-off, then closes with 0x0204."""
    link, client, dev = _session(ids, FAST, FAST)
    link.mitm = lambda d, src, dst, now: [] if _is_device_control(d, src) else None
    spans = _spans(link, dev)
    start = link.now
    _stream(link, client, dev, start + 60.0, period=0.05)
    dev.request_rekey()
    link.run(lambda: dev.closed, duration=60.0)
    assert dev.closed, dev.state
    assert [c.error_code for c in link.closes("device")] == [REKEY_TIMEOUT]
    assert spans and max(spans) <= 0.5 + 0.011, max(spans)
    end = next(e.time for e in link.events_of("device", ConnectionClosed))
    assert end - start < 4 * (0.5 + 1.0) + 0.5
    assert dev.epoch == 0  # never committed to keys the client lacks


def test_a_rekey_whose_first_attempt_is_lost_succeeds_on_a_retry(ids: Ids) -> None:
    state = {"drop": True}

    def mitm(d: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        return [] if state["drop"] and _is_device_control(d, src) else None

    link, client, dev = _session(ids, FAST, FAST)
    link.mitm = mitm
    spans = _spans(link, dev)
    start = link.now
    _stream(link, client, dev, start + 4.0, period=0.02)
    dev.request_rekey()
    link.schedule(start + 0.55, lambda now: state.update(drop=False))
    link.run(duration=5.0)
    assert dev.established and client.established
    assert dev.epoch == 1 and client.epoch == 1
    assert spans and max(spans) <= 0.5 + 0.011
    for node, prefix in (("device", b"c"), ("client", b"s")):
        got = _received(link, node, prefix)
        assert got == list(range(len(got))) and len(got) > 100, (node, len(got))
    assert [e.event.epoch for e in link.events_of("client", EpochChanged)] == [1]
    assert [e.event.epoch for e in link.events_of("device", EpochChanged)] == [1]



@pytest.mark.parametrize(("client_kw", "dev_kw"), SETTINGS)
@pytest.mark.parametrize("initiator", ["device", "client"])
def test_no_packet_lost_through_rekeys_whatever_the_local_settings(
        ids: Ids, client_kw: dict[str, Any], dev_kw: dict[str, Any], initiator: str) -> None:
    link, client, dev = _session(ids, client_kw, dev_kw)
    start = link.now
    _stream(link, client, dev, start + 6.0, period=0.01)

    def rekey(now: float) -> None:
        try:
            if initiator == "device":
                dev.request_rekey()
            else:
                client.request_rekey(now=now)
        except StateError:
            pass  # one still running

    for k in range(5):
        link.schedule(start + 0.3 + k * 1.1, rekey)
    link.run(duration=7.0)
    assert client.established and dev.established
    for node, prefix in (("device", b"c"), ("client", b"s")):
        got = _received(link, node, prefix)
        assert got == list(range(len(got))) and len(got) > 500, (node, len(got))
    assert not {k: v for k, v in client.drop_counts.items() if k.startswith("Error")}
    assert not {k: v for k, v in dev.drop_counts.items()
                if k in ("key-phase", "epoch", "aead", "replay")}, dev.drop_counts
    # Rekeys happened (how many depends on the slower side's settings).
    assert dev.send_epoch >= 1 and client.record is not None and client.record.send_epoch >= 1
    for node in ("client", "device"):
        epochs = [e.event.epoch for e in link.events_of(node, EpochChanged)]
        assert epochs == sorted(set(epochs)), (node, epochs)


# --- the timer invariant -------------------------------------------------------------------

OPS = ["c2s", "s2c", "c2s", "s2c", "drop_c2s", "drop_s2c", "timer", "timer", "wait",
       "c_data", "s_data", "c_rekey", "s_rekey", "c_close", "s_close"]
TIMERS = {"close_drain_time": 0.6, "rekey_retransmit": 0.2, "max_transition_time": 0.5,
          "commit_threshold": 2, "keepalive_interval": 1.0, "idle_timeout": 4.0}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(OPS), min_size=1, max_size=40),
       st.floats(min_value=0.0, max_value=3.0))
def test_every_reported_deadline_is_serviced(ids: Ids, ops: list[str], wait: float) -> None:
    """After ``handle_timer(now)`` the device's next deadline is None or later than ``now``,
    in every state, through rekeys, losses and closes in any order."""
    link, client, dev = _session(ids, dict(TIMERS), dict(TIMERS), seed=33)
    now = link.now
    c2s: deque[bytes] = deque()
    s2c: deque[bytes] = deque()

    def collect() -> None:
        c2s.extend(d for d, _ in client.datagrams_to_send(now))
        s2c.extend(d for d, _ in dev.datagrams_to_send(now))
        while client.next_event() is not None or dev.next_event() is not None:
            pass

    def fire() -> None:
        nonlocal now
        times = [t for t in (client.get_timer(), dev.get_timer()) if t is not None]
        if not times:
            return
        now = max(now, min(times))
        t = client.get_timer()
        if t is not None and t <= now:
            client.handle_timer(now)
        t = dev.get_timer()
        if t is not None and t <= now:
            dev.handle_timer(now)
            after = dev.get_timer()
            assert after is None or after > now, (dev.state, now, after)

    for op in ops:
        collect()
        try:
            if op == "c2s" and c2s:
                dev.receive_datagram(c2s.popleft(), "C", now)
            elif op == "s2c" and s2c:
                client.receive_datagram(s2c.popleft(), "D", now)
            elif op == "drop_c2s" and c2s:
                c2s.popleft()
            elif op == "drop_s2c" and s2c:
                s2c.popleft()
            elif op == "timer":
                fire()
            elif op == "wait":
                now += wait
            elif op == "c_data":
                client.send_data(b"c", now=now)
            elif op == "s_data":
                dev.send_data(b"s", now=now)
            elif op == "c_rekey":
                client.request_rekey(now=now)
            elif op == "s_rekey":
                dev.request_rekey()
            elif op == "c_close":
                client.close(0, "c")
            elif op == "s_close":
                dev.close(0, "s")
        except StateError:
            pass  # refused in that state; nothing changed
    for _ in range(400):
        collect()
        if dev.get_timer() is None and client.get_timer() is None:
            break
        fire()
    assert dev.get_timer() is None or not dev.closed
