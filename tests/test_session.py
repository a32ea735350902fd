"""Session lifecycle over the simulated link: rekeying, close, abort, keepalive, counters, logs.

Seed §3 and §6, spec §11 and §14, PROFILE §5, §6 and §9.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import CLIENT_ADDR, SERVER_ADDR, Pair, make_pair, seeded_rng

from palisade_c import frames as F
from palisade_c import handshake
from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.epoch import SEQ_REKEY_THRESHOLD
from palisade_c.errors import ErrorCode
from palisade_c.events import ConnectionClosed, DataReceived, EpochChanged, NewTicket
from palisade_c.identity import Identity


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def configs(ids: tuple[Identity, Identity], seed: int = 1, **kw: Any) -> tuple[Config, Config]:
    ci, si = ids
    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed), **kw)
    sc = Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed + 1000), **kw)
    return cc, sc


def established(ids: tuple[Identity, Identity], *, seed: int = 1, loss: float = 0.0,
                duplicate: float = 0.0, max_delay: float = 0.01,
                mitm: Any = None, **kw: Any) -> tuple[Pair, Connection]:
    cc, sc = configs(ids, seed, **kw)
    pair = make_pair(cc, sc, seed=seed, loss=loss, duplicate=duplicate, min_delay=0.001,
                     max_delay=max_delay, mitm=mitm)
    return pair, pair.handshake()


def events(pair: Pair, node: str, kind: type) -> list[Any]:
    return [e.event for e in pair.link.events_of(node, kind)]


# -- rekeying --------------------------------------------------------------------------------


def test_server_announced_rekey_moves_both_sides(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, commit_threshold=4)
    client = pair.client
    server.request_rekey()
    assert server.state == "S_REKEY_PENDING"
    assert server.record is not None and server.record.epochs.rx_state_name == "TRANSITION"
    # The announcing server must not seal under epoch 1 before the client proved it armed.
    assert server.record.send_epoch == 0
    for i in range(8):
        client.send_data(b"c%d" % i)
        server.send_data(b"s%d" % i)
        pair.run(duration=0.05)
    pair.run(duration=3.0)
    assert client.epoch == server.epoch == 1
    assert client.state == "C_ESTABLISHED" and server.state == "S_ESTABLISHED"
    assert events(pair, "client", EpochChanged) == [EpochChanged(1)]
    assert events(pair, "server", EpochChanged) == [EpochChanged(1)]


def test_client_request_waits_for_the_servers_announcement(
        ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, commit_threshold=4)
    client = pair.client
    client.request_rekey()
    assert client.state == "C_REKEY_PENDING"
    # A request alone never moves the client's epochs (spec §11.2).
    assert client.record is not None and client.record.send_epoch == 0
    assert client.record.epochs.rx_state_name == "STEADY"
    pair.run(duration=4.0)
    assert client.epoch == server.epoch == 1
    assert client.state == "C_ESTABLISHED"


def test_lost_announcements_are_retransmitted(ids: tuple[Identity, Identity]) -> None:
    dropped = {"n": 0}

    def drop_server_control(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        # flags bit0 (control) is visible in the clear PublicHeader.
        if src == SERVER_ADDR and data[:2] == b"QP" and data[3] & 0x01 and dropped["n"] < 3:
            dropped["n"] += 1
            return []
        return None

    pair, server = established(ids, mitm=drop_server_control, commit_threshold=4)
    server.request_rekey()
    pair.run(duration=10.0)
    assert dropped["n"] == 3
    assert pair.client.epoch == server.epoch == 1


@pytest.mark.parametrize("trigger", ["sequence", "bytes", "age"])
def test_policy_triggers(ids: tuple[Identity, Identity], trigger: str) -> None:
    kw: dict[str, Any] = {"commit_threshold": 4, "keepalive_interval": 1.0}
    if trigger == "bytes":
        kw["rekey_after_bytes"] = 4000
    if trigger == "age":
        kw["rekey_after_seconds"] = 5.0
    pair, server = established(ids, **kw)
    client = pair.client
    if trigger == "sequence":
        # The mandatory trigger (spec §11.1): the client's own counter reaches the threshold.
        assert client.record is not None
        client.record.epochs._debug_set_tx_seq(SEQ_REKEY_THRESHOLD)
        client.send_data(b"crossing the threshold")
        assert client.state == "C_REKEY_PENDING"
    elif trigger == "bytes":
        for _ in range(10):
            client.send_data(bytes(500))
            pair.run(duration=0.02)
    pair.run(duration=8.0)
    assert client.epoch >= 1 and client.epoch == server.epoch


def test_server_sequence_threshold_announces(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, commit_threshold=4)
    assert server.record is not None
    server.record.epochs._debug_set_tx_seq(SEQ_REKEY_THRESHOLD)
    server.send_data(b"x")
    assert server.state == "S_REKEY_PENDING"
    pair.run(duration=4.0)
    assert pair.client.epoch == server.epoch == 1
    assert server.record.send_seq < 100  # the new epoch restarted the sequence


class EpochWatch:
    """Wraps a session's _seal to check, at every seal, that the peer can open that epoch."""

    def __init__(self, sender: Connection, receiver: Connection) -> None:
        self.violations: list[tuple[int, int, int | None]] = []
        self.sealed = 0
        original = sender._seal

        def seal(payload: bytes, stream_id: int, control: bool = False) -> None:
            assert sender.record is not None and receiver.record is not None
            e = sender.record.send_epoch
            rx = receiver.record.epochs
            if e not in (rx.epoch, rx.next_epoch):
                self.violations.append((e, rx.epoch, rx.next_epoch))
            self.sealed += 1
            original(payload, stream_id, control)

        sender._seal = seal  # type: ignore[method-assign]


