"""The fleet's single-use ticket store (Redis) and tickets that outlive a process: replays are
refused across workers, across restarts and while the store is down (fail closed).

Every test here runs a real ``redis-server`` on a free loopback port (tests/fleet.py); they skip,
saying so, only where no ``redis-server`` is installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from aiohelpers import run_bounded
from fleet import (
    Fleet,
    RedisServer,
    _client_config,
    _round_trip,
    keyfiles_fixture,  # noqa: F401  (fixture)
    redis_server_fixture,  # noqa: F401  (fixture)
)

from palisade_c import hsrecord as hs
from palisade_c import ridlayout, wire
from palisade_c.aio import Tunnel, connect
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.errors import ErrorCode
from palisade_c.events import HandshakeCompleted
from palisade_c.identity import Identity
from palisade_c.ticketkeys import FileTicketKeyRing
from palisade_c.tickets import ClientTicket, TicketService, TicketStoreUnavailable
from palisade_c.ticketstore_redis import RedisTicketStore

FP = b"F" * 32


def service(keyfile: Path, url: str) -> TicketService:
    """One worker's ticket service: the shared key file and the shared Redis database."""
    return TicketService(FP, RedisTicketStore(url), lifetime=600,
                         keys=FileTicketKeyRing(keyfile, FP))


def issue(svc: TicketService) -> bytes:
    return svc.issue(os.urandom(32), os.urandom(16), b"C" * 32, 1, 2, 3)


def test_a_ticket_is_claimed_once_across_two_workers(
        tmp_path: Path, redis_server: RedisServer) -> None:
    w0, w1 = service(tmp_path / "k", redis_server.url), service(tmp_path / "k", redis_server.url)
    ticket = issue(w0)
    assert w1.redeem(ticket)[1] == ""
    assert w0.redeem(ticket) == (None, "replayed")
    assert w1.redeem(ticket) == (None, "replayed")


