"""A session after (and around) its handshake: data over a hostile link, replays, close, drops.

All tests run a real client ``Connection`` against a real ``ServerEndpoint`` (or a bare server
``Connection``) over the seeded in-memory link of ``simlink.py``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from simlink import (
    CLIENT_ADDR,
    SERVER_ADDR,
    Pair,
    SimEvent,
    SimLink,
    WireEntry,
    closed_events,
    hs_type,
    is_handshake,
    make_pair,
    seeded_rng,
)

from palisade_c import hsrecord as hs
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.errors import StateError
from palisade_c.events import (
    ConnectionClosed,
    DataReceived,
    EpochChanged,
    HandshakeCompleted,
)
from palisade_c.identity import Identity

# The state names of the seed appendix (§1 client, §2 server), spelled out here on purpose.
SEED_CLIENT_STATES = frozenset({
    "C_IDLE", "C_INITIATING", "C_WAIT_SH", "C_VERIFY_SH", "C_DERIVE_KEYS", "C_ESTABLISHED",
    "C_REKEY_PENDING", "C_RESUME_PENDING", "C_CLOSING", "C_ABORT", "C_CLOSED",
})
SEED_SERVER_STATES = frozenset({
    "S_IDLE", "S_LISTEN", "S_WAIT_CH", "S_VERIFY_CH", "S_PREPARE_SH", "S_WAIT_FIN",
    "S_DERIVE_KEYS", "S_ESTABLISHED", "S_REKEY_PENDING", "S_RESUME_WAIT_CHR", "S_CLOSING",
    "S_ABORT", "S_CLOSED",
})


@dataclass(frozen=True)
class Ids:
    client: Identity
    server: Identity


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(Identity.generate(), Identity.generate())


def configs(ids: Ids, seed: int = 1, **common: object) -> tuple[Config, Config]:
    client = Config(identity=ids.client, trusted_peers=[ids.server.public_key],
                    rng=seeded_rng(seed), **common)  # type: ignore[arg-type]
    server = Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                    rng=seeded_rng(seed + 7919), **common)  # type: ignore[arg-type]
    return client, server


def data_of(pair: Pair, node: str) -> list[bytes]:
    return pair.link.data_received(node)


# --- data over a hostile link --------------------------------------------------------------------


@dataclass
class EchoSide:
    """One side's application: originate ``count`` messages, resend each (as a new, uniquely
    named packet) every ``interval`` until its echo comes back, and echo whatever arrives."""

    name: str
    count: int
    conn: Connection | None = None
    attempt: int = 0
    sent: set[bytes] = field(default_factory=set)
    echoed: set[int] = field(default_factory=set)
    received: list[bytes] = field(default_factory=list)


class EchoApp:
    def __init__(self, link: SimLink, count: int, interval: float = 0.25) -> None:
        self.link = link
        self.interval = interval
        self.sides = {"client": EchoSide("client", count), "server": EchoSide("server", count)}
        link.on_event(self._on_event)

    def done(self) -> bool:
        return all(len(s.echoed) == s.count for s in self.sides.values())

    def _on_event(self, ev: SimEvent) -> None:
        side = self.sides[ev.node]
        if isinstance(ev.event, HandshakeCompleted):
            side.conn = ev.connection
            self.link.schedule(self.link.now, self._ticker(side))
        elif isinstance(ev.event, DataReceived):
            data = ev.event.data
            side.received.append(data)
            assert ev.connection is side.conn
            if data.startswith(b"echo:"):
                origin, index, _attempt = data[5:].split(b":")
                assert origin == side.name.encode() and data[5:] in side.sent, data
                side.echoed.add(int(index))
            else:
                assert side.conn is not None
                side.conn.send_data(b"echo:" + data)

    def _ticker(self, side: EchoSide) -> Callable[[float], None]:
        return lambda now: self._tick(side, now)

    def _tick(self, side: EchoSide, now: float) -> None:
        if side.conn is None or not side.conn.established:
            return
        side.attempt += 1
        for i in range(side.count):
            if i not in side.echoed:
                payload = b"%s:%d:%d" % (side.name.encode(), i, side.attempt)
                side.sent.add(payload)
                side.conn.send_data(payload)
        if len(side.echoed) < side.count:
            self.link.schedule(now + self.interval, self._ticker(side))


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_data_round_trips_both_ways_over_a_hostile_link(ids: Ids, seed: int) -> None:
    """20 % loss, 20 % duplication, reordering: the handshake completes, every message gets
    through both ways (the application resends until echoed), and no packet is delivered twice
    even though the link duplicates them."""
    pair = make_pair(*configs(ids, seed), seed=seed, loss=0.2, duplicate=0.2,
                     min_delay=0.005, max_delay=0.15)
    app = EchoApp(pair.link, count=12)
    pair.connect()
    pair.run(app.done, duration=60)
    assert app.done(), {n: sorted(s.echoed) for n, s in app.sides.items()}
    client, server = app.sides["client"], app.sides["server"]
    assert pair.client.state == "C_ESTABLISHED"
    assert server.conn is not None and server.conn.state == "S_ESTABLISHED"
    for side, peer in ((client, server), (server, client)):
        # Everything delivered was sent by the peer, byte for byte, and only once.
        assert len(side.received) == len(set(side.received))
        for data in side.received:
            assert data in peer.sent or (data.startswith(b"echo:") and data[5:] in side.sent)
    assert pair.link.lost > 5 and pair.link.duplicated > 5
    assert pair.client.drop_counts.get("replay", 0) + server.conn.drop_counts.get("replay", 0) > 0
    assert len(pair.sessions()) == 1


@pytest.mark.parametrize("seed", [21, 22])
def test_rekey_mid_stream_over_a_hostile_link(ids: Ids, seed: int) -> None:
    pair = make_pair(*configs(ids, seed), seed=seed, loss=0.2, duplicate=0.2,
                     min_delay=0.005, max_delay=0.15)
    session = pair.handshake()
    pair.client.request_rekey()
    assert pair.client.state == "C_REKEY_PENDING"

    def traffic(i: int) -> Callable[[float], None]:
        def send(now: float) -> None:
            if pair.client.established:
                pair.client.send_data(b"c%d" % i)
            if session.established:
                session.send_data(b"s%d" % i)
        return send

    for i in range(400):  # traffic both ways drives the commit
        pair.link.schedule(pair.link.now + 0.02 * i, traffic(i))
    pair.run(lambda: pair.client.epoch == 1 and session.epoch == 1
             and pair.client.state == "C_ESTABLISHED" and session.state == "S_ESTABLISHED",
             duration=20)
    assert pair.link.events_of("client", EpochChanged) and pair.link.events_of("server",
                                                                                EpochChanged)
    pair.run(duration=10)
    received_c, received_s = data_of(pair, "client"), data_of(pair, "server")
    assert len(received_s) == len(set(received_s)) > 200
    assert len(received_c) == len(set(received_c)) > 200
    assert b"c399" in received_s or b"c398" in received_s or b"c397" in received_s


def test_client_data_that_overtakes_its_finished_is_held_then_delivered(ids: Ids) -> None:
    """PROFILE §3: data sent right after CF may reach the server first; up to 16 packets wait
    for the keys and are opened once CF verifies."""
    dropped_cf: list[bytes] = []

    def lose_first_cf(data: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if hs_type(data) == hs.MSG_CLIENT_FINISHED and now < 0.05:
            dropped_cf.append(data)
            return []
        return None

    pair = make_pair(*configs(ids, 31), mitm=lose_first_cf)

    def send_at_once(ev: SimEvent) -> None:
        if ev.node == "client" and isinstance(ev.event, HandshakeCompleted):
            for i in range(20):
                pair.client.send_data(b"early-%d" % i)

    pair.link.on_event(send_at_once)
    pair.connect()
    pair.run(lambda: any(s.established for s in pair.sessions()), duration=5)
    assert dropped_cf
    session = pair.session()
    assert session is not None and session.established
    pair.run(duration=0.5)
    assert data_of(pair, "server") == [b"early-%d" % i for i in range(16)]
    assert session.drop_counts.get("early-buffer-full") == 4


# --- replayed and late handshake datagrams -------------------------------------------------------


@pytest.mark.parametrize(("seed", "loss"), [(41, 0.0), (42, 0.2)])
def test_replayed_handshake_datagrams_after_establishment_are_harmless(
        ids: Ids, seed: int, loss: float) -> None:
    pair = make_pair(*configs(ids, seed), seed=seed, loss=loss, duplicate=loss,
                     min_delay=0.005, max_delay=0.05)
    session = pair.handshake()
    # Let the handshake's tail (CF acks, retransmissions) settle, then prove data flows.
    pair.client.send_data(b"before")
    session.send_data(b"before")
    pair.run(lambda: bool(data_of(pair, "client")) and bool(data_of(pair, "server")),
             duration=5)
    recorded: list[WireEntry] = [e for e in pair.link.emitted if is_handshake(e.data)]
    types = {hs_type(e.data) for e in recorded}
    assert {hs.MSG_CLIENT_HELLO, hs.MSG_SERVER_HELLO, hs.MSG_CLIENT_FINISHED} <= types
    events_before = len(pair.link.events)
    emitted_before = len(pair.link.emitted)
    shuffled = list(recorded)
    random.Random(seed).shuffle(shuffled)
    for batch in (recorded, shuffled):
        for i, entry in enumerate(batch):
            pair.link.inject(entry.data, entry.src, entry.dst, delay=0.001 * i)
        pair.run(duration=1.0)

    assert pair.client.state == "C_ESTABLISHED" and session.state == "S_ESTABLISHED"
    assert pair.server.connections == [session]
    assert pair.link.events[events_before:] == []
    # The only answers a replay may draw are handshake acks (the server re-acknowledging a
    # ClientFinished it already holds); no hello, no finished, no error goes out again.
    answers = [hs_type(e.data) for e in pair.link.emitted[emitted_before:]]
    assert set(answers) <= {hs.MSG_HANDSHAKE_ACK}, answers
    assert pair.client.record is not None and not pair.client.record.erased
    # And the session still carries data both ways.
    pair.client.send_data(b"after")
    session.send_data(b"after")
    pair.run(lambda: data_of(pair, "client")[-1:] == [b"after"]
             and data_of(pair, "server")[-1:] == [b"after"], duration=5)
    assert data_of(pair, "client").count(b"after") == 1
    assert data_of(pair, "server").count(b"after") == 1


# --- close ----------------------------------------------------------------------------------------


def test_close_before_establishment(ids: Ids) -> None:
    client_cfg, server_cfg = configs(ids, 51, handshake_timeout=4.0)
    pair = make_pair(client_cfg, server_cfg, min_delay=0.05, max_delay=0.05)
    pair.connect()
    pair.run(duration=0.06)  # CH arrived, SH on its way
    assert pair.client.state == "C_WAIT_SH"
    pair.client.close(0x0042, "changed my mind")
    assert pair.client.state == "C_CLOSED"
    assert pair.client.get_timer() is None and pair.client.record is None
    sent = len([e for e in pair.link.emitted if e.src == CLIENT_ADDR])
    pair.run(duration=10)
    assert [(c.error_code, c.reason, c.by_peer) for c in closed_events(pair, pair.client)] == [
        (0x0042, "changed my mind", False)]
    # Nothing more left the client (no CTRL_CLOSE without keys, no retransmission), the SH
    # that arrived afterwards was dropped, and the server's half-open session timed out.
    assert len([e for e in pair.link.emitted if e.src == CLIENT_ADDR]) == sent
    assert pair.client.drop_counts.get("closed", 0) > 0
    session = pair.session()
    assert session is not None and session.state == "S_CLOSED"
    assert [c.error_code for c in closed_events(pair, session)] == [0x010A]
    assert pair.server.connections == []
    # Closing again is a no-op.
    pair.client.close(1, "again")
    assert len(closed_events(pair, pair.client)) == 1


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_after_establishment_drains_and_both_sides_see_it(ids: Ids, closer: str) -> None:
    pair = make_pair(*configs(ids, 52, close_drain_time=1.0))
    session = pair.handshake()
    pair.run(duration=0.2)
    active, passive = (pair.client, session) if closer == "client" else (session, pair.client)
    passive_node = "server" if closer == "client" else "client"
    # The passive side's last data crosses the close on the wire: the closer still takes it.
    passive.send_data(b"in flight")
    active.close(0x0042, "maintenance")
    assert active.state.endswith("_CLOSING")
    with pytest.raises(StateError):
        active.send_data(b"too late")
    pair.run(lambda: active.closed and passive.closed, duration=5)
    assert active.state.endswith("_CLOSED") and passive.state.endswith("_CLOSED")
    assert [(c.error_code, c.reason, c.by_peer) for c in closed_events(pair, active)] == [
        (0x0042, "maintenance", False)]
    assert [(c.error_code, c.reason, c.by_peer) for c in closed_events(pair, passive)] == [
        (0x0042, "maintenance", True)]
    active_node = "client" if closer == "client" else "server"
    assert data_of(pair, active_node) == [b"in flight"]
    assert data_of(pair, passive_node) == []
    for conn in (active, passive):
        assert conn.record is not None and conn.record.erased
        assert conn.get_timer() is None
        assert not any(t[1] == "fatal" for t in pair.transitions(conn.name))
    # The passive side drained for close_drain_time before it reported the close.
    passive_closed = [e.time for e in pair.link.events
                      if e.connection is passive and isinstance(e.event, ConnectionClosed)]
    assert passive_closed[0] >= 1.0
    assert pair.server.connections == []


def test_close_whose_frames_are_all_lost_still_ends_both_sides(ids: Ids) -> None:
    """With every resend of CTRL_CLOSE lost, the closer gives up after the drain time and the
    peer, hearing nothing, closes on its idle timeout. Both ends are bounded."""
    client_cfg, server_cfg = configs(ids, 53, idle_timeout=5.0, keepalive_interval=1.0)
    blackhole = {"on": False}
    pair = make_pair(client_cfg, server_cfg,
                     mitm=lambda d, s, dst, now: [] if blackhole["on"] else None)
    session = pair.handshake()
    blackhole["on"] = True
    pair.client.close(7, "bye")
    pair.run(lambda: pair.client.closed and session.closed, duration=20)
    assert [c.error_code for c in closed_events(pair, pair.client)] == [7]
    assert [c.error_code for c in closed_events(pair, session)] == [0x0203]
    assert session.state == "S_CLOSED" and session.record is not None and session.record.erased


def test_a_lost_close_frame_is_resent_while_draining(ids: Ids) -> None:
    """The first CTRL_CLOSE is lost; the resend a third of the drain time later reaches the
    peer, which closes with the closer's code instead of waiting for its idle timeout."""
    client_cfg, server_cfg = configs(ids, 54, idle_timeout=30.0, close_drain_time=0.9)
    dropped: list[float] = []

    def drop_first_close(d: bytes, src: object, dst: object, now: float) -> list[bytes] | None:
        if src == CLIENT_ADDR and d[:2] == b"QP" and d[3] & 0x01 and not dropped:
            dropped.append(now)
            return []
        return None

    pair = make_pair(client_cfg, server_cfg, mitm=drop_first_close)
    session = pair.handshake()
    pair.client.close(7, "bye")
    pair.run(lambda: pair.client.closed and session.closed, duration=10)
    assert dropped
    assert [c.error_code for c in closed_events(pair, session)] == [7]
    assert [c.error_code for c in closed_events(pair, pair.client)] == [7]