def drive_rekeys(pair: Pair, server: Connection, rekeys: int, rng: random.Random,
                 check_erasure: bool = True) -> dict[str, Any]:
    """Traffic both ways, a server rekey as soon as the last one finished, until ``rekeys``."""
    client = pair.client
    sent: dict[str, set[bytes]] = {"client": set(), "server": set()}
    received: dict[str, list[bytes]] = {"client": [], "server": []}
    stale_buffers: list[bytearray] = []
    counter = iter(range(10**9))

    def on_event(ev: Any) -> None:
        if isinstance(ev.event, DataReceived):
            received[ev.node].append(ev.event.data)

    pair.link.on_event(on_event)
    watch_s = EpochWatch(server, client)
    watch_c = EpochWatch(client, server)
    last_epoch = server.epoch
    steps = 0
    while server.epoch < rekeys and steps < rekeys * 400:
        steps += 1
        if server.epoch != last_epoch:
            last_epoch = server.epoch
        if server.state == "S_ESTABLISHED" and server.record is not None \
                and server.record.epochs.rx_state_name == "STEADY" \
                and client.epoch == server.epoch:
            if check_erasure:
                stale_buffers.extend(server.record.epochs.key_buffers().values())
                assert client.record is not None
                stale_buffers.extend(client.record.epochs.key_buffers().values())
            server.request_rekey()
        for side, conn in (("client", client), ("server", server)):
            if conn.established and rng.random() < 0.7:
                msg = b"%s-%d" % (side.encode(), next(counter))
                conn.send_data(msg)
                sent[side].add(msg)
        pair.run(duration=rng.uniform(0.001, 0.02))
    pair.run(duration=5.0)
    return {
        "sent": sent, "received": received, "stale": stale_buffers,
        "violations": watch_s.violations + watch_c.violations,
        # How many seals each watch saw: zero would mean the watch checked nothing.
        "watched": (watch_s.sealed, watch_c.sealed),
    }


def assert_rekey_run_sound(pair: Pair, server: Connection, out: dict[str, Any],
                           rekeys: int) -> None:
    client = pair.client
    assert server.epoch >= rekeys
    assert client.epoch == server.epoch, "the two sides desynchronised"
    assert client.record is not None and server.record is not None
    assert client.record.send_epoch == server.record.send_epoch == server.epoch
    # Never a packet sealed under an epoch the peer could not open (PROFILE §6).
    assert min(out["watched"]) > 0, "the epoch watch saw no seal"
    assert out["violations"] == []
    # No AEAD failure means no key mismatch ever happened.
    for conn in (client, server):
        assert "ErrorAEADDecryptFailed" not in conn.drop_counts, conn.drop_counts
    # Exactly once: no duplicates, and nothing that was not sent.
    for receiver, sender in (("server", "client"), ("client", "server")):
        got = out["received"][receiver]
        assert len(got) == len(set(got)), "a packet was accepted twice"
        assert set(got) <= out["sent"][sender]
    # Old epochs' key buffers were overwritten when they were retired.
    live = {id(b) for conn in (client, server)
            for b in conn.record.epochs.key_buffers().values()}  # type: ignore[union-attr]
    for buf in out["stale"]:
        if id(buf) not in live:
            assert not any(buf), "a retired key buffer still holds key material"