def test_concurrent_claims_of_one_ticket_have_one_winner(
        tmp_path: Path, redis_server: RedisServer) -> None:
    workers = [service(tmp_path / "k", redis_server.url) for _ in range(4)]
    ticket = issue(workers[0])
    results: list[str] = []
    threads = [threading.Thread(target=lambda w=w: results.append(w.redeem(ticket)[1]))
               for w in workers for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [""] + ["replayed"] * 11


def test_claims_expire_with_their_tickets(redis_server: RedisServer) -> None:
    import redis

    store = RedisTicketStore(redis_server.url)
    now = time.time()
    assert store.claim(b"i" * 16, now + 30, now)
    key = b"palisade:ticket:" + (b"i" * 16).hex().encode()
    ttl = redis.Redis.from_url(redis_server.url).pttl(key)
    assert 29_000 < ttl <= 31_000
    assert store.purge(now) == 0


def test_replays_stay_refused_across_a_restart(tmp_path: Path,
                                               redis_server: RedisServer) -> None:
    before = service(tmp_path / "k", redis_server.url)
    used, unused = issue(before), issue(before)
    assert before.redeem(used)[1] == ""
    after = service(tmp_path / "k", redis_server.url)  # a restarted server
    assert after.redeem(used) == (None, "replayed")
    assert after.redeem(unused)[1] == ""  # the key file outlived the process


def test_redis_down_fails_closed(tmp_path: Path, redis_server: RedisServer) -> None:
    svc = service(tmp_path / "k", redis_server.url)
    used = issue(svc)
    assert svc.redeem(used)[1] == ""
    redis_server.stop()
    fresh = issue(svc)
    assert svc.redeem(used) == (None, "store-unavailable")
    assert svc.redeem(fresh) == (None, "store-unavailable")
    assert svc.redeem(fresh) == (None, "store-unavailable")  # fast path while it is down


def test_a_slow_store_fails_closed() -> None:
    """A server that accepts the connection but never answers: the claim gives up after the
    timeout and refuses, and later claims fail at once for a while instead of stalling."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        port = listener.getsockname()[1]
        store = RedisTicketStore(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        now = time.time()
        started = time.monotonic()
        with pytest.raises(TicketStoreUnavailable):
            store.claim(b"s" * 16, now + 60, now)
        assert time.monotonic() - started < 5  # bounded by the timeout, not hanging
        with pytest.raises(TicketStoreUnavailable):
            store.claim(b"t" * 16, now + 60, now)
        assert store.failures == 2
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["http://x", "redis://", "redis://h:notaport/0",
                                 "redis://h:1/db"])
def test_bad_store_urls_are_refused(url: str) -> None:
    from palisade_c.errors import ConfigError

    with pytest.raises(ConfigError):
        RedisTicketStore(url)


# -- end to end: serve --workers 2 --ticket-key --ticket-store ------------------------------------


async def _first_ticket(url: str, config: Config) -> ClientTicket:
    tunnel = await connect(url, config, timeout=30)
    try:
        await _round_trip(tunnel, b"full")
        return await _ticket_from(tunnel)
    finally:
        await tunnel.close()


async def _ticket_from(tunnel: Tunnel) -> ClientTicket:
    for _ in range(100):
        if tunnel.tickets:
            return tunnel.tickets[-1]
        await asyncio.sleep(0.05)
    raise AssertionError("no ticket issued")


def test_zero_rtt_replays_refused_across_workers_restarts_and_a_down_store(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity],
        redis_server: RedisServer) -> None:
    key_file = tmp_path / "ticket.keys"
    extra = ("--ticket-key", str(key_file), "--ticket-store", redis_server.url)
    config = _client_config(keyfiles)

    async def resume(url: str, ticket: ClientTicket) -> tuple[bool, bool, ClientTicket]:
        """(resumed, early data accepted, the new ticket) after a round trip."""
        tunnel = await connect(url, config, ticket=ticket, early_data=b"early", timeout=30)
        try:
            hs = tunnel.handshake
            assert hs is not None
            await _round_trip(tunnel, b"ping")
            return hs.resumed, hs.early_data_accepted, await _ticket_from(tunnel)
        finally:
            await tunnel.close()

    async def first_ticket(url: str) -> ClientTicket:
        tunnel = await connect(url, config, timeout=30)
        try:
            await _round_trip(tunnel, b"full")
            return await _ticket_from(tunnel)
        finally:
            await tunnel.close()

    fleet = Fleet(tmp_path, keyfiles[0], keyfiles[1], *extra)
    try:
        ticket = run_bounded(first_ticket(fleet.url), 60)
        resumed, early, spare = run_bounded(resume(fleet.url, ticket), 60)
        assert (resumed, early) == (True, True)
        # The same ticket and 0-RTT flight again, from new first-flight RIDs that the kernel
        # spreads over both workers: every one is refused and falls back to a full handshake.
        for _ in range(6):
            resumed, early, _t = run_bounded(resume(fleet.url, ticket), 60)
            assert (resumed, early) == (False, False)
    finally:
        fleet.stop()
    restarted = Fleet(tmp_path, keyfiles[0], keyfiles[1], *extra)
    try:
        assert run_bounded(resume(restarted.url, ticket), 60)[:2] == (False, False)
        resumed, early, spare = run_bounded(resume(restarted.url, spare), 60)
        assert (resumed, early) == (True, True)  # a ticket from before the restart
        redis_server.stop()
        # Store down: resumption is refused, never assumed single-use; the tunnel still works.
        assert run_bounded(resume(restarted.url, spare), 60)[:2] == (False, False)
    finally:
        restarted.stop()
    assert "unavailable" in restarted.text()


def test_tickets_survive_a_restart_with_a_ticket_key_file(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> None:
    """No Redis: one worker, the key file and the SQLite store of a single host."""
    extra = ("--ticket-key", str(tmp_path / "ticket.keys"),
             "--ticket-db", str(tmp_path / "used.sqlite"))
    config = _client_config(keyfiles)

    async def full(url: str) -> ClientTicket:
        tunnel = await connect(url, config, timeout=30)
        try:
            await _round_trip(tunnel, b"x")
            return await _ticket_from(tunnel)
        finally:
            await tunnel.close()

    async def resumed(url: str, ticket: ClientTicket) -> bool:
        tunnel = await connect(url, config, ticket=ticket, timeout=30)
        try:
            await _round_trip(tunnel, b"y")
            assert tunnel.handshake is not None
            return tunnel.handshake.resumed
        finally:
            await tunnel.close()

    first = Fleet(tmp_path, keyfiles[0], keyfiles[1], *extra, workers=1)
    try:
        ticket = run_bounded(full(first.url), 60)
    finally:
        first.stop()
    second = Fleet(tmp_path, keyfiles[0], keyfiles[1], *extra, workers=1)
    try:
        assert run_bounded(resumed(second.url, ticket), 60) is True
        assert run_bounded(resumed(second.url, ticket), 60) is False  # single use, SQLite
    finally:
        second.stop()


def _resume_by_hand(conn: Connection, server: tuple[str, int], ticket: ClientTicket,
                    early: bytes) -> tuple[list[bytes], HandshakeCompleted]:
    """A resumption with 0-RTT driven over a plain socket, keeping the first flight (CHR
    fragments and early packets) as an on-path attacker would record it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.05)
    try:
        conn.connect(server, time.monotonic(), ticket=ticket, early_data=early)
        flight = [d for d, _ in conn.datagrams_to_send()]
        for d in flight:
            sock.sendto(d, server)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                data, _ = sock.recvfrom(4096)
                conn.receive_datagram(data, server, time.monotonic())
            timer = conn.get_timer()
            if timer is not None and timer <= time.monotonic():
                conn.handle_timer(time.monotonic())
            for d, _ in conn.datagrams_to_send():
                sock.sendto(d, server)
            while (event := conn.next_event()) is not None:
                if isinstance(event, HandshakeCompleted):
                    # Close it, so that its first-flight RID is free again on the server.
                    conn.close()
                    for d, _ in conn.datagrams_to_send():
                        sock.sendto(d, server)
                    return flight, event
        raise AssertionError("the genuine resumption did not complete")
    finally:
        sock.close()