# --- drops, illegal input, state names ----------------------------------------------------------


def _handshake_records(ids: Ids, seed: int) -> dict[int, list[bytes]]:
    """Real CH, SH and CF datagrams from an honest handshake, by message type."""
    pair = make_pair(*configs(ids, seed))
    pair.handshake()
    out: dict[int, list[bytes]] = {}
    for e in pair.link.emitted:
        t = hs_type(e.data)
        if t is not None:
            out.setdefault(t, []).append(e.data)
    return out


def test_server_drops_and_counts_out_of_place_messages(ids: Ids) -> None:
    """A ServerHello sent to a server and a ClientFinished before any ClientHello change no
    state, produce no output and no event; they are counted. A real handshake still works."""
    records = _handshake_records(ids, 61)
    _, server_cfg = configs(ids, 62)
    server = Connection(server_cfg, False, name="bare-server")
    for data in records[hs.MSG_CLIENT_FINISHED] + records[hs.MSG_SERVER_HELLO]:
        server.receive_datagram(data, CLIENT_ADDR, 0.0)
        assert server.state in ("S_IDLE", "S_LISTEN")
        assert server.datagrams_to_send() == [] and server.next_event() is None
    assert sum(server.drop_counts.values()) == (len(records[hs.MSG_CLIENT_FINISHED])
                                                + len(records[hs.MSG_SERVER_HELLO]))
    assert server.record is None and server.get_timer() is None

    # The same bare connection then serves an honest client to completion.
    client_cfg, _ = configs(ids, 63)
    link = SimLink(63)
    client = Connection(client_cfg, True)
    link.add("client", CLIENT_ADDR, client)
    link.add("server", SERVER_ADDR, server)
    client.connect(SERVER_ADDR, 0.0)
    link.run(lambda: client.established and server.established, duration=5)
    assert client.established and server.established


