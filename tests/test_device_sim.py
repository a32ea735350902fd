"""The C device peer (firmware_bridge/c/pal_device.c, through palisade_c.device) against the
Python client, in memory over the seeded lossy link: handshake, data both ways, rekeys, soft
close, abort codes, and hostile packets."""

from __future__ import annotations

from typing import Any

import pytest
from simlink import SimLink, seeded_rng

from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.device import Device, context_size
from palisade_c.events import ConnectionClosed, DataReceived, EpochChanged
from palisade_c.identity import Identity

NODE = bytes.fromhex("00112233445566aa")


@pytest.fixture(scope="module")
def ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def make(ids: tuple[Identity, Identity], seed: int, *, loss: float = 0.0, dup: float = 0.0,
         min_delay: float = 0.01, max_delay: float = 0.01, mtu: int = 512,
         trusted: list[str] | None = None, client_identity: Identity | None = None,
         node_id: bytes | None = NODE, **dev_kw: Any) -> tuple[SimLink, Connection, Device]:
    ci, si = ids
    cc = Config(identity=client_identity or ci, trusted_peers=[si.public_key],
                rng=seeded_rng(seed), max_datagram_size=mtu, node_id=NODE)
    dev = Device(si, trusted if trusted is not None else [ci.fingerprint], node_id=node_id,
                 mtu=mtu, rng=seeded_rng(seed + 1000), **dev_kw)
    link = SimLink(seed, loss=loss, duplicate=dup, min_delay=min_delay, max_delay=max_delay)
    client = Connection(cc, True)
    link.add("client", "C", client)
    link.add("device", "D", dev)

    def echo(ev: Any) -> None:
        if ev.node == "device" and isinstance(ev.event, DataReceived) and dev.established:
            dev.send_data(b"echo:" + ev.event.data, ev.event.stream_id)

    link.on_event(echo)
    client.connect("D", 0.0)
    return link, client, dev


def of(link: SimLink, node: str, kind: type) -> list[Any]:
    return [e.event for e in link.events if e.node == node and isinstance(e.event, kind)]


def exchange(link: SimLink, client: Connection, tag: bytes, timeout: float = 20.0) -> bool:
    """Client sends `tag` every 0.3 s until the device's echo comes back (data may be lost)."""
    want = b"echo:" + tag

    def resend(now: float) -> None:
        if want not in link.data_received("client") and client.established:
            client.send_data(tag)
            link.schedule(now + 0.3, resend)

    resend(link.now)
    link.run(lambda: want in link.data_received("client"), duration=timeout)
    return want in link.data_received("client")


def full_session(ids: tuple[Identity, Identity], seed: int, rekeys: int = 2,
                 **kw: Any) -> tuple[bool, str]:
    link, client, dev = make(ids, seed, **kw)
    link.run(lambda: client.established and dev.established, duration=60)
    if not (client.established and dev.established):
        return False, f"handshake: {client.state} {dev.state}"
    if not exchange(link, client, b"first"):
        return False, "data"
    for i in range(rekeys):
        target = dev.epoch + 1
        dev.request_rekey()
        # Traffic carries the transition: an idle peer would learn of the new epoch only from
        # the device's next packet (its rekey ack, or a keepalive 15 s later, may be lost).
        start = link.now
        n = 0
        while not (dev.epoch >= target and client.epoch >= target) and link.now - start < 60:
            n += 1
            if not exchange(link, client, b"during-%d-%d" % (i, n)):
                return False, f"data during rekey {i}"
        if dev.epoch < target or client.epoch < target:
            return False, f"rekey {i}: device {dev.epoch} client {client.epoch}"
        link.run(lambda t=target: any(e.epoch >= t for e in of(link, "device", EpochChanged)),
                 duration=10)
        if not any(e.epoch >= target for e in of(link, "device", EpochChanged)):
            return False, f"rekey {i}: no EpochChanged from the device"
        if not exchange(link, client, b"after-%d" % i):
            return False, f"data after rekey {i}"
    dev_echo = link.data_received("client")
    if not dev_echo:
        return False, "nothing echoed"
    client.close(0, "bye")
    link.run(lambda: client.closed and dev.closed, duration=30)
    if not (client.closed and dev.closed):
        return False, f"close: {client.state} {dev.state}"
    closes = of(link, "device", ConnectionClosed)
    if not closes or closes[-1].by_peer is not True or closes[-1].reason != "bye":
        return False, f"device close event {closes}"
    return True, ""


def test_context_fits_the_budget() -> None:
    assert context_size() <= 24 * 1024


def test_handshake_data_rekeys_and_close_clean_link(ids: tuple[Identity, Identity]) -> None:
    ok, why = full_session(ids, 1, rekeys=3)
    assert ok, why


def test_seed_sweep_under_loss_duplication_and_reordering(
        ids: tuple[Identity, Identity]) -> None:
    failures = []
    for seed in range(100):
        ok, why = full_session(ids, 100 + seed, rekeys=2, loss=0.1, dup=0.05,
                               min_delay=0.005, max_delay=0.04)
        if not ok:
            failures.append((seed, why))
    print(f"device seed sweep: {100 - len(failures)}/100 sessions complete")
    assert not failures, failures


# Seeds where the ServerHello stalled behind the amplification limit (docs/protocol.md §8.6):
# the client's acks of its partial ServerHello were all lost, the server's resends had used up
# its 3x budget, and the client, which stopped its hello timer at the first ServerHello
# fragment and acked only when a fragment arrived, never sent the byte that would unblock it.
# Both servers stalled the same way (the defect was the client's): the client now repeats its
# ack of a partial reply when its hello timer fires (§8.5).
STALL_SEEDS = [10038, 10053]


def _python_server_session(ids: tuple[Identity, Identity], seed: int) -> bool:
    ci, si = ids
    cc = Config(identity=ci, trusted_peers=[si.public_key], rng=seeded_rng(seed),
                max_datagram_size=512, node_id=NODE)
    sc = Config(identity=si, trusted_peers=[ci.public_key], rng=seeded_rng(seed + 1000),
                max_datagram_size=512, node_id=NODE)
    link = SimLink(seed, loss=0.1, duplicate=0.05, min_delay=0.005, max_delay=0.06)
    client, server = Connection(cc, True), Connection(sc, False)
    link.add("client", "C", client)
    link.add("server", "S", server)
    client.connect("S", 0.0)
    link.run(lambda: client.established and server.established, duration=60)
    return client.established and server.established


@pytest.mark.parametrize("seed", STALL_SEEDS)
@pytest.mark.parametrize("server", ["c-device", "python"])
def test_handshake_no_longer_stalls_behind_the_amplification_limit(
        ids: tuple[Identity, Identity], seed: int, server: str) -> None:
    if server == "python":
        assert _python_server_session(ids, seed)
    else:
        link, client, dev = make(ids, seed, loss=0.1, dup=0.05, min_delay=0.005,
                                 max_delay=0.06)
        link.run(lambda: client.established and dev.established, duration=60)
        assert client.established and dev.established
