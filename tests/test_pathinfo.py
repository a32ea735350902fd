"""The path's datagram size as a promise, and how a client learns it (palisade_c.pathinfo).

In memory over tests/simlink.py: the maximum payload follows the datagram size, send_data
refuses what cannot fit (PacketTooLargeError carrying the maximum), and a gateway's cleartext
path notice only ever shrinks the size, never below the floor, never raises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from simlink import make_pair, seeded_rng

from palisade_c.config import Config
from palisade_c.errors import PacketTooLargeError
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
