"""The shared ticket key ring file (``--ticket-key``): workers and hosts sharing the file open
each other's tickets, tickets survive a restart, and rotation keeps every key a live ticket
may need (palisade_c/ticketkeys.py, docs/protocol.md §12)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from palisade_c.errors import ConfigError
from palisade_c.ticketkeys import CLOCK_SKEW, FileTicketKeyRing
from palisade_c.tickets import MemoryTicketStore, TicketInner, TicketService

FP = b"F" * 32


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def inner(clock: Clock, lifetime: int = 100) -> TicketInner:
    return TicketInner(os.urandom(16), clock(), lifetime, os.urandom(32), 0, b"C" * 32, 1, 2, 3)


def ring(path: Path, clock: Clock, **kw: float) -> FileTicketKeyRing:
    kw.setdefault("rotate_every", 100.0)
    kw.setdefault("lifetime", 100.0)
    return FileTicketKeyRing(path, FP, clock=clock, **kw)  # type: ignore[arg-type]


def test_the_file_is_created_0600_and_a_restart_opens_old_tickets(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    first = ring(path, clock)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    t = inner(clock)
    sealed = first.seal(t)
    clock.t += 50
    again = ring(path, clock)  # a restarted process
    assert again.open(sealed) == t
    assert ring(tmp_path / "other.keys", clock).open(sealed) is None  # another key file
    assert FileTicketKeyRing(path, b"G" * 32, clock=clock).open(sealed) is None  # other server


def test_two_workers_open_each_others_tickets_across_a_rotation(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    a, b = ring(path, clock), ring(path, clock)
    before = a.seal(inner(clock))
    assert b.open(before) is not None
    clock.t += 100  # rotation due: whichever seals first rotates, the other follows the file
    after = b.seal(inner(clock))
    assert len(json.loads(path.read_text())["keys"]) == 2
    assert a.open(after) is not None  # a learns the new key from the file at once
    assert a.open(before) is not None and b.open(before) is not None
    a.seal(inner(clock))
    assert len(json.loads(path.read_text())["keys"]) == 2  # a did not rotate a second time


def test_rotation_keeps_a_key_for_a_lifetime_after_its_successor(tmp_path: Path) -> None:
    """A ticket sealed just before a rotation opens for its whole lifetime; keys nobody can
    need any more are dropped, so the ring stays small."""
    clock = Clock()
    path = tmp_path / "ticket.keys"
    r = ring(path, clock)
    clock.t += 99.9
    late = r.seal(inner(clock))  # the last ticket of the first key
    for step in range(1, 8):
        clock.t = 1_000_000.0 + 100 * step
        r.seal(inner(clock))  # rotates
        alive = clock.t < 1_000_099.9 + 100 + CLOCK_SKEW
        if alive:
            assert r.open(late) is not None, step
        assert len(r.key_ids) <= 3
    assert r.open(late) is None  # long dead: its key is gone from memory and file
    assert len(json.loads(path.read_text())["keys"]) <= 3


def test_concurrent_rotations_add_one_key(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    rings = [ring(path, clock) for _ in range(6)]
    clock.t += 100
    threads = [threading.Thread(target=r.seal, args=(inner(clock),)) for r in rings]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(json.loads(path.read_text())["keys"]) == 2


def test_a_key_file_readable_by_others_or_malformed_is_refused(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    ring(path, clock)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        ring(path, clock)
    path.chmod(0o600)
    for bad in (b"", b"[]", b'{"palisade-ticket-keys": 1, "keys": []}',
                b'{"palisade-ticket-keys": 1, "keys": [{"id": 1, "created": 0, "key": "00"}]}',
                b'{"palisade-ticket-keys": 2, "keys": []}'):
        path.write_bytes(bad)
        with pytest.raises(ConfigError):
            ring(path, clock)


def test_a_file_broken_while_serving_keeps_the_keys_held(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    r = ring(path, clock, recheck=0.0)
    sealed = r.seal(inner(clock))
    path.write_bytes(b"garbage")
    clock.t += 1
    assert r.open(sealed) is not None  # logged, not raised out of the handshake


def test_ticket_service_uses_the_shared_ring(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "ticket.keys"
    store = MemoryTicketStore()
    w0 = TicketService(FP, store, lifetime=100, clock=clock, keys=ring(path, clock))
    w1 = TicketService(FP, store, lifetime=100, clock=clock, keys=ring(path, clock))
    ticket = w0.issue(os.urandom(32), os.urandom(16), b"C" * 32, 1, 2, 3)
    got, why = w1.redeem(ticket)
    assert got is not None and why == ""
    assert w0.redeem(ticket) == (None, "replayed")
