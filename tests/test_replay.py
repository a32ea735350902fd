"""Tests of the sliding anti-replay window (palisade_c.replay, PROFILE §4, anti-replay appendix).

Every behavioural test compares the compiled window against a reference model that is obviously
correct because it is not clever: the set of every sequence number ever marked, plus the highest
one. A sequence number is acceptable iff it has not been seen and (nothing has been seen yet, or
it is above the top, or it is less than ``size`` below the top).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from palisade_c.errors import ConfigError, PalisadeError
from palisade_c.replay import ReplayWindow

U64_MAX = (1 << 64) - 1
SIZES_OK = [64, 65, 100, 127, 128, 129, 191, 192, 255, 256, 1000, 1023, 1024, 1025, 4095, 4096]
SIZES_BAD = [0, 1, 32, 63, 4097, 8192, 65536, (1 << 32) - 1]

def fast(max_examples: int) -> settings:
    """Deterministic, database-free hypothesis settings."""
    return settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class ModelWindow:
    """Reference model: a set of seen sequence numbers and the highest one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.top: int | None = None

    def acceptable(self, seq: int) -> bool:
        if seq in self.seen:
            return False
        return self.top is None or seq > self.top or self.top - seq < self.size

    def mark(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = seq if self.top is None else max(self.top, seq)

    def accept(self, seq: int) -> bool:
        if not self.acceptable(seq):
            return False
        self.mark(seq)
        return True


def _ring_bits(size: int) -> int:
    """Size of the implementation's bit ring (replay.pyx docstring); used to aim at aliasing."""
    return ((size + 63) // 64 + 1) * 64


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES_OK)
def test_sizes_in_range_are_accepted(size: int) -> None:
    w = ReplayWindow(size)
    assert w.size == size
    assert w.top is None


@pytest.mark.parametrize("size", SIZES_BAD)
def test_sizes_out_of_range_raise_config_error(size: int) -> None:
    with pytest.raises(ConfigError):
        ReplayWindow(size)


def test_config_error_is_a_palisade_value_error() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(63)
    with pytest.raises(PalisadeError):
        ReplayWindow(4097)


def test_default_size_is_1024() -> None:
    assert ReplayWindow().size == 1024


def test_negative_size_is_rejected() -> None:
    with pytest.raises((ConfigError, OverflowError)):
        ReplayWindow(-1)


# ----------------------------------------------------------------------------------------------
# Basic behaviour
# ----------------------------------------------------------------------------------------------


def test_empty_window_accepts_anything() -> None:
    w = ReplayWindow(64)
    for seq in (0, 1, 63, 64, 1 << 40, U64_MAX):
        assert w.would_accept(seq)
    assert w.top is None


def test_check_does_not_mark() -> None:
    w = ReplayWindow(64)
    assert w.would_accept(5)
    assert w.would_accept(5)
    assert w.top is None
    assert w.accept(5)
    assert not w.would_accept(5)
    assert not w.accept(5)
    assert w.top == 5


def test_mark_seen_then_check() -> None:
    w = ReplayWindow(128)
    w.mark_seen(10)
    assert w.top == 10
    assert not w.would_accept(10)
    assert w.would_accept(9)
    assert w.would_accept(11)


@pytest.mark.parametrize("size", [64, 100, 1024, 4096])
def test_window_edge_exactly(size: int) -> None:
    top = 10_000
    w = ReplayWindow(size)
    assert w.accept(top)
    assert w.would_accept(top - size + 1)  # the oldest number still inside the window
    assert not w.would_accept(top - size)  # one further back is too old
    assert w.accept(top - size + 1)
    assert not w.accept(top - size + 1)


@pytest.mark.parametrize("size", [64, 100, 1024, 4096])
def test_every_seq_in_window_accepted_once_in_reverse(size: int) -> None:
    w = ReplayWindow(size)
    top = 5 * size + 17
    assert w.accept(top)
    for seq in range(top - 1, top - size, -1):
        assert w.accept(seq), seq
    for seq in range(top - size - 5, top + 1):
        assert not w.would_accept(seq), seq
    assert w.would_accept(top + 1)


def test_reset_forgets_everything() -> None:
    w = ReplayWindow(64)
    for seq in range(100):
        w.accept(seq)
    w.reset()
    assert w.top is None
    for seq in range(100):
        assert w.would_accept(seq)


# ----------------------------------------------------------------------------------------------
# Big jumps and aliasing in the ring
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 65, 100, 1024, 4096])
@pytest.mark.parametrize("jump", [1, 63, 64, 65, 127, 128, 1000, 4160, 1 << 20, 1 << 40])
def test_big_jump_forgets_only_what_left_the_window(size: int, jump: int) -> None:
    w = ReplayWindow(size)
    m = ModelWindow(size)
    base = 3 * size + 5
    for seq in range(base - size + 1, base + 1):
        assert w.accept(seq) == m.accept(seq)
    new_top = base + jump
    assert w.accept(new_top) == m.accept(new_top)
    for seq in range(max(0, base - size - 10), base + 1):
        assert w.would_accept(seq) == m.acceptable(seq), seq
    for seq in range(max(0, new_top - size - 70), new_top + 70):
        assert w.would_accept(seq) == m.acceptable(seq), seq


