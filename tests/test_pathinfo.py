"""The path's datagram size as a promise, and how a client learns it (palisade_c.pathinfo).

In memory over tests/simlink.py: the maximum payload follows the datagram size, send_data
refuses what cannot fit (PacketTooLargeError carrying the maximum), and a gateway's cleartext
path notice only ever shrinks the size, never below the floor, never raises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from simlink import make_pair, seeded_rng

from palisade_c import pathinfo
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import DecodeError, ErrorCode, PacketTooLargeError
from palisade_c.events import ConnectionClosed
from palisade_c.identity import Identity

HEADERS_AND_TAG = 61  # PublicHeader + EncryptedHeader + AEAD tag (PROFILE §4)


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


@pytest.mark.parametrize("size", [256, 512, 1200])
def test_send_data_refuses_what_does_not_fit_and_says_the_maximum(ids: Ids, size: int) -> None:
    pair = make_pair(*configs(ids, max_datagram_size=size))
    session = pair.handshake()
    client = pair.client
    assert client.max_payload == session.max_payload == size - HEADERS_AND_TAG
    client.send_data(bytes(client.max_payload))
    out = client.datagrams_to_send(pair.link.now)
    assert [len(d) for d, _ in out] == [size]  # exactly the promise, not a byte more
    with pytest.raises(PacketTooLargeError) as err:
        client.send_data(bytes(client.max_payload + 1))
    assert err.value.max_payload == size - HEADERS_AND_TAG
    assert str(size - HEADERS_AND_TAG) in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(PacketTooLargeError):
        session.send_data(memoryview(bytes(2000)))
    assert client.datagrams_to_send(pair.link.now) == []


def test_packet_too_large_error_without_a_maximum() -> None:
    err = PacketTooLargeError("too big")
    assert err.max_payload is None and str(err) == "too big"


# --- gateway notices ----------------------------------------------------------------------------

CLIENT = ("10.0.0.2", 50000)
GATEWAY = ("10.0.0.1", 4433)
STEP = 0.005


@dataclass
class GatewaySim:
    """A client and a device server with a gateway in between that carries at most ``mtu``
    bytes per datagram towards the device and, with ``notices``, answers a datagram too
    large with a PATH notice (as palisade_c.gateway does). Time advances in steps."""

    client: Connection
    server: ServerEndpoint
    mtu: int
    bps: int | None
    notices: bool = True
    now: float = 0.0

    def __post_init__(self) -> None:
        self.client_sent: list[bytes] = []
        self.to_client: list[tuple[bytes, object]] = []

    def run(self, until: object, duration: float) -> None:
        end = self.now + duration
        while self.now < end and not until():  # type: ignore[operator]
            for conn in (self.client, self.server):
                t = conn.get_timer()
                if t is not None and t <= self.now:
                    conn.handle_timer(self.now)
            to_server = []
            for data, _addr in self.client.datagrams_to_send(self.now):
                self.client_sent.append(data)
                if len(data) > self.mtu:
                    if self.notices:
                        rid = data[6:30]
                        self.to_client.append(
                            (pathinfo.encode_path_notice(rid, self.mtu, self.bps), GATEWAY))
                    continue
                to_server.append(data)
            for data in to_server:
                self.server.receive_datagram(data, CLIENT, self.now)
            for data, _addr in self.server.datagrams_to_send(self.now):
                self.to_client.append((data, GATEWAY))
            pending, self.to_client = self.to_client, []
            for data, addr in pending:
                self.client.receive_datagram(data, addr, self.now)
            self.now += STEP


def gateway_sim(ids: Ids, mtu: int, bps: int | None, **kw: object) -> GatewaySim:
    client_cfg, server_cfg = configs(ids)
    server_cfg = Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                        rng=seeded_rng(99), max_datagram_size=mtu)
    sim = GatewaySim(Connection(client_cfg, True), ServerEndpoint(server_cfg), mtu, bps,
                     **kw)  # type: ignore[arg-type]
    sim.client.connect(GATEWAY, 0.0)
    return sim


def test_without_notices_a_narrow_path_swallows_the_handshake(ids: Ids) -> None:
    sim = gateway_sim(ids, 512, 115200, notices=False)
    sim.run(lambda: sim.client.established, 5.0)
    assert not sim.client.established


# 1000: the last fragment of the first flight fits and reaches the device, so the device
# reassembles the message from fragments cut two different ways.
@pytest.mark.parametrize("mtu", [256, 512, 1000])
def test_a_path_notice_narrows_the_client_and_the_handshake_goes_through(
    ids: Ids, mtu: int
) -> None:
    sim = gateway_sim(ids, mtu, 115200)
    sim.run(lambda: sim.client.established, 10.0)
    client = sim.client
    assert client.established and sim.now < 1.0  # at once, not after a retransmission
    assert client.config.max_datagram_size == mtu
    assert client.config.link_bits_per_second == 115200
    assert client.max_payload == mtu - HEADERS_AND_TAG
    # Only the first flight went out too large; everything after the notice fits.
    first_small = next(i for i, d in enumerate(sim.client_sent)
                       if len(d) <= mtu and i > 0 and len(sim.client_sent[i - 1]) <= mtu)
    assert all(len(d) <= mtu for d in sim.client_sent[first_small:])
    with pytest.raises(PacketTooLargeError):
        client.send_data(bytes(client.max_payload + 1))


def test_notices_only_narrow_within_the_floors() -> None:
    cfg = Config(identity=Identity.generate())
    assert pathinfo.narrow_config(cfg, 1500, None) is cfg  # never raised
    assert pathinfo.narrow_config(cfg, 1200, 0) is cfg
    tiny = pathinfo.narrow_config(cfg, 64, 300)
    assert tiny.max_datagram_size == pathinfo.PATH_FLOOR == 256
    assert tiny.link_bits_per_second == pathinfo.SPEED_FLOOR
    slow = pathinfo.narrow_config(cfg, 512, 115200)
    assert (slow.max_datagram_size, slow.link_bits_per_second) == (512, 115200)
    assert pathinfo.narrow_config(slow, 1200, 1_000_000) is slow  # neither up nor faster
    assert cfg.max_datagram_size == 1200 and cfg.link_bits_per_second is None  # a copy


@given(st.binary(min_size=24, max_size=24), st.integers(1, 65535),
       st.one_of(st.none(), st.integers(1, 2**32 - 1)), st.integers(0, 2**32 - 1),
       st.binary(max_size=4))
def test_notice_round_trip(rid: bytes, size: int, bps: int | None, boot: int,
                           tail: bytes) -> None:
    path = pathinfo.encode_path_notice(rid, size, bps)
    assert len(path) == 36 and pathinfo.is_notice(path)
    assert pathinfo.parse_notice(path + tail) == pathinfo.PathNotice(rid, size, bps)
    reboot = pathinfo.encode_reboot_notice(rid, boot)
    assert pathinfo.parse_notice(reboot + tail) == pathinfo.RebootNotice(rid, boot)
    for bad in (path[:35], reboot[:33], b"QN\x02" + path[3:], path[:3] + b"\x09" + path[4:]):
        with pytest.raises(DecodeError):
            pathinfo.parse_notice(bad)


def test_notices_from_elsewhere_or_about_another_rid_are_dropped(ids: Ids) -> None:
    sim = gateway_sim(ids, 512, 115200, notices=False)
    client = sim.client
    own = client.rid
    other = bytes(24)
    client.receive_datagram(pathinfo.encode_path_notice(own, 300, 9600), ("10.9.9.9", 1), 0.0)
    client.receive_datagram(pathinfo.encode_path_notice(other, 300, 9600), GATEWAY, 0.0)
    client.receive_datagram(b"QN\x01", GATEWAY, 0.0)
    assert client.config.max_datagram_size == 1200
    assert client.drop_counts == {"notice-unmatched": 2, "notice-malformed": 1}
    sim.server.receive_datagram(pathinfo.encode_path_notice(own, 300, 9600), CLIENT, 0.0)
    client.receive_datagram(pathinfo.encode_path_notice(own, 300, 9600), GATEWAY, 0.0)
    assert client.config.max_datagram_size == 300


def test_a_flood_of_forged_notices_cannot_multiply_the_traffic(ids: Ids) -> None:
    sim = gateway_sim(ids, 65535, None, notices=False)
    client = sim.client
    first = sum(len(d) for d, _ in client.datagrams_to_send(0.0))
    for size in range(1199, 1099, -1):  # 100 notices, each narrowing by one byte
        client.receive_datagram(pathinfo.encode_path_notice(client.rid, size, None), GATEWAY,
                                0.001)
    resent = sum(len(d) for d, _ in client.datagrams_to_send(0.001))
    assert client.config.max_datagram_size == 1100
    assert resent <= 2 * first * 1.1  # two immediate refragmentations at most


# --- REBOOT notices: a reason to probe, never to close -------------------------------------------


def established_sim(ids: Ids) -> GatewaySim:
    sim = gateway_sim(ids, 512, 115200)
    sim.run(lambda: sim.client.established, 10.0)
    sim.run(lambda: False, 1.0)  # let the ClientFinished flight and its ack cross
    assert sim.client.established
    return sim


def closed_event(conn: Connection) -> ConnectionClosed | None:
    while (event := conn.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            return event
    return None


def test_a_forged_reboot_notice_never_ends_a_live_session(ids: Ids) -> None:
    sim = established_sim(ids)
    client = sim.client
    epoch = client.epoch
    for _ in range(20):  # a stream of them costs one probe (one rekey), not twenty
        client.receive_datagram(pathinfo.encode_reboot_notice(client.rid, 7), GATEWAY, sim.now)
    requests = len(client.datagrams_to_send(sim.now))
    assert requests == 1
    sim.run(lambda: False, 10.0)
    assert client.established and client.epoch == epoch + 1  # the probe was answered
    # And the next notice probes again.
    client.receive_datagram(pathinfo.encode_reboot_notice(client.rid, 8), GATEWAY, sim.now)
    sim.run(lambda: False, 10.0)
    assert client.established and client.epoch == epoch + 2


def test_a_reboot_notice_ends_a_session_the_device_lost_within_seconds(ids: Ids) -> None:
    sim = established_sim(ids)
    client = sim.client
    # The device restarts: a fresh endpoint that knows nothing of the session.
    sim.server = ServerEndpoint(Config(identity=ids.server, trusted_peers=[ids.client.public_key],
                                       rng=seeded_rng(5), max_datagram_size=512))
    while client.next_event() is not None:
        pass
    told = sim.now
    client.receive_datagram(pathinfo.encode_reboot_notice(client.rid, 9), GATEWAY, sim.now)
    sim.run(lambda: client.closed, 20.0)
    assert client.closed and sim.now - told < 4.0
    event = closed_event(client)
    assert event is not None and not event.by_peer
    assert event.error_code == ErrorCode.ErrorSessionNotFound
    assert "restarted" in event.reason


def test_a_reboot_notice_mid_handshake_resends_the_flight(ids: Ids) -> None:
    sim = gateway_sim(ids, 65535, None)
    client = sim.client
    first = client.datagrams_to_send(0.0)
    client.receive_datagram(pathinfo.encode_reboot_notice(client.rid, 1), GATEWAY, 1.0)
    assert [d for d, _ in client.datagrams_to_send(1.0)] == [d for d, _ in first]
    assert not client.closed