def test_endpoint_drops_and_counts_messages_without_a_session(ids: Ids) -> None:
    records = _handshake_records(ids, 64)
    _, server_cfg = configs(ids, 65)
    from palisade_c.endpoint import ServerEndpoint

    server = ServerEndpoint(server_cfg)
    stray = (records[hs.MSG_CLIENT_FINISHED] + records[hs.MSG_SERVER_HELLO]
             + records[hs.MSG_HANDSHAKE_ACK] + [b"QP" + bytes(80), b"\x00" * 10])
    for data in stray:
        server.receive_datagram(data, CLIENT_ADDR, 0.0)
    assert server.connections == [] and server.datagrams_to_send() == []
    assert server.next_event() is None
    assert sum(server.drop_counts.values()) == len(stray)


def test_client_drops_and_counts_out_of_place_messages(ids: Ids) -> None:
    pair = make_pair(*configs(ids, 66))
    session = pair.handshake()
    pair.run(duration=0.5)
    records = _handshake_records(ids, 67)
    before = sum(pair.client.drop_counts.values())
    stray = records[hs.MSG_CLIENT_HELLO] + records[hs.MSG_CLIENT_FINISHED] \
        + records[hs.MSG_SERVER_HELLO]
    for data in stray:
        pair.link.inject(data, SERVER_ADDR, CLIENT_ADDR)
    # ... and to the established server session, under its own session RID, a ServerHello.
    own_sh = [e.data for e in pair.link.emitted if hs_type(e.data) == hs.MSG_SERVER_HELLO]
    s_before = session.drop_counts.get("unexpected-handshake", 0)
    for data in own_sh:
        pair.link.inject(data, CLIENT_ADDR, SERVER_ADDR)
    n_events = len(pair.link.events)
    pair.run(duration=0.5)
    assert sum(pair.client.drop_counts.values()) - before == len(stray)
    assert session.drop_counts.get("unexpected-handshake", 0) - s_before == len(own_sh)
    assert pair.link.events[n_events:] == []
    assert pair.client.state == "C_ESTABLISHED" and session.state == "S_ESTABLISHED"