def test_one_thousand_rekeys_under_loss_reordering_and_duplication(
        ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, seed=7, loss=0.1, duplicate=0.05, max_delay=0.03,
                               commit_threshold=4, max_transition_time=0.5,
                               rekey_retransmit=0.1)
    out = drive_rekeys(pair, server, 1000, random.Random(7))
    assert_rekey_run_sound(pair, server, out, 1000)
    # With 10 % loss, the link delivered most of what was sent; all of it was accepted once.
    delivered_share = len(out["received"]["server"]) / max(1, len(out["sent"]["client"]))
    assert delivered_share > 0.75


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**16), loss=st.sampled_from([0.0, 0.05, 0.2]),
       duplicate=st.sampled_from([0.0, 0.1]), max_delay=st.sampled_from([0.001, 0.05]))
def test_rekeys_stay_in_sync_for_any_link(ids: tuple[Identity, Identity], seed: int,
                                          loss: float, duplicate: float,
                                          max_delay: float) -> None:
    pair, server = established(ids, seed=seed, loss=loss, duplicate=duplicate,
                               max_delay=max_delay, commit_threshold=4,
                               max_transition_time=0.5, rekey_retransmit=0.1)
    out = drive_rekeys(pair, server, 40, random.Random(seed))
    assert_rekey_run_sound(pair, server, out, 40)


# -- close and abort ---------------------------------------------------------------------------


def test_soft_close_reaches_the_peer_with_code_and_reason(
        ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids)
    client = pair.client
    client.send_data(b"in flight")
    client.close(0x0042, "maintenance")
    assert client.state == "C_CLOSING"
    pair.run(duration=5.0)
    assert client.state == "C_CLOSED" and server.state == "S_CLOSED"
    assert events(pair, "server", DataReceived) == [DataReceived(0, b"in flight")]
    assert events(pair, "server", ConnectionClosed) == [
        ConnectionClosed(0x0042, "maintenance", by_peer=True)]
    assert events(pair, "client", ConnectionClosed) == [
        ConnectionClosed(0x0042, "maintenance", by_peer=False)]
    for conn in (client, server):
        assert conn.record is not None and conn.record.erased
    transitions = pair.transitions("client")
    assert ("C_ESTABLISHED", "close", "C_CLOSING") in transitions


def test_closing_side_drains_in_flight_data(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, max_delay=0.05)
    server.send_data(b"late but before the close")
    pair.client.close()
    pair.run(duration=5.0)
    assert DataReceived(0, b"late but before the close") in events(pair, "client", DataReceived)


