"""The C device peer's closes, aborts, liveness and drops against the Python client."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import HandshakeMitm, SimLink
from test_device_sim import exchange, make, of

from palisade_c import frames as F
from palisade_c import wire
from palisade_c.connection import Connection
from palisade_c.device import Device
from palisade_c.errors import ErrorCode
from palisade_c.events import ConnectionClosed, DataReceived
from palisade_c.identity import Identity

Ids = tuple[Identity, Identity]


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Identity.generate(), Identity.generate()


def established(ids: Ids, seed: int = 5, **kw: Any) -> tuple[SimLink, Connection, Device]:
    link, client, dev = make(ids, seed, **kw)
    link.run(lambda: client.established and dev.established, duration=30)
    assert client.established and dev.established, (client.state, dev.state)
    return link, client, dev


def test_unpinned_client_key_aborts_with_0x0107(ids: Ids) -> None:
    link, client, dev = make(ids, 7, trusted=[Identity.generate().fingerprint])
    link.run(lambda: client.closed and dev.closed, duration=30)
    assert of(link, "device", ConnectionClosed)[-1].error_code == ErrorCode.ErrorCertificateInvalid
    closed = of(link, "client", ConnectionClosed)
    assert closed and closed[-1].error_code == ErrorCode.ErrorCertificateInvalid
    assert closed[-1].by_peer


def test_bad_client_signature_aborts_with_0x0106(ids: Ids) -> None:
    def flip_signature(message: bytes, _: HandshakeMitm) -> bytes:
        cf = wire.ClientFinished.decode(message)
        sig = bytearray(cf.client_signature)
        sig[100] ^= 0x01
        return cf.replace(client_signature=bytes(sig)).encode()

    link, client, dev = make(ids, 8)
    link.mitm = HandshakeMitm({3: flip_signature}, max_datagram=512)
    link.run(lambda: client.closed and dev.closed, duration=30)
    dev_closed = of(link, "device", ConnectionClosed)
    assert dev_closed[-1].error_code == ErrorCode.ErrorSignatureVerifyFailed
    assert not dev_closed[-1].by_peer
    # The client had counted itself established (1-RTT); the ErrorResponse closes it.
    closed = of(link, "client", ConnectionClosed)
    assert closed and closed[-1].error_code == ErrorCode.ErrorSignatureVerifyFailed


def test_device_soft_close_reaches_the_client(ids: Ids) -> None:
    link, client, dev = established(ids)
    dev.close(0x0042, "maintenance")
    link.run(lambda: client.closed and dev.closed, duration=10)
    c = of(link, "client", ConnectionClosed)[-1]
    assert (c.error_code, c.reason, c.by_peer) == (0x0042, "maintenance", True)
    d = of(link, "device", ConnectionClosed)[-1]
    assert (d.error_code, d.reason, d.by_peer) == (0x0042, "maintenance", False)


def test_device_close_ends_after_the_drain_time_without_answer(ids: Ids) -> None:
    link, _client, dev = established(ids)
    link.mitm = lambda data, src, dst, now: [] if src == "C" else None
    t0 = link.now
    dev.close(1, "gone")
    link.run(lambda: dev.closed, duration=5)
    assert dev.closed
    assert 1.0 <= link.now - t0 < 1.1  # close_drain_time


def test_client_hard_abort_closes_the_device_with_its_code(ids: Ids) -> None:
    link, client, dev = established(ids)
    client._fail(int(ErrorCode.ErrorProtocolViolation), "test abort", True)
    link.run(lambda: dev.closed, duration=5)
    d = of(link, "device", ConnectionClosed)[-1]
    assert d.error_code == ErrorCode.ErrorProtocolViolation and d.by_peer
    assert d.reason == "test abort"


def test_keepalives_hold_an_idle_session_and_silence_times_out(ids: Ids) -> None:
    link, client, dev = established(ids)
    link.run(duration=100)
    assert client.established and dev.established
    before = dev.packets_out
    link.run(duration=40)
    assert dev.packets_out > before  # keepalives every 15 s
    # The client vanishes: the device gives up after the idle timeout.
    link.mitm = lambda data, src, dst, now: [] if src == "C" else None
    link.run(lambda: dev.closed, duration=120)
    d = of(link, "device", ConnectionClosed)[-1]
    assert d.error_code == ErrorCode.ErrorIdleTimeout and not d.by_peer


def test_handshake_timeout_when_the_client_vanishes(ids: Ids) -> None:
    link, _client, dev = make(ids, 9)
    link.mitm = lambda data, src, dst, now: [] if src == "C" and data[3] == 3 else None
    link.run(lambda: dev.closed, duration=60)
    d = of(link, "device", ConnectionClosed)[-1]
    assert d.error_code == ErrorCode.ErrorHandshakeTimeout


def test_handshake_expiry_tells_the_client_session_expired(ids: Ids) -> None:
    """As the Python server does (docs/protocol.md §8.6): a half-open session that expires in
    WAIT_FIN answers with ErrorSessionExpired (0x0201) under the session RID, so the client
    stops at once instead of resending its Finished until its own timers end."""
    def drop_cf(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        # Every CF fragment but the first is lost: the client's address is validated, but
        # the device never holds a whole CF.
        if src == "C" and data[:2] == b"QH" and data[3] == 3 and int.from_bytes(
                data[31:35], "big") > 0:
            return []
        return None

    link, client, dev = make(ids, 10, handshake_timeout=2.0)
    link.mitm = drop_cf
    link.run(lambda: client.closed and dev.closed, duration=10)
    assert of(link, "device", ConnectionClosed)[-1].error_code == ErrorCode.ErrorHandshakeTimeout
    got = of(link, "client", ConnectionClosed)
    assert [c.error_code for c in got] == [ErrorCode.ErrorSessionExpired]
    assert got[0].by_peer
    assert link.now < 4.0  # told at the device's expiry, not after the client's resends


def test_gateway_notices_are_for_clients_and_a_device_only_counts_them(ids: Ids) -> None:
    """A gateway sends PATH and REBOOT notices to clients only; one that reaches the device
    anyway (a misrouted or forged datagram) is dropped and counted, with no effect on the
    handshake or the session, under either RID."""
    from palisade_c.pathinfo import encode_path_notice, encode_reboot_notice

    link, client, dev = make(ids, 11)
    hello = b"\x00" * 24
    dev.receive_datagram(encode_path_notice(hello, 256, 9600), "C", 0.0)
    link.run(lambda: client.established and dev.established, duration=30)
    assert client.established and dev.established
    before = (dev.state, dev.epoch, dev.packets_in)
    rid = client.rid
    dev.receive_datagram(encode_reboot_notice(rid, 7), "C", link.now)
    dev.receive_datagram(encode_path_notice(rid, 300, None), "C", link.now)
    assert (dev.state, dev.epoch, dev.packets_in) == before
    assert dev.drop_counts.get("bad-magic") == 3
    assert exchange(link, client, b"after notices")


def test_client_rekey_request_is_answered_by_an_announcement(ids: Ids) -> None:
    link, client, dev = established(ids)
    client.request_rekey()
    for i in range(20):
        exchange(link, client, b"r%d" % i)
        if dev.epoch == 1 and client.epoch == 1:
            break
    assert dev.epoch == 1 and client.epoch == 1


def test_replayed_and_tampered_packets_are_dropped_and_counted(ids: Ids) -> None:
    link, client, dev = established(ids)
    captured: list[bytes] = []
    swallow: list[bytes] = []

    def capture(data: bytes, src: Any, dst: Any, now: float) -> list[bytes] | None:
        if src == "C" and data[:2] == b"QP":
            if swallow:
                swallow.append(data)
                return []
            captured.append(data)
        return None

    link.mitm = capture
    assert exchange(link, client, b"one")
    pkt = captured[0]
    got = len(of(link, "device", DataReceived))
    link.inject(pkt, "C", "D")
    link.run(duration=0.5)
    assert dev.drop_counts.get("replay") == 1
    assert len(of(link, "device", DataReceived)) == got

    # A packet the device never saw, so that only the tampering can make it fail.
    swallow.append(b"")
    client.send_data(b"unseen")
    link.run(duration=0.2)
    fresh = swallow[1]
    link.mitm = None

    def tampered(i: int, v: int) -> bytes:
        b = bytearray(fresh)
        b[i] ^= v
        return bytes(b)

    cases = {
        "ErrorAEADDecryptFailed": tampered(len(pkt) - 1, 0x01),
        "reserved-bits": tampered(3, 0x02),
        "unknown-rid": tampered(20, 0x01),
        "bad-length": fresh + b"\0",
        "truncated": fresh[:60],
        "ErrorInvalidVersion": tampered(2, 0x01),
    }
    for reason, data in cases.items():
        link.inject(data, "C", "D")
        link.run(duration=0.2)
        assert dev.drop_counts.get(reason, 0) >= 1, (reason, dev.drop_counts)
    assert len(of(link, "device", DataReceived)) == got
    assert dev.established
    link.inject(fresh, "C", "D")  # untampered, it still opens: nothing above marked its seq
    link.run(duration=0.2)
    assert of(link, "device", DataReceived)[-1].data == b"unseen"
    assert exchange(link, client, b"still-fine")


def test_unknown_control_frames_are_ignored(ids: Ids) -> None:
    link, client, dev = established(ids)
    client._send_control(F.ControlFrame(0x55, b"xyz"))
    link.run(duration=0.5)
    assert dev.drop_counts.get("ignored-control") == 1
    assert dev.established


def test_a_new_client_is_served_after_the_session_closed(ids: Ids) -> None:
    link, client, dev = established(ids)
    client.close()
    link.run(lambda: dev.closed and client.closed, duration=10)
    again = Connection(client.config, True)
    link.nodes.pop("client")
    link._by_addr.pop("C")
    link.add("client2", "C", again)
    again.connect("D", link.now)
    link.run(lambda: again.established and dev.established, duration=30)
    assert again.established and dev.established and dev.sessions == 2


def test_a_hostile_first_fragment_does_not_lock_the_device(ids: Ids) -> None:
    """One device context serves one handshake at a time: a ClientHello fragment that it
    refuses (too large for its buffer) must leave it listening, not waiting 15 s for the
    rest of a message it will never take."""
    from palisade_c import hsrecord

    link, client, dev = make(ids, 12)
    bogus = hsrecord.HandshakeRecord(1, bytes(24), 0, 0, 16000, bytes(400)).encode()
    dev.receive_datagram(bogus, "attacker", 0.0)
    assert dev.drop_counts.get("handshake-too-large") == 1
    link.run(lambda: client.established and dev.established, duration=3)
    assert client.established and dev.established


def test_without_a_node_id_the_session_rid_keeps_the_clients_prefix(ids: Ids) -> None:
    """docs/protocol.md §8.4: a server without a node id keeps the client's steering prefix,
    which a client that targeted a node checks on every ServerHello fragment."""
    link, client, dev = make(ids, 13, node_id=None)
    link.run(lambda: client.established and dev.established, duration=5)
    assert client.established and dev.established
    assert client.rid[:8] == bytes.fromhex("00112233445566aa")


def test_key_age_starts_a_rekey(ids: Ids) -> None:
    link, client, dev = established(ids, rekey_after_seconds=5.0)
    start = link.now
    for i in range(60):
        exchange(link, client, b"age %d" % i)
        link.run(duration=0.2)
        if dev.epoch >= 1 and client.epoch >= 1:
            break
    assert dev.epoch >= 1 and client.epoch >= 1
    assert link.now - start >= 5.0


def test_small_mtu_sessions_under_loss(ids: Ids) -> None:
    from test_device_sim import full_session

    for seed in range(10):
        ok, why = full_session(ids, 500 + seed, rekeys=1, loss=0.1, dup=0.05, mtu=256,
                               min_delay=0.005, max_delay=0.04)
        assert ok, (seed, why)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=700), max_size=8), st.sampled_from(["listen", "keys"]))
def test_any_bytes_are_dropped_never_raised(ids: Ids, datagrams: list[bytes],
                                            stage: str) -> None:
    dev = Device(ids[1], [ids[0].fingerprint], mtu=512)
    if stage == "keys":
        dev.install_master(bytes(32), bytes(24))
    for i, data in enumerate(datagrams):
        for prefix in (b"", b"QH\x12", b"QP\x12\x00"):
            dev.receive_datagram(prefix + data, "x", 0.01 * i)
            dev.datagrams_to_send()
            while dev.next_event() is not None:
                pass
    assert dev.state in {"S_LISTEN", "S_WAIT_CH", "S_ESTABLISHED", "S_CLOSED"}