def _error_code_for(flight: list[bytes], server: tuple[str, int], rid: bytes) -> int:
    """Replay ``flight`` from a new address, its handshake records re-addressed to ``rid``;
    the ErrorResponse code the server answers with."""
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.settimeout(0.5)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            for d in flight:
                attacker.sendto(d[:6] + rid + d[30:] if d[:2] == b"QH" else d, server)
            with contextlib.suppress(TimeoutError):
                while True:
                    data, _ = attacker.recvfrom(4096)
                    if data[:2] == b"QH":
                        rec = hs.decode(data)
                        if rec.msg_type == hs.MSG_ERROR_RESPONSE:
                            return int(wire.ErrorResponse.decode(rec.fragment).error_code)
                        raise AssertionError(f"the replay got handshake type {rec.msg_type}")
        raise AssertionError("no answer to the replay")
    finally:
        attacker.close()


def test_a_recorded_zero_rtt_flight_replayed_to_either_worker_is_refused(
        tmp_path: Path, keyfiles: tuple[Path, Path, Identity],
        redis_server: RedisServer) -> None:
    """Byte for byte, and with its handshake records re-addressed so that the kernel hands
    them to the other worker: both replays of a genuine 0-RTT first flight are refused with
    ErrorTicketReplayed before any early data is opened."""
    fleet = Fleet(tmp_path, keyfiles[0], keyfiles[1], "--ticket-key",
                  str(tmp_path / "ticket.keys"), "--ticket-store", redis_server.url)
    try:
        config = _client_config(keyfiles)
        ticket = run_bounded(_first_ticket(fleet.url, config), 60)
        server = ("127.0.0.1", fleet.port)
        flight, done = _resume_by_hand(Connection(config, True), server, ticket, b"zero")
        assert done.resumed and done.early_data_accepted
        hello_rid = flight[0][6:30]
        elsewhere = bytearray(hello_rid)
        elsewhere[13] ^= 1  # the other of two workers
        assert ridlayout.worker_for(bytes(elsewhere), 2) != ridlayout.worker_for(hello_rid, 2)
        time.sleep(3)  # the closed session's drain: until then its RIDs still find it
        for rid in (hello_rid, bytes(elsewhere)):
            assert _error_code_for(flight, server, rid) == ErrorCode.ErrorTicketReplayed
    finally:
        fleet.stop()
