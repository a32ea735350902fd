# cython: language_level=3
"""Epoch state machine: which keys protect and open packets, and when they change.

Theory of operation (seed §3, event-transition tables, spec §11, PROFILE §6)
------------------------------------------------------------------------------
One ``EpochMachine`` per endpoint holds both halves of the epoch logic:

* The **receiver** is STEADY (only the current epoch's keys exist; key_phase must be 0) or
  TRANSITION (the next epoch is armed as well; both key phases are accepted). An authenticated
  CTRL_REKEY arms the next epoch (``arm_next_epoch``). The transition commits
  (``commit_epoch_transition``) after ``commit_threshold`` authenticated key_phase = 0 packets
  on the new epoch, or by time; commit erases the old keys.
* The **sender** is STEADY or TRANSITION (the seed's ``inTransition`` flag). ``install_next_epoch``
  moves it onto the armed epoch with seq = 0 and key_phase = 1; ``complete_transition`` returns
  key_phase to 0 on the same epoch.

Both halves step only through the tables ``_RX_TABLE`` and ``_TX_TABLE``; an event with no entry
raises :class:`EpochStateError` for a local call, and makes the record layer drop the packet for
a packet event. Nothing in a packet header can move the machine: a higher epoch_id is only ever
compared against keys that were armed by an authenticated control frame.

Timing (seed §3 "maxTransitionTime exceeded", docs/protocol.md §5 [profile, changed]):

* The transition clock starts when the epoch is armed, so TRANSITION is bounded from arming by
  ``transition_bound`` (T: ``max_transition_time``, which the session may stretch to a few
  round trips of its path, never shorten). What happens at the bound depends on the evidence: with packets
  on the new epoch including a key_phase = 0 one, commit at T; with packets on it but none with
  key_phase = 0 yet, commit at 2T; with none at all, an announcing side whose sender has not
  moved *abandons* the epoch (``abandon_next_epoch``: keys erased, STEADY on the old epoch, the
  same epoch may be armed again), because committing would retire keys for ones the peer lacks.
  A side whose sender already moved (the client) cannot go back; its session bounds the wait.
* Commit and key_phase are local decisions with local settings, so neither may depend on the
  peer sharing them. The sender clears key_phase as soon as it has authenticated a packet from
  the peer on its sending epoch (the peer has installed it too: key_phase = 0 opens there), and
  not on a local count or clock. The receiver counts only key_phase = 0 packets on the new epoch
  toward ``commit_threshold``: they prove the peer's sender finished its transition, so a
  commit cannot strand the peer's key_phase = 1 packets, whatever either side's threshold.
* Arming requires the sender to have installed the current epoch: one rekey completes on both
  halves before the next may begin, so at most two epochs ever hold keys.
"""

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from palisade_c.errors import ConfigError, EpochStateError
from palisade_c.keyschedule import (
    DIR_C2S,
    DIR_S2C,
    epoch0_secret,
    next_epoch_secret,
    traffic_iv,
    traffic_key,
    wipe,
)

from palisade_c.replay cimport ReplayWindow

# Spec §11.1: a rekey MUST start once seq reaches 2^40 - 2^30. The hard stop at 2^40 is this
# project's [profile] bound: far below 2^64 wrap, and the 2^30 margin leaves room to finish.
SEQ_REKEY_THRESHOLD = (1 << 40) - (1 << 30)
SEQ_HARD_LIMIT = 1 << 40
DEFAULT_COMMIT_THRESHOLD = 16
DEFAULT_MAX_TRANSITION_TIME = 2.0
MAX_EPOCH = 0xFFFFFFFE  # 0xFFFFFFFF is reserved for 0-RTT early data [spec]
EARLY_EPOCH = 0xFFFFFFFF

cdef double _NO_TIME = -1.0

RX_STATE_NAMES = ("STEADY", "TRANSITION")
TX_STATE_NAMES = ("STEADY", "TRANSITION")

# Receiver transition table: _RX_TABLE[state][event] = next state, -1 = not allowed.
cdef int _RX_TABLE[RX_N_STATES][RX_N_EVENTS]
#               ARM              COMMIT        PHASE0          PHASE1      ABANDON
_RX_TABLE[RX_STEADY][:] = [RX_TRANSITION, -1, RX_STEADY, -1, -1]
_RX_TABLE[RX_TRANSITION][:] = [-1, RX_STEADY, RX_TRANSITION, RX_TRANSITION, RX_STEADY]