@pytest.mark.parametrize("size", [64, 65, 100, 128, 1000, 1024, 4096])
def test_ring_aliases_do_not_leak(size: int) -> None:
    """Numbers that share a ring slot (seq and seq + ring) must not see each other's bits."""
    ring = _ring_bits(size)
    w = ReplayWindow(size)
    m = ModelWindow(size)
    # Fill the window densely, then step the top forward by amounts around the ring size.
    for seq in range(0, size):
        assert w.accept(seq) == m.accept(seq)
    for step in (ring - 64, ring - 1, ring, ring + 1, ring + 63, 2 * ring, size, size + 1):
        new_top = m.top + step  # type: ignore[operator]
        for seq in range(new_top - size + 1, new_top + 1, 3):
            assert w.would_accept(seq) == m.acceptable(seq), (step, seq)
        assert w.accept(new_top) == m.accept(new_top)
        for seq in range(new_top - size - 3, new_top + 3):
            assert w.would_accept(seq) == m.acceptable(seq), (step, seq)


# ----------------------------------------------------------------------------------------------
# u64 extremes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 100, 1024, 4096])
def test_u64_max_as_top(size: int) -> None:
    w = ReplayWindow(size)
    assert w.accept(U64_MAX)
    assert w.top == U64_MAX
    assert not w.would_accept(U64_MAX)
    assert w.would_accept(U64_MAX - 1)
    assert w.would_accept(U64_MAX - size + 1)
    assert not w.would_accept(U64_MAX - size)
    assert not w.would_accept(0)
    for seq in range(U64_MAX - size + 1, U64_MAX):
        assert w.accept(seq)
    for seq in range(U64_MAX - size - 3, U64_MAX + 1):
        assert not w.would_accept(seq)


@pytest.mark.parametrize("size", [64, 100, 4096])
def test_walk_up_to_u64_max(size: int) -> None:
    w = ReplayWindow(size)
    m = ModelWindow(size)
    for seq in range(U64_MAX - 3 * size, U64_MAX + 1):
        assert w.accept(seq) == m.accept(seq) is True
    for seq in range(U64_MAX - 4 * size, U64_MAX + 1):
        assert w.would_accept(seq) == m.acceptable(seq)


def test_jump_from_zero_to_u64_max_and_back() -> None:
    w = ReplayWindow(64)
    assert w.accept(0)
    assert w.accept(U64_MAX)
    assert not w.would_accept(0)
    assert not w.would_accept(1)
    assert w.would_accept(U64_MAX - 63)
    assert not w.would_accept(U64_MAX - 64)


def test_out_of_u64_range_is_a_local_error() -> None:
    w = ReplayWindow(64)
    with pytest.raises(OverflowError):
        w.would_accept(U64_MAX + 1)
    with pytest.raises(OverflowError):
        w.would_accept(-1)


# ----------------------------------------------------------------------------------------------
# Property tests against the model
# ----------------------------------------------------------------------------------------------


_delta = st.one_of(
    st.integers(-70, 70),                       # around the top
    st.integers(-4200, 0),                      # anywhere in (and just beyond) the window
    st.integers(0, 300),                        # small advances
    st.integers(0, 10_000),                     # jumps over several words / whole ring
    st.sampled_from([1 << 20, 1 << 40, 1 << 63]),  # huge jumps
)
_op = st.tuples(st.sampled_from(["accept", "check", "check_then_mark", "check_only"]), _delta)