def test_local_misuse_raises_and_changes_nothing(ids: Ids) -> None:
    client_cfg, server_cfg = configs(ids, 68)
    client = Connection(client_cfg, True)
    with pytest.raises(StateError):
        client.send_data(b"x")
    with pytest.raises(StateError):
        client.request_rekey()
    client.close(0, "nothing to close")
    assert client.state == "C_IDLE"
    client.connect(SERVER_ADDR, 0.0)
    with pytest.raises(StateError):
        client.connect(SERVER_ADDR, 0.0)
    with pytest.raises(StateError):
        Connection(server_cfg, False).connect(CLIENT_ADDR, 0.0)
    assert client.state == "C_WAIT_SH"


def _logged_states(pair: Pair, client: bool) -> set[str]:
    """Every state named in the transition log of the client (or of the server sessions)."""
    names: set[str] = set()
    for entry in pair.log:
        if entry["kind"] == "transition" and (entry["conn"] == "client") == client:
            names.update((entry["old"], entry["new"]))
    return names


def test_every_state_is_a_seed_state_name(ids: Ids) -> None:
    """Walk a session through its life (handshake over a lossy link, a rekey each way, close)
    and a failed one (timeout, abort), sampling both sides' state after every simulation step
    and reading every transition the connections logged."""
    seen: dict[str, set[str]] = {"C": set(), "S": set()}

    def sampler(pair: Pair) -> Callable[[float], None]:
        def sample(now: float) -> None:
            seen["C"].add(pair.client.state)
            for s in pair.sessions():
                seen["S"].add(s.state)
        return sample

    pair = make_pair(*configs(ids, 71), seed=71, loss=0.2, duplicate=0.1, max_delay=0.05)
    pair.link.on_step(sampler(pair))
    seen["C"].add(pair.client.state)
    session = pair.handshake()

    def traffic(now: float) -> None:
        pair.client.send_data(b"x")
        session.send_data(b"y")

    for requester in (pair.client, session):
        requester.request_rekey()
        seen["C"].add(pair.client.state)
        seen["S"].add(session.state)
        for i in range(60):
            pair.link.schedule(pair.link.now + 0.01 * i, traffic)
        pair.run(lambda: pair.client.state == "C_ESTABLISHED"
                 and session.state == "S_ESTABLISHED" and not pair.link.pending_callbacks,
                 duration=20)
    assert pair.client.epoch == session.epoch == 2
    pair.client.close(0, "done")
    seen["C"].add(pair.client.state)
    pair.run(lambda: pair.client.closed and session.closed, duration=5)

    failed = make_pair(*configs(ids, 72, handshake_timeout=2.0),
                       mitm=lambda d, s, dst, now: [] if dst == CLIENT_ADDR else None)
    failed.link.on_step(sampler(failed))
    failed.connect()
    failed.run(lambda: failed.client.closed, duration=5)
    failed.run(duration=5)

    client_states = _logged_states(pair, True) | _logged_states(failed, True) | seen["C"]
    server_states = _logged_states(pair, False) | _logged_states(failed, False) | seen["S"]
    assert client_states <= SEED_CLIENT_STATES, client_states - SEED_CLIENT_STATES
    assert server_states <= SEED_SERVER_STATES, server_states - SEED_SERVER_STATES
    # The walk really went through the life cycle (so the check above is not vacuous).
    assert {"C_IDLE", "C_INITIATING", "C_WAIT_SH", "C_VERIFY_SH", "C_DERIVE_KEYS",
            "C_ESTABLISHED", "C_REKEY_PENDING", "C_CLOSING", "C_ABORT",
            "C_CLOSED"} <= client_states
    assert {"S_IDLE", "S_LISTEN", "S_WAIT_CH", "S_VERIFY_CH", "S_PREPARE_SH", "S_WAIT_FIN",
            "S_DERIVE_KEYS", "S_ESTABLISHED", "S_REKEY_PENDING", "S_CLOSING", "S_ABORT",
            "S_CLOSED"} <= server_states