# Sender transition table.
cdef int _TX_TABLE[TX_N_STATES][TX_N_EVENTS]
#                INSTALL          COMPLETE
_TX_TABLE[TX_STEADY][:] = [TX_TRANSITION, -1]
_TX_TABLE[TX_TRANSITION][:] = [-1, TX_STEADY]

_RX_EVENT_NAMES = ("arm_next_epoch", "commit_epoch_transition", "key_phase=0", "key_phase=1",
                   "abandon_next_epoch")
_TX_EVENT_NAMES = ("install_next_epoch", "complete_transition")


def rx_transition_table() -> dict:
    """The receiver table as ``{(state, event): next_state}`` (for tests and docs)."""
    return {
        (RX_STATE_NAMES[s], _RX_EVENT_NAMES[e]): RX_STATE_NAMES[_RX_TABLE[s][e]]
        for s in range(RX_N_STATES) for e in range(RX_N_EVENTS) if _RX_TABLE[s][e] >= 0
    }


def tx_transition_table() -> dict:
    return {
        (TX_STATE_NAMES[s], _TX_EVENT_NAMES[e]): TX_STATE_NAMES[_TX_TABLE[s][e]]
        for s in range(TX_N_STATES) for e in range(TX_N_EVENTS) if _TX_TABLE[s][e] >= 0
    }


@cython.final
cdef class TrafficKey:

    @staticmethod
    def derive(epoch_secret, bytes direction, uint32_t epoch, window_size=None):
        """Keys of ``direction`` for one epoch; a receive key gets a fresh replay window."""
        cdef TrafficKey k = TrafficKey.__new__(TrafficKey)
        cdef Py_ssize_t i
        k.epoch = epoch
        k.key = traffic_key(epoch_secret, direction)
        iv = traffic_iv(epoch_secret, direction)
        for i in range(12):
            k.iv[i] = iv[i]
        wipe(iv)
        k.aead = ChaCha20Poly1305(k.key)
        k.encrypt_into = k.aead.encrypt_into
        k.decrypt_into = k.aead.decrypt_into
        k.window = None if window_size is None else ReplayWindow(window_size)
        k.erased = False
        return k

    cdef void nonce(self, uint32_t epoch_id, uint64_t seq, uint8_t* out) noexcept:
        """nonce = iv XOR (epoch_id u32 ‖ seq u64), big-endian [spec §9.1]."""
        cdef int i
        for i in range(4):
            out[i] = self.iv[i] ^ <uint8_t>(epoch_id >> (24 - 8 * i))
        for i in range(8):
            out[4 + i] = self.iv[4 + i] ^ <uint8_t>(seq >> (56 - 8 * i))

    cdef void erase(self):
        """Overwrite our copy of the key and IV, and drop the cipher context holding its copy."""
        if self.erased:
            return
        wipe(self.key)
        memset(self.iv, 0, 12)
        self.aead = None
        self.encrypt_into = None
        self.decrypt_into = None
        if self.window is not None:
            self.window.clear()
        self.erased = True

    @property
    def key_buffer(self) -> bytearray:
        """The bytearray holding this key (tests use it to prove erasure)."""
        return self.key