@fast(400)
@given(
    size=st.one_of(st.sampled_from([64, 65, 100, 127, 128, 1024, 4096]), st.integers(64, 4096)),
    base=st.sampled_from([0, 1000, 1 << 32, (1 << 63) + 12345, U64_MAX - 20_000, U64_MAX - 100]),
    ops=st.lists(_op, min_size=1, max_size=120),
)
def test_window_matches_model(size: int, base: int, ops: list[tuple[str, int]]) -> None:
    w = ReplayWindow(size)
    m = ModelWindow(size)
    for kind, delta in ops:
        anchor = base if m.top is None else m.top
        seq = min(max(anchor + delta, 0), U64_MAX)
        expected = m.acceptable(seq)
        if kind == "accept":
            assert w.accept(seq) == expected, (seq, m.top)
            if expected:
                m.mark(seq)
        elif kind == "check_then_mark":  # what the record layer does after the AEAD accepted
            assert w.would_accept(seq) == expected, (seq, m.top)
            if expected:
                w.mark_seen(seq)
                m.mark(seq)
        else:  # check only: a forged packet checked but never marked
            assert w.would_accept(seq) == expected, (seq, m.top)
        assert w.top == m.top
    # Final sweep of the whole window and its surroundings.
    if m.top is not None:
        lo = max(0, m.top - size - 70)
        hi = min(U64_MAX, m.top + 70)
        for seq in range(lo, hi + 1):
            assert w.would_accept(seq) == m.acceptable(seq), seq


class ReplayMachine(RuleBasedStateMachine):
    """Stateful version: the same model, driven by hypothesis' rule scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.w: ReplayWindow
        self.m: ModelWindow

    @initialize(size=st.sampled_from([64, 65, 100, 128, 200, 1024]),
                base=st.sampled_from([0, 77, 1 << 40, U64_MAX - 5000]))
    def setup(self, size: int, base: int) -> None:
        self.w = ReplayWindow(size)
        self.m = ModelWindow(size)
        self.base = base

    def _seq(self, delta: int) -> int:
        anchor = self.base if self.m.top is None else self.m.top
        return min(max(anchor + delta, 0), U64_MAX)

    @rule(delta=st.integers(-300, 5))
    def accept_near(self, delta: int) -> None:
        seq = self._seq(delta)
        assert self.w.accept(seq) == self.m.accept(seq)

    @rule(delta=st.integers(1, 3000))
    def advance(self, delta: int) -> None:
        seq = self._seq(delta)
        assert self.w.accept(seq) == self.m.accept(seq)

    @rule(delta=st.integers(-1200, 100))
    def check(self, delta: int) -> None:
        seq = self._seq(delta)
        assert self.w.would_accept(seq) == self.m.acceptable(seq)

    @precondition(lambda self: self.m.top is not None)
    @rule(back=st.integers(0, 2000))
    def replay_something_seen(self, back: int) -> None:
        seen = sorted(self.m.seen)
        seq = seen[-1 - (back % len(seen))]
        assert not self.w.would_accept(seq)
        assert not self.w.accept(seq)

    @invariant()
    def same_top(self) -> None:
        if hasattr(self, "m"):
            assert self.w.top == self.m.top


TestReplayMachine = ReplayMachine.TestCase
TestReplayMachine.settings = settings(
    max_examples=60, stateful_step_count=60, derandomize=True, deadline=None, database=None
)


@pytest.mark.parametrize("size", [64, 65, 100, 1024, 4096])
def test_long_random_walk_against_model(size: int) -> None:
    """A long seeded walk (forward drift, reordering, duplicates, jumps) against the model."""
    rng = random.Random(size * 7919)
    w = ReplayWindow(size)
    m = ModelWindow(size)
    nxt = 0
    for _ in range(6000):
        r = rng.random()
        if r < 0.55:
            seq = nxt
            nxt += 1
        elif r < 0.80:
            seq = max(0, nxt - rng.randint(1, size + 40))  # reordered or too old
        elif r < 0.95:
            seq = max(0, nxt - rng.randint(1, 8))  # duplicates of recent packets
        else:
            nxt += rng.choice([64, 65, size, size + 1, _ring_bits(size), rng.randint(1, 5000)])
            seq = nxt
        expected = m.acceptable(seq)
        assert w.would_accept(seq) == expected, seq
        if expected and rng.random() < 0.9:  # 10%: checked but "failed the AEAD": not marked
            w.mark_seen(seq)
            m.mark(seq)
        assert w.top == m.top