def test_client_fails_when_the_server_never_confirms_its_finished(ids: Ids) -> None:
    """The client is established after sending CF, but if neither the CF ack nor any
    authenticated packet ever arrives, its CF resends run out and it fails with 0x010A."""
    client_cfg, server_cfg = configs(ids, 55, idle_timeout=600.0, keepalive_interval=600.0)
    pair = make_pair(client_cfg, server_cfg)
    pair.link.mitm = lambda d, src, dst, now: (
        [] if src == SERVER_ADDR and pair.client.established else None)
    pair.connect()
    pair.run(lambda: pair.client.closed, duration=120)
    assert [c.error_code for c in closed_events(pair, pair.client)] == [0x010A]
    assert pair.client.record is not None and pair.client.record.erased


def test_handshake_budget_stretches_with_the_links_airtime(ids: Ids) -> None:
    fast, _ = configs(ids)
    slow, _ = configs(ids, link_bits_per_second=9600)
    assert Connection(fast, True).handshake_budget == fast.handshake_timeout
    # ~16.5 KB of handshake at 10 bits per byte takes ~17 s each way at 9600 baud.
    budget = Connection(slow, True).handshake_budget
    assert budget == pytest.approx(slow.handshake_timeout + 2 * 16_500 * 10 / 9600)
