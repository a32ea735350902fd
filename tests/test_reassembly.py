"""Reassembly, acks and resends, retransmit timing, amplification limit and retry cookies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palisade_c import hsrecord as hs
from palisade_c.errors import ConfigError, DecodeError, ErrorCode, StateError
from palisade_c.reassembly import (
    COOKIE_LEN,
    AmplificationLimiter,
    CookieIssuer,
    Flight,
    FragmentStatus,
    Reassembler,
    ReassemblyTable,
    RetransmitTimer,
    link_rto_floor,
    serialization_time,
)

RID = bytes(range(24))
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def frags(
    message: bytes, max_datagram: int, msg_type: int = 2, msg_seq: int = 0, rid: bytes = RID
) -> list[hs.HandshakeRecord]:
    return [
        hs.decode(r) for r in hs.fragment_message(msg_type, rid, msg_seq, message, max_datagram)
    ]


def record(offset: int, data: bytes, msg_length: int, msg_type: int = 2) -> hs.HandshakeRecord:
    return hs.HandshakeRecord(msg_type, RID, 0, offset, msg_length, data)


# --- Reassembler ---------------------------------------------------------------------------------


@FAST
@given(
    message=st.binary(min_size=1, max_size=6000),
    max_datagram=st.integers(200, 1300),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_network_delivers_the_original(message: bytes, max_datagram: int, seed: int) -> None:
    """Shuffle, duplicate and drop fragments (and acks); resend only what the ack lacks."""
    rng = random.Random(seed)
    flight = Flight.from_message(2, RID, 3, message, max_datagram)
    table = ReassemblyTable(4)
    delivered: bytes | None = None
    for _ in range(200):
        batch = flight.records_to_resend()
        if flight.acknowledged:
            assert batch == []
        wire = [r for r in batch if rng.random() > 0.3]
        wire += [r for r in batch if rng.random() < 0.3]  # duplicates
        rng.shuffle(wire)
        last_ack = None
        for raw in wire:
            result = table.add(hs.decode(raw), now=0.0)
            assert result.status is not FragmentStatus.MALFORMED
            assert result.status is not FragmentStatus.REFUSED
            if result.status is FragmentStatus.COMPLETE:
                assert delivered is None
                delivered = result.message
            last_ack = result.ack
        if last_ack is not None and rng.random() > 0.2:
            assert flight.on_ack(last_ack)
            # Whatever is still to be resent is exactly what the ack does not cover.
            for raw in flight.records_to_resend():
                rec = hs.decode(raw)
                assert not last_ack.covers(rec.frag_offset, rec.frag_end)
        if flight.acknowledged:
            break
    assert delivered == message
    assert flight.acknowledged
    assert len(table) == 0  # a finished message keeps no state


@FAST
@given(message=st.binary(min_size=1, max_size=3000), seed=st.integers(0, 2**32 - 1))
def test_any_order_and_refragmentation_reassembles(message: bytes, seed: int) -> None:
    """Fragments cut for two different datagram sizes overlap but agree, in any order."""
    rng = random.Random(seed)
    pieces = frags(message, 300) + frags(message, 777)
    rng.shuffle(pieces)
    reasm = Reassembler()
    results = [reasm.add(p) for p in pieces]
    done = [r for r in results if r is not None]
    assert done == [message]
    assert reasm.is_complete and reasm.message == message
    assert reasm.ranges() == [(0, len(message))]


def test_duplicates_are_harmless() -> None:
    reasm = Reassembler()
    a, b = frags(bytes(range(100)), 89)
    assert reasm.add(a) is None
    assert reasm.add(a) is None
    assert reasm.duplicates == 1
    assert reasm.add(b) == bytes(range(100))
    assert reasm.add(b) is None
    assert reasm.duplicates == 2
    assert reasm.is_complete


def test_conflicting_overlap_is_malformed_and_ignored() -> None:
    reasm = Reassembler()
    reasm.add(record(0, b"AAAAAAAAAA", 30))
    with pytest.raises(DecodeError) as info:
        reasm.add(record(5, b"BBBBBBBBBB", 30))  # bytes 5..9 disagree
    assert info.value.code == ErrorCode.ErrorMalformedPacket
    assert reasm.rejected == 1
    assert reasm.ranges() == [(0, 10)]  # untouched
    # The genuine continuation still completes the message; the first copy won.
    reasm.add(record(10, b"C" * 10, 30))
    assert reasm.add(record(20, b"D" * 10, 30)) == b"A" * 10 + b"C" * 10 + b"D" * 10


def test_inconsistent_fragments_refused() -> None:
    reasm = Reassembler()
    reasm.add(record(0, b"x" * 10, 30))
    for bad in (
        record(10, b"y" * 10, 31),  # msg_length changed
        hs.HandshakeRecord(3, RID, 0, 10, 30, b"y" * 10),  # another msg_type
        hs.HandshakeRecord(2, RID, 1, 10, 30, b"y" * 10),  # another msg_seq
    ):
        with pytest.raises(DecodeError):
            reasm.add(bad)
    assert reasm.rejected == 3
    assert reasm.bytes_held == 10


def test_oversize_message_refused_before_allocation() -> None:
    reasm = Reassembler(max_message=1000)
    with pytest.raises(DecodeError):
        reasm.add(record(0, b"x", 1001))
    assert not reasm.started
    assert reasm.add(record(0, b"x", 1000)) is None
    with pytest.raises(ConfigError):
        Reassembler(max_message=hs.MAX_MESSAGE + 1)
    with pytest.raises(ConfigError):
        Reassembler(max_fragments=0)


def test_fragment_count_is_bounded() -> None:
    reasm = Reassembler(max_fragments=4)
    for i in range(4):
        reasm.add(record(2 * i, b"x", 100))
    with pytest.raises(DecodeError):
        reasm.add(record(20, b"x", 100))
    assert reasm.add(record(0, b"x", 100)) is None  # a duplicate is still fine
    assert len(reasm.ranges()) == 4


def test_acks_and_errors_are_not_reassembled() -> None:
    ack = hs.decode(hs.HandshakeAck(2, 0, [(0, 5)]).to_record(RID))
    with pytest.raises(DecodeError):
        Reassembler().add(ack)


def test_empty_message() -> None:
    reasm = Reassembler()
    (empty,) = frags(b"", 100)
    assert reasm.add(empty) == b""
    assert reasm.add(empty) is None
    assert reasm.is_complete and reasm.message == b""
    assert reasm.ack().ranges == ()


def test_ack_lists_at_most_sixteen_ranges() -> None:
    reasm = Reassembler()
    with pytest.raises(StateError):
        reasm.ack()
    for i in range(20):
        reasm.add(record(2 * i, b"x", 40))
    assert len(reasm.ranges()) == 20
    ack = reasm.ack()
    assert ack.ranges == tuple((2 * i, 2 * i + 1) for i in range(16))
    assert (ack.acked_type, ack.acked_seq) == (2, 0)


# --- ReassemblyTable ------------------------------------------------------------------------------


def first_fragment(rid: bytes, msg_length: int = 3000) -> hs.HandshakeRecord:
    return hs.HandshakeRecord(1, rid, 0, 0, msg_length, b"x" * 1000)


def test_table_cap_refuses_and_counts() -> None:
    table = ReassemblyTable(2)
    assert table.add(first_fragment(b"a" * 24)).status is FragmentStatus.PARTIAL
    assert table.add(first_fragment(b"b" * 24)).status is FragmentStatus.PARTIAL
    assert table.add(first_fragment(b"c" * 24)).status is FragmentStatus.REFUSED
    assert table.refused == 1
    assert len(table) == 2
    # Work in progress is never evicted: the existing messages still complete.
    rest = hs.HandshakeRecord(1, b"a" * 24, 0, 1000, 3000, b"x" * 2000)
    result = table.add(rest)
    assert result.status is FragmentStatus.COMPLETE and result.message == b"x" * 3000
    assert result.ack is not None and result.ack.ranges == ((0, 3000),)
    assert table.add(first_fragment(b"c" * 24)).status is FragmentStatus.PARTIAL
    assert table.discard_rid(b"b" * 24) == 1
    assert (b"c" * 24, 1, 0) in table
    assert table.get((b"c" * 24, 1, 0)) is not None
    assert table.pop((b"c" * 24, 1, 0)) is not None
    assert len(table) == 0


def test_table_flood_stays_bounded() -> None:
    rng = random.Random(7)
    table = ReassemblyTable(8)
    for _ in range(5000):
        table.add(first_fragment(rng.randbytes(24), msg_length=hs.MAX_MESSAGE))
    assert len(table) == 8
    assert table.refused == 5000 - 8


def test_table_expiry_makes_room() -> None:
    table = ReassemblyTable(1, max_age=5.0)
    assert table.add(first_fragment(b"a" * 24), now=0.0).status is FragmentStatus.PARTIAL
    assert table.add(first_fragment(b"b" * 24), now=4.0).status is FragmentStatus.REFUSED
    assert table.add(first_fragment(b"b" * 24), now=6.0).status is FragmentStatus.PARTIAL
    assert table.expired == 1
    assert table.expire(100.0) == 1 and len(table) == 0
    with pytest.raises(ConfigError):
        ReassemblyTable(0)
    with pytest.raises(ConfigError):
        ReassemblyTable(1, max_age=0)


def test_table_statuses() -> None:
    table = ReassemblyTable(4, max_message=4000)
    assert table.add(first_fragment(RID, 5000)).status is FragmentStatus.MALFORMED
    assert len(table) == 0
    first = first_fragment(RID)
    assert table.add(first).status is FragmentStatus.PARTIAL
    dup = table.add(first)
    assert dup.status is FragmentStatus.DUPLICATE
    assert dup.ack is not None and dup.ack.ranges == ((0, 1000),)
    clash = hs.HandshakeRecord(1, RID, 0, 500, 3000, b"y" * 1000)
    assert table.add(clash).status is FragmentStatus.MALFORMED
    assert table.malformed == 2


def test_single_record_messages_need_no_buffer() -> None:
    table = ReassemblyTable(1)
    (cf,) = frags(b"finished", 1200, msg_type=3, msg_seq=1)
    result = table.add(cf)
    assert result.status is FragmentStatus.COMPLETE and result.message == b"finished"
    assert result.ack == hs.HandshakeAck(3, 1, [(0, 8)])
    again = table.add(cf)
    assert again.status is FragmentStatus.DUPLICATE and again.ack == result.ack
    err = hs.decode(hs.fragment_message(0x7F, RID, 0, b"\x01\x04\x00\x00", 1200)[0])
    result = table.add(err)
    assert result.status is FragmentStatus.COMPLETE and result.ack is None
    assert result.message == b"\x01\x04\x00\x00"
    ack = hs.decode(hs.HandshakeAck(1, 0, [(0, 5)]).to_record(RID))
    assert table.add(ack).status is FragmentStatus.COMPLETE
    assert len(table) == 0


def test_completed_messages_are_delivered_once() -> None:
    table = ReassemblyTable(2, max_completed=2)
    pieces = frags(bytes(range(200)), 139)
    assert [table.add(p).status for p in pieces] == [
        FragmentStatus.PARTIAL,
        FragmentStatus.COMPLETE,
    ]
    key = (RID, 2, 0)
    assert table.is_completed(key) and key not in table
    late = table.add(pieces[0])
    assert late.status is FragmentStatus.DUPLICATE
    assert late.ack is not None and late.ack.ranges == ((0, 200),)
    assert len(table) == 0  # no buffer was reopened for the late copy
    # A repeat that disagrees on the length is malformed.
    assert table.add(record(0, b"x" * 100, 300)).status is FragmentStatus.MALFORMED
    # Markers are bounded, oldest first, and go away with discard_rid.
    for seq in (1, 2):
        table.add(hs.HandshakeRecord(2, RID, seq, 0, 1, b"x"))
    assert not table.is_completed(key)
    assert table.is_completed((RID, 2, 2))
    table.discard_rid(RID)
    assert not table.is_completed((RID, 2, 2))


# --- Flight ------------------------------------------------------------------------------------


def test_flight_resends_only_unacked_records() -> None:
    message = bytes(range(256)) * 10
    flight = Flight.from_message(2, RID, 0, message, 539)  # 500-byte fragments
    assert len(flight.records) == 6
    assert (flight.msg_type, flight.msg_seq, flight.msg_length) == (2, 0, 2560)
    assert flight.rid == RID
    assert flight.total_bytes == 2560 + 6 * 39
    assert flight.records_to_resend() == list(flight.records)
    assert flight.records_to_resend([(0, 1000), (2000, 2560)]) == list(flight.records[2:4])
    # Touching ranges given by a caller are merged before the coverage test.
    assert flight.records_to_resend([(0, 700), (700, 1500)]) == list(flight.records[3:])
    assert flight.records_to_resend([(0, 2560)]) == []
    assert not flight.acknowledged

    assert not flight.on_ack(hs.HandshakeAck(2, 1, [(0, 2560)]))  # another message
    assert not flight.on_ack(hs.HandshakeAck(3, 0, [(0, 2560)]))
    assert flight.on_ack(hs.HandshakeAck(2, 0, [(0, 1000)]))
    assert flight.records_to_resend() == list(flight.records[2:])
    # The latest ack replaces the earlier one (the receiver may have dropped its state).
    assert flight.on_ack(hs.HandshakeAck(2, 0, [(1500, 2000)]))
    assert len(flight.records_to_resend()) == 5
    assert flight.on_ack(hs.HandshakeAck(2, 0, [(0, 2560)]))
    assert flight.acknowledged and flight.records_to_resend() == []


def test_flight_of_empty_message() -> None:
    flight = Flight.from_message(1, RID, 0, b"", 100)
    assert len(flight.records_to_resend()) == 1
    flight.on_ack(hs.HandshakeAck(1, 0, []))
    assert flight.acknowledged


def test_flight_refuses_bad_records() -> None:
    a = hs.fragment_message(2, RID, 0, bytes(100), 60)
    b = hs.fragment_message(2, RID, 1, bytes(100), 60)
    with pytest.raises(ConfigError):
        Flight([*a, *b])
    with pytest.raises(ConfigError):
        Flight([])
    with pytest.raises(ConfigError):
        Flight([b"garbage"])
    with pytest.raises(ConfigError):
        Flight([hs.HandshakeAck(2, 0, []).to_record(RID)])


# --- RetransmitTimer ---------------------------------------------------------------------------


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def run_to_give_up(timer: RetransmitTimer, now: float = 0.0) -> list[float]:
    """Fire the timer at each deadline until it gives up; return the delays it chose."""
    timer.start(now)
    delays: list[float] = []
    while True:
        deadline = timer.deadline
        assert deadline is not None
        delays.append(deadline - now)
        now = deadline
        if not timer.on_timeout(now):
            break
    assert timer.deadline is None and not timer.running
    return delays


def test_back_off_sequence_with_seeded_rng() -> None:
    timer = RetransmitTimer(random.Random(1234))
    delays = run_to_give_up(timer)
    bases = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(delays) == len(bases)  # start + 7 resends
    assert timer.attempts == 7
    for delay, base in zip(delays, bases, strict=True):
        assert 0.75 * base - 1e-9 <= delay <= min(1.25 * base, 8.0) + 1e-9
    # Same seed, same schedule: the randomness is only what was injected.
    assert run_to_give_up(RetransmitTimer(random.Random(1234))) == delays


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 10))
def test_jitter_bounds(seed: int, max_attempts: int) -> None:
    timer = RetransmitTimer(random.Random(seed), max_attempts=max_attempts, maximum=4.0)
    delays = run_to_give_up(timer)
    assert len(delays) == max_attempts + 1
    base = 0.25
    for delay in delays:
        assert 0.75 * base - 1e-9 <= delay <= min(1.25 * base, 4.0) + 1e-9
        base = min(base * 2, 4.0)


def test_jitter_extremes() -> None:
    low = run_to_give_up(RetransmitTimer(FixedRandom(0.0), max_attempts=6))
    assert low == pytest.approx([0.1875, 0.375, 0.75, 1.5, 3.0, 6.0, 6.0])
    high = run_to_give_up(RetransmitTimer(FixedRandom(0.999999), max_attempts=6))
    assert high == pytest.approx([0.3125, 0.625, 1.25, 2.5, 5.0, 8.0, 8.0], rel=1e-5)
    flat = run_to_give_up(RetransmitTimer(FixedRandom(0.9), jitter=0.0, max_attempts=2))
    assert flat == [0.25, 0.5, 1.0]


def test_timer_misuse_and_stop() -> None:
    timer = RetransmitTimer(FixedRandom(0.5), initial=1.0, max_attempts=0)
    with pytest.raises(StateError):
        timer.on_timeout(0.0)
    timer.start(10.0)
    assert timer.deadline == 11.0
    assert not timer.due(10.5) and timer.due(11.0)
    with pytest.raises(StateError):
        timer.on_timeout(10.5)
    assert timer.on_timeout(11.0) is False  # max_attempts=0: no resend at all
    timer.start(20.0)
    timer.stop()
    assert timer.deadline is None
    for kwargs in (
        {"initial": 0.0},
        {"initial": 2.0, "maximum": 1.0},
        {"max_attempts": -1},
        {"jitter": 1.0},
    ):
        with pytest.raises(ConfigError):
            RetransmitTimer(FixedRandom(0.5), **kwargs)


def test_slow_link_scaling() -> None:
    # A 3.3 KB ClientHello flight over 9600-baud 8N1 takes 3.4 s just to leave the UART.
    ser = serialization_time(3300, 9600)
    assert ser == pytest.approx(3.4375)
    assert link_rto_floor(3300, 9600) == pytest.approx(2 * ser)
    timer = RetransmitTimer(FixedRandom(0.0))  # lowest jitter draw
    timer.scale_for_link(3300, 9600)
    assert timer.floor == pytest.approx(2 * ser)
    timer.start(0.0)
    delays = []
    now = 0.0
    while timer.deadline is not None:
        delays.append(timer.deadline - now)
        now = timer.deadline
        timer.on_timeout(now)
    assert all(d >= 2 * ser - 1e-9 for d in delays)
    assert max(delays) <= 8.0  # the 8 s ceiling still holds when it is above the floor

    # A flight too big for the ceiling lifts the ceiling rather than firing mid-transmission.
    big = RetransmitTimer(FixedRandom(0.999))
    big.scale_for_link(16 * 1024, 9600)
    big.start(0.0)
    assert big.deadline is not None and big.deadline >= 2 * serialization_time(16384, 9600)

    # Fast links and unknown speeds change nothing.
    assert link_rto_floor(3300, None) == 0.0
    fast = RetransmitTimer(FixedRandom(0.0))
    fast.scale_for_link(3300, 1_000_000_000)
    fast.start(0.0)
    assert fast.deadline == pytest.approx(0.1875)
    with pytest.raises(ConfigError):
        serialization_time(10, 0)


# --- AmplificationLimiter ------------------------------------------------------------------------


def test_amplification_limit() -> None:
    lim = AmplificationLimiter()
    assert not lim.can_send(1)
    lim.on_received(1200)
    assert lim.can_send(3600) and not lim.can_send(3601)
    lim.on_sent(3000)
    assert lim.budget == 600
    assert lim.can_send(600) and not lim.can_send(601)
    lim.on_sent(600)
    assert not lim.can_send(1)
    lim.on_received(100)
    assert lim.can_send(300) and not lim.can_send(301)
    lim.validate()
    assert lim.validated and lim.budget is None
    assert lim.can_send(10**9)
    assert AmplificationLimiter(factor=1).can_send(0)
    with pytest.raises(ConfigError):
        AmplificationLimiter(factor=0)


# --- CookieIssuer --------------------------------------------------------------------------------

SECRET = bytes(range(32))
ADDR = ("192.0.2.7", 40000)


def test_cookie_valid_for_its_address_and_lifetime() -> None:
    issuer = CookieIssuer(SECRET, lifetime=30.0)
    cookie = issuer.make(ADDR, now=1000.0)
    assert len(cookie) == COOKIE_LEN
    assert issuer.check(cookie, ADDR, now=1000.0)
    assert issuer.check(bytearray(cookie), ADDR, now=1030.0)
    assert not issuer.check(cookie, ADDR, now=1030.002)  # expired
    assert not issuer.check(cookie, ADDR, now=999.0)  # from the future
    assert not issuer.check(cookie, ("192.0.2.8", 40000), now=1001.0)
    assert not issuer.check(cookie, ("192.0.2.7", 40001), now=1001.0)
    # The same peer spelled as an IPv4-mapped IPv6 address is the same address.
    assert issuer.check(cookie, ("::ffff:192.0.2.7", 40000, 0, 0), now=1001.0)
    assert not CookieIssuer(bytes(32)).check(cookie, ADDR, now=1001.0)


def test_cookie_skew_allowance() -> None:
    issuer = CookieIssuer(SECRET, max_skew=2.0)
    cookie = issuer.make(ADDR, now=100.0)
    assert issuer.check(cookie, ADDR, now=98.5)
    assert not issuer.check(cookie, ADDR, now=97.0)


def test_cookie_tampering_rejected() -> None:
    issuer = CookieIssuer(SECRET)
    cookie = issuer.make(ADDR, now=50.0)
    for i in range(len(cookie)):
        for bit in (0x01, 0x80):
            forged = bytearray(cookie)
            forged[i] ^= bit
            assert not issuer.check(bytes(forged), ADDR, now=55.0)
    for junk in (b"", cookie[:-1], cookie + b"\x00", bytes(COOKIE_LEN)):
        assert not issuer.check(junk, ADDR, now=55.0)
    assert not issuer.check("not bytes", ADDR, now=55.0)  # type: ignore[arg-type]


def test_cookie_rotation() -> None:
    issuer = CookieIssuer(SECRET)
    old = issuer.make(ADDR, now=10.0)
    issuer.rotate(bytes(range(1, 33)))
    new = issuer.make(ADDR, now=11.0)
    assert new != old
    assert issuer.check(old, ADDR, now=12.0)  # previous secret still honoured
    assert issuer.check(new, ADDR, now=12.0)
    issuer.rotate(bytes(range(2, 34)))
    assert not issuer.check(old, ADDR, now=13.0)  # two rotations ago: gone
    assert issuer.check(new, ADDR, now=13.0)


def test_cookie_addresses_and_config() -> None:
    issuer = CookieIssuer(SECRET)
    for addr in (("/dev/ttyUSB0",), ("2001:db8::1", 443, 0, 0), (b"\x01\x02", 7)):
        cookie = issuer.make(addr, now=1.0)
        assert issuer.check(cookie, addr, now=2.0)
    assert not issuer.check(issuer.make(("2001:db8::1", 443), 1.0), ("2001:db8::2", 443), 2.0)
    with pytest.raises(ConfigError):
        CookieIssuer(bytes(16))
    with pytest.raises(ConfigError):
        CookieIssuer(SECRET, lifetime=0)
    with pytest.raises(ConfigError):
        issuer.rotate(b"short")
    with pytest.raises(ConfigError):
        issuer.make(("192.0.2.1", 70000), 1.0)
    with pytest.raises(ConfigError):
        issuer.make((), 1.0)