def test_close_without_answer_ends_after_the_drain_time(ids: tuple[Identity, Identity]) -> None:
    blackhole = {"on": False}

    def mitm(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        return [] if blackhole["on"] else None

    pair, _ = established(ids, mitm=mitm, close_drain_time=0.7)
    blackhole["on"] = True
    start = pair.link.now
    pair.client.close(0, "bye")
    pair.run(duration=5.0)
    closed = pair.link.events_of("client", ConnectionClosed)
    assert pair.client.state == "C_CLOSED" and len(closed) == 1
    assert closed[0].time - start == pytest.approx(0.7, abs=0.05)


def test_duplicate_close_frames_are_idempotent(ids: tuple[Identity, Identity]) -> None:
    copies: list[bytes] = []

    def capture(data: bytes, src: Any, dst: Any, now: float) -> None:
        if src == CLIENT_ADDR and data[:2] == b"QP" and data[3] & 0x01:
            copies.append(data)
        return None

    pair, server = established(ids, mitm=capture)
    pair.client.close(7, "x")
    pair.run(duration=0.005)
    for data in copies * 3:  # the same close, three more times, while the server drains
        pair.link.inject(data, CLIENT_ADDR, SERVER_ADDR)
    pair.run(duration=5.0)
    assert events(pair, "server", ConnectionClosed) == [ConnectionClosed(7, "x", by_peer=True)]
    assert server.state == "S_CLOSED"


def test_nothing_is_processed_after_closed(ids: tuple[Identity, Identity]) -> None:
    captured: list[bytes] = []

    def capture(data: bytes, src: Any, dst: Any, now: float) -> None:
        if src == CLIENT_ADDR and data[:2] == b"QP":
            captured.append(data)
        return None

    pair, _ = established(ids, mitm=capture)
    pair.client.send_data(b"before")
    pair.run(duration=0.1)
    pair.client.close()
    pair.run(duration=5.0)
    before = dict(pair.client.drop_counts)
    for data in captured:
        pair.client.receive_datagram(data, SERVER_ADDR, pair.link.now)
    assert pair.client.next_event() is None
    assert pair.client.drop_counts.get("closed", 0) == before.get("closed", 0) + len(captured)
    assert pair.client.get_timer() is None


def test_hard_close_aborts_the_peer(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids)
    server._fail(ErrorCode.ErrorProtocolViolation, "test violation", send=True)
    assert server.state == "S_CLOSED"
    pair.run(duration=2.0)
    assert pair.client.state == "C_CLOSED"
    assert events(pair, "client", ConnectionClosed) == [
        ConnectionClosed(int(ErrorCode.ErrorProtocolViolation), "test violation", by_peer=True)]
    assert ("C_ESTABLISHED", "fatal", "C_ABORT") in pair.transitions("client")
    assert ("C_ABORT", "aborted", "C_CLOSED") in pair.transitions("client")
    assert pair.client.record is not None and pair.client.record.erased


def test_unknown_control_types_are_ignored(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids)
    server._send_control(F.ControlFrame(0x77, b"future"))
    server.send_data(b"after")
    pair.run(duration=1.0)
    assert pair.client.established
    assert events(pair, "client", DataReceived) == [DataReceived(0, b"after")]
    assert pair.client.drop_counts.get("ignored-control") == 1


# -- keepalive and idle timeout ------------------------------------------------------------------


def test_keepalives_hold_an_idle_session_open(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids, keepalive_interval=1.0, idle_timeout=3.0,
                               rekey_after_seconds=1000.0)
    pair.run(duration=20.0)
    assert pair.client.established and server.established
    assert server.packets_in >= 15  # keepalives from the client
    assert events(pair, "client", DataReceived) == []  # keepalives deliver nothing


def test_dead_peer_is_detected(ids: tuple[Identity, Identity]) -> None:
    dead = {"on": False}

    def mitm(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        return [] if dead["on"] and src == SERVER_ADDR else None

    pair, _ = established(ids, mitm=mitm, keepalive_interval=1.0, idle_timeout=3.0)
    dead["on"] = True
    start = pair.link.now
    pair.run(duration=10.0)
    closed = pair.link.events_of("client", ConnectionClosed)
    assert pair.client.state == "C_CLOSED" and len(closed) == 1
    assert closed[0].event.error_code == ErrorCode.ErrorIdleTimeout
    assert "idle" in closed[0].event.reason
    assert closed[0].time - start == pytest.approx(3.0, abs=0.1)


# -- counters --------------------------------------------------------------------------------


def test_counters(ids: tuple[Identity, Identity]) -> None:
    pair, server = established(ids)
    client = pair.client
    for _ in range(5):
        client.send_data(b"x" * 100)
    pair.run(duration=0.5)
    client.send_data(b"tampered in flight")
    ((pkt, _),) = client.datagrams_to_send(pair.link.now)
    bogus = bytearray(pkt)
    bogus[-1] ^= 1
    server.receive_datagram(bytes(bogus), CLIENT_ADDR, pair.link.now)
    c = client.counters
    s = server.counters
    assert s["packets_in"] == 5 and s["bytes_in"] == 5 * (45 + 100 + 16)
    # Data plane only (handshake bytes have their own counters): five 100-byte payloads and
    # the 18-byte one, each with 45 bytes of headers and a 16-byte tag.
    assert c["packets_out"] == 6 and c["bytes_out"] == 5 * 161 + (45 + 18 + 16)
    assert c["handshake_bytes_out"] > 3000 and s["handshake_bytes_out"] > 7000
    assert s["state"] == "S_ESTABLISHED" and s["epoch"] == 0
    assert s["drops"] == {"ErrorAEADDecryptFailed": 1}


# -- logs ------------------------------------------------------------------------------------


def _forms(secret: bytes) -> Iterator[str]:
    yield secret.hex()
    yield secret.hex().upper()
    yield base64.b64encode(secret).decode()
    yield repr(secret)[2:-1]


def test_logs_never_hold_keys_secrets_or_plaintext(
        ids: tuple[Identity, Identity], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    marker = b"MARKER-7f3a91-plaintext-never-logged"
    secrets: list[bytes] = []
    # Connection is compiled (its methods cannot be patched), so the spy sits where the
    # session secrets are made: every handshake derives them through handshake._derive.
    original: Callable[..., tuple[bytearray, bytearray | None]] = handshake._derive

    def spy(*args: Any, **kwargs: Any) -> tuple[bytearray, bytearray | None]:
        master, resumption = original(*args, **kwargs)
        secrets.append(bytes(master))
        if resumption is not None:  # only with PLUS resumption
            secrets.append(bytes(resumption))
        return master, resumption

    caplog.set_level(logging.DEBUG, logger="palisade_c")
    monkeypatch.setattr(handshake, "_derive", spy)
    # PLUS resumption on, so resumption secrets and tickets (PSKs) are checked too.
    pair, server = established(ids, commit_threshold=2, plus_features=PLUS_RESUMPTION)
    assert len(secrets) == 4, "the spy saw no master and resumption secrets"  # two per side
    # The epoch-0 traffic keys each side installed from its master secret.
    for conn in (pair.client, server):
        assert conn.record is not None
        secrets.extend(bytes(b) for b in conn.record.epochs.key_buffers().values())
    pair.client.send_data(marker)
    server.request_rekey()
    for _ in range(4):
        pair.client.send_data(marker)
        server.send_data(marker)
        pair.run(duration=0.1)
    pair.run(duration=3.0)
    assert server.record is not None and pair.client.record is not None
    secrets.extend(bytes(b) for b in server.record.epochs.key_buffers().values())
    server._fail(ErrorCode.ErrorProtocolViolation, "bad peer", send=True)
    pair.run(duration=2.0)
    tickets = events(pair, "client", NewTicket)
    assert tickets, "no ticket was issued to check"
    secrets.extend(t.ticket.psk for t in tickets)
    assert len(secrets) >= 8 and all(any(s) for s in secrets)
    text = caplog.text + "\n".join(json.dumps(e) for e in pair.log)
    assert pair.log, "the structured event log recorded nothing"
    kinds = {e["kind"] for e in pair.log}
    assert {"transition", "established", "epoch", "closed"} <= kinds
    for needle in [marker.decode(), marker.hex()] + [f for s in secrets for f in _forms(s)]:
        assert needle not in text


def test_json_lines_event_log(ids: tuple[Identity, Identity], tmp_path: Any) -> None:
    from palisade_c.eventlog import JsonLinesLog

    path = tmp_path / "events.jsonl"
    cc, sc = configs(ids, 3, commit_threshold=2)
    with JsonLinesLog(path) as log:
        pair = make_pair(cc, sc)
        client = Connection(cc, True, event_log=log, name="logged-client")
        pair.link.nodes.pop("client")
        del pair.link._by_addr[CLIENT_ADDR]
        pair.link.add("client", CLIENT_ADDR, client)
        client.connect(SERVER_ADDR, 0.0)
        pair.run(lambda: client.established, duration=5)
        client.send_data(b"secret plaintext")
        client.request_rekey()
        pair.run(duration=3.0)
        client.close(0, "done")
        pair.run(duration=3.0)
    lines = path.read_text().splitlines()
    assert lines and log.lines == len(lines)
    events = [json.loads(line) for line in lines]
    kinds = {e["kind"] for e in events}
    assert {"transition", "established", "epoch", "closed"} <= kinds
    assert all(e["conn"] == "logged-client" for e in events)
    assert "secret plaintext" not in path.read_text()