@cython.final
cdef class EpochMachine:
    """Epoch keys and STEADY/TRANSITION state of one endpoint (both directions)."""

    def __init__(self, master_secret, bint is_client, *,
                 uint32_t replay_window=1024,
                 uint32_t commit_threshold=DEFAULT_COMMIT_THRESHOLD,
                 double max_transition_time=DEFAULT_MAX_TRANSITION_TIME,
                 bint early=False):
        """``early=True`` builds the 0-RTT machine: ``master_secret`` is then the early-data
        secret itself, the only epoch is 0xFFFFFFFF (it can never be rekeyed: arming refuses
        at MAX_EPOCH), and sequence numbers start at 1 [spec]."""
        if len(master_secret) != 32:
            raise ConfigError("master_secret must be 32 bytes")
        if commit_threshold < 1 or commit_threshold > 1_000_000:
            raise ConfigError("commit_threshold must be 1..1000000")
        if not (0.0 < max_transition_time <= 3600.0):
            raise ConfigError("max_transition_time must be in (0, 3600] seconds; never unbounded")
        ReplayWindow(replay_window)  # validates the size with a clear error
        self.replay_window = replay_window
        self.commit_threshold = commit_threshold
        self.max_transition_time = max_transition_time
        self.transition_bound = max_transition_time
        self._tx_dir = DIR_C2S if is_client else DIR_S2C
        self._rx_dir = DIR_S2C if is_client else DIR_C2S
        cdef uint32_t first_epoch = EARLY_EPOCH if early else 0
        self.early = early
        self._secret = bytearray(master_secret) if early else epoch0_secret(master_secret)
        self.rx_cur = TrafficKey.derive(self._secret, self._rx_dir, first_epoch, replay_window)
        self.tx_cur = TrafficKey.derive(self._secret, self._tx_dir, first_epoch)
        self.rx_next = None
        self.tx_pending = None
        self.rx_state = RX_STEADY
        self.tx_state = TX_STEADY
        self.tx_seq = 1 if early else 0
        self.packets_on_next = 0
        self._first_next_at = _NO_TIME
        self._armed_at = _NO_TIME
        self._phase0_on_next = 0
        self._secret_ahead = False
        self.abandons = 0
        self._tx_installed_at = _NO_TIME
        self.next_epoch_seen = False

    # -- table steps -----------------------------------------------------------------------

    cdef int _rx_step(self, int event) except -2:
        """Apply a receiver event; returns the new state or -1 if the table has no entry."""
        cdef int nxt = _RX_TABLE[self.rx_state][event]
        if nxt >= 0:
            self.rx_state = nxt
        return nxt

    cdef int _tx_step(self, int event) except -2:
        cdef int nxt = _TX_TABLE[self.tx_state][event]
        if nxt >= 0:
            self.tx_state = nxt
        return nxt

    # -- named operations (seed §3) ----------------------------------------------------------

    def arm_next_epoch(self, now=None, expected_epoch=None) -> int:
        """ArmNextEpoch: derive epoch N+1 for both directions; receiver STEADY -> TRANSITION.

        Call only for an *authenticated* CTRL_REKEY (or when announcing one). Returns N+1.
        The transition clock starts at ``now`` (module docstring); without a time the
        transition has no time bound, only the packet criterion.
        """
        cdef uint32_t nxt_epoch
        if _RX_TABLE[self.rx_state][RX_EV_ARM] < 0:
            raise EpochStateError("arm_next_epoch: already in TRANSITION")
        if (self.tx_pending is not None or self.tx_cur.epoch != self.rx_cur.epoch
                or self.tx_state != TX_STEADY):
            # Checked before anything changes, so a refusal leaves the machine as it was.
            raise EpochStateError(
                "arm_next_epoch: the sender has not finished moving to the current epoch")
        if self.rx_cur.epoch >= MAX_EPOCH:
            raise EpochStateError("epoch space exhausted (or 0-RTT keys, which never rekey)")
        nxt_epoch = self.rx_cur.epoch + 1
        if expected_epoch is not None and expected_epoch != nxt_epoch:
            raise EpochStateError(f"next epoch must be {nxt_epoch}, not {expected_epoch}")
        if self._secret_ahead:
            # Arming this epoch again after an abandoned attempt: its secret is already held.
            new_secret = self._secret
        else:
            new_secret = next_epoch_secret(self._secret)
        self.rx_next = TrafficKey.derive(new_secret, self._rx_dir, nxt_epoch, self.replay_window)
        self.tx_pending = TrafficKey.derive(new_secret, self._tx_dir, nxt_epoch)
        if not self._secret_ahead:
            # Both directions of epoch N are derived already; its secret has no further use.
            wipe(self._secret)
            self._secret = new_secret
        self._secret_ahead = False
        self.packets_on_next = 0
        self._phase0_on_next = 0
        self._first_next_at = _NO_TIME
        self._armed_at = _NO_TIME if now is None else now
        self.next_epoch_seen = False
        self._rx_step(RX_EV_ARM)
        return nxt_epoch

    def abandon_next_epoch(self) -> int:
        """AbandonNextEpoch [profile]: give up an armed epoch the peer never showed it has.

        Only while nothing authenticated on it and the sender has not moved to it. The keys
        are erased and the receiver is STEADY on the current epoch again; the epoch's secret is
        kept, so the same epoch can be armed again (it has never protected a packet that was
        accepted). Returns the current epoch."""
        if _RX_TABLE[self.rx_state][RX_EV_ABANDON] < 0:
            raise EpochStateError("abandon_next_epoch: not in TRANSITION")
        if self.next_epoch_seen or self.tx_pending is None:
            raise EpochStateError("abandon_next_epoch: the peer is already on the next epoch")
        self._abandon()
        return self.rx_cur.epoch

    cdef void _abandon(self):
        self.rx_next.erase()
        self.tx_pending.erase()
        self.rx_next = None
        self.tx_pending = None
        self._secret_ahead = True
        self.packets_on_next = 0
        self._phase0_on_next = 0
        self._first_next_at = _NO_TIME
        self._armed_at = _NO_TIME
        self.abandons += 1
        self._rx_step(RX_EV_ABANDON)

    def install_next_epoch(self, now=None) -> int:
        """InstallEpoch: the sender moves to the armed epoch, seq = 0, key_phase = 1."""
        if _TX_TABLE[self.tx_state][TX_EV_INSTALL] < 0:
            raise EpochStateError("install_next_epoch: sender already in transition")
        if self.tx_pending is None:
            raise EpochStateError("install_next_epoch: no epoch is armed")
        self.tx_cur.erase()
        self.tx_cur = self.tx_pending
        self.tx_pending = None
        self.tx_seq = 0
        self._tx_installed_at = _NO_TIME if now is None else now
        self._tx_step(TX_EV_INSTALL)
        if self.next_epoch_seen or self.rx_cur.epoch == self.tx_cur.epoch:
            # The peer is already sending on this epoch: it has installed it, so key_phase 0
            # opens there whatever its receiver's state. No hint is needed (module docstring).
            self._tx_step(TX_EV_COMPLETE)
        return self.tx_cur.epoch

    def commit_epoch_transition(self) -> int:
        """CommitEpochTransition: receiver TRANSITION -> STEADY; the old epoch's keys are erased."""
        if _RX_TABLE[self.rx_state][RX_EV_COMMIT] < 0:
            raise EpochStateError("commit_epoch_transition: not in TRANSITION")
        self._commit()
        return self.rx_cur.epoch

    def complete_transition(self) -> int:
        """CompleteTransition: the sender returns to key_phase = 0 on its current epoch."""
        if _TX_TABLE[self.tx_state][TX_EV_COMPLETE] < 0:
            raise EpochStateError("complete_transition: sender not in transition")
        self._tx_step(TX_EV_COMPLETE)
        return self.tx_cur.epoch

    cdef void _commit(self):
        self.rx_cur.erase()
        self.rx_cur = self.rx_next
        self.rx_next = None
        self.packets_on_next = 0
        self._phase0_on_next = 0
        self._first_next_at = _NO_TIME
        self._armed_at = _NO_TIME
        self._rx_step(RX_EV_COMMIT)

    cdef double _rx_deadline(self):
        """When poll() acts on the receiver's TRANSITION by time, or -1 (module docstring)."""
        if self.rx_state != RX_TRANSITION or self._armed_at < 0:
            return _NO_TIME
        if self.next_epoch_seen:
            if self._phase0_on_next > 0:
                return self._armed_at + self.transition_bound
            return self._armed_at + 2 * self.transition_bound
        if self.tx_pending is not None:
            return self._armed_at + self.transition_bound  # abandon
        return _NO_TIME  # our sender moved already: the session bounds the wait

    # -- per-packet hooks used by the record layer ---------------------------------------------

    cdef TrafficKey rx_key(self, int key_phase, uint32_t epoch_id, int attempt):
        """Key for decryption attempt 0 (the indicated phase) or 1 (the other), or None.

        The epoch_id recovered from the protected header must match the key's epoch, so a key
        that cannot possibly open the packet is skipped without spending an AEAD attempt.
        """
        cdef TrafficKey k
        cdef int phase = key_phase if attempt == 0 else 1 - key_phase
        if self.rx_state == RX_STEADY:
            if attempt != 0 or key_phase != 0:
                return None
            k = self.rx_cur
        else:
            k = self.rx_cur if phase == 0 else self.rx_next
        if k.epoch != epoch_id:
            return None
        return k

    cdef int on_authenticated(self, TrafficKey key, uint64_t seq, double now,
                              int key_phase) except -1:
        """A packet opened under ``key``: mark replay, count toward commit, commit if due."""
        key.window.mark(seq)
        if key is self.rx_next:
            self.packets_on_next += 1
            self.next_epoch_seen = True
            if self._first_next_at < 0:
                self._first_next_at = now
            if key_phase == 0:
                # The peer's sender has finished its transition: only such packets count.
                self._phase0_on_next += 1
                if self._phase0_on_next >= self.commit_threshold:
                    self._commit()
        if self.tx_state == TX_TRANSITION and key.epoch == self.tx_cur.epoch:
            # The peer sends on our sending epoch: it installed it, so our hint has done its
            # job (module docstring).
            self._tx_step(TX_EV_COMPLETE)
        return 0

    cdef int on_sent(self, double now) except -1:
        self.tx_seq += 1
        return 0

    cdef int poll(self, double now, bint may_abandon) except -1:
        """Apply the time-based criteria (opportunistically, and from handle_timer).

        ``may_abandon`` is False on the receive path, which polls before it tries to open a
        packet: that packet may be the very evidence that saves the epoch."""
        cdef double t
        if now < 0:
            return 0
        # Compare against the same sums get_timer() reports, so a shell that wakes exactly at
        # the reported deadline always finds the work due (no float rounding gap).
        t = self._rx_deadline()
        if t >= 0 and now >= t:
            if self.next_epoch_seen:
                self._commit()
            elif may_abandon:
                self._abandon()
        return 0

    def erase_all(self) -> None:
        """Erase every key and secret (session end or abort). The machine is unusable after."""
        for k in (self.rx_cur, self.rx_next, self.tx_cur, self.tx_pending):
            if k is not None:
                (<TrafficKey>k).erase()
        wipe(self._secret)

    @property
    def erased(self) -> bool:
        return self.rx_cur.erased and self.tx_cur.erased

    # -- Python-visible state ------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """Earliest time at which ``handle_timer`` has something to do, or None."""
        cdef double t = self._rx_deadline()
        return None if t < 0 else t

    def handle_timer(self, double now) -> None:
        self.poll(now, True)

    def rebase(self, double old, double new) -> None:
        """Move the clocks that were started at ``old`` (a stale time an application call
        used) to ``new``, the first fresh time seen since."""
        if self._armed_at == old:
            self._armed_at = new
        if self._first_next_at == old:
            self._first_next_at = new
        if self._tx_installed_at == old:
            self._tx_installed_at = new

    @property
    def next_phase0_seen(self) -> bool:
        """A key_phase = 0 packet authenticated on the armed epoch (the peer's sender is done)."""
        return self._phase0_on_next > 0

    @property
    def rx_state_name(self) -> str:
        return RX_STATE_NAMES[self.rx_state]

    @property
    def tx_state_name(self) -> str:
        return TX_STATE_NAMES[self.tx_state]

    @property
    def epoch(self) -> int:
        """The receiver's current (committed) epoch."""
        return self.rx_cur.epoch

    @property
    def next_epoch(self) -> int | None:
        return None if self.rx_next is None else self.rx_next.epoch

    @property
    def send_epoch(self) -> int:
        return self.tx_cur.epoch

    @property
    def key_phase(self) -> int:
        """The key_phase bit the sender puts on its next packet."""
        return 1 if self.tx_state == TX_TRANSITION else 0

    @property
    def install_pending(self) -> bool:
        """True while an armed epoch waits for ``install_next_epoch`` on the sender."""
        return self.tx_pending is not None

    @property
    def needs_rekey(self) -> bool:
        """The sender reached the spec's mandatory rekey threshold (2^40 - 2^30)."""
        return self.tx_seq >= SEQ_REKEY_THRESHOLD

    def key_buffers(self) -> dict:
        """Live key buffers by role, for tests that prove erasure. Never log these."""
        out = {"rx_cur": self.rx_cur.key, "tx_cur": self.tx_cur.key}
        if self.rx_next is not None:
            out["rx_next"] = self.rx_next.key
        if self.tx_pending is not None:
            out["tx_pending"] = self.tx_pending.key
        return out

    def _debug_set_tx_seq(self, uint64_t seq) -> None:
        """Test hook: jump the send sequence (to exercise the exhaustion limits)."""
        self.tx_seq = seq
