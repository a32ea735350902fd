# cython: language_level=3
"""Sliding anti-replay window over 64-bit sequence numbers (anti-replay appendix, PROFILE §4).

Theory of operation
-------------------
The window remembers which of the last ``size`` sequence numbers below the highest accepted one
(``top``) have been seen. Bits live in a ring of ``ceil(size/64) + 1`` 64-bit words indexed by
``seq mod (64 * nwords)``. The spare word is what lets the window slide by whole words: when
``top`` advances, only the words that now belong to sequence numbers above the old ``top`` are
cleared, and every bit still inside the window stays where it was. Sliding therefore costs at
most ``nwords`` word writes however far ``top`` jumps.

Checking and marking are separate on purpose: the record layer checks before it decrypts (cheap
rejection of replays) and marks only after the AEAD has authenticated the packet, so a forged
packet can never poison the window [spec, anti-replay appendix].
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memset

from palisade_c.errors import ConfigError


cdef class ReplayWindow:
    """Replay window of ``size`` packets (64..4096, default 1024)."""

    def __cinit__(self, uint32_t size=REPLAY_DEFAULT_SIZE):
        if size < REPLAY_MIN_SIZE or size > REPLAY_MAX_SIZE:
            raise ConfigError(
                f"replay window must be {REPLAY_MIN_SIZE}..{REPLAY_MAX_SIZE} packets, got {size}"
            )
        self.size = size
        self._nwords = (size + 63) // 64 + 1
        self.clear()

    cdef void clear(self) noexcept:
        memset(self._bits, 0, sizeof(self._bits))
        self._top = 0
        self._empty = True

    cdef bint check(self, uint64_t seq) noexcept:
        """True when ``seq`` is new and inside the window; marks nothing."""
        cdef uint64_t ring_bits, idx
        if self._empty or seq > self._top:
            return True
        if self._top - seq >= self.size:
            return False  # too old to judge: treat as a replay
        ring_bits = <uint64_t>self._nwords * 64
        idx = seq % ring_bits
        return not (self._bits[idx >> 6] >> (idx & 63)) & 1

    cdef void mark(self, uint64_t seq) noexcept:
        """Record ``seq`` as seen. Call only after ``check`` passed and the AEAD accepted."""
        cdef uint64_t ring_bits = <uint64_t>self._nwords * 64
        cdef uint64_t idx, word, top_word, new_word, steps, i
        if self._empty:
            self._empty = False
            self._top = seq
        elif seq > self._top:
            top_word = self._top >> 6
            new_word = seq >> 6
            steps = new_word - top_word
            if steps > self._nwords:
                steps = self._nwords
            # Clear the words that now hold numbers above the old top.
            i = 1
            while i <= steps:
                self._bits[(top_word + i) % self._nwords] = 0
                i += 1
            self._top = seq
        idx = seq % ring_bits
        self._bits[idx >> 6] |= (<uint64_t>1) << (idx & 63)

    # -- Python-visible wrappers for tests and tools ------------------------------------------

    @property
    def top(self) -> int | None:
        """Highest sequence number marked so far, or None before the first."""
        return None if self._empty else self._top

    def would_accept(self, seq: int) -> bool:
        return self.check(seq)

    def mark_seen(self, seq: int) -> None:
        self.mark(seq)

    def accept(self, seq: int) -> bool:
        """Check and, if new, mark in one step (for callers without an AEAD in between)."""
        if not self.check(seq):
            return False
        self.mark(seq)
        return True

    def reset(self) -> None:
        self.clear()
