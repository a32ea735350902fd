from libc.stdint cimport uint8_t, uint32_t, uint64_t

from palisade_c.replay cimport ReplayWindow

cdef enum:  # receiver states
    RX_STEADY = 0
    RX_TRANSITION = 1
    RX_N_STATES = 2

cdef enum:  # receiver events
    RX_EV_ARM = 0           # authenticated CTRL_REKEY -> ArmNextEpoch()
    RX_EV_COMMIT = 1        # threshold, timeout or explicit -> CommitEpochTransition()
    RX_EV_PACKET_PHASE0 = 2 # packet with key_phase = 0
    RX_EV_PACKET_PHASE1 = 3 # packet with key_phase = 1
    RX_EV_ABANDON = 4       # no evidence within max_transition_time -> AbandonNextEpoch()
    RX_N_EVENTS = 5

cdef enum:  # sender states
    TX_STEADY = 0
    TX_TRANSITION = 1       # the seed's inTransition = true
    TX_N_STATES = 2

cdef enum:  # sender events
    TX_EV_INSTALL = 0       # InstallEpoch()
    TX_EV_COMPLETE = 1      # CompleteTransition()
    TX_N_EVENTS = 2


cdef class TrafficKey:
    """AEAD key, IV and (receive side) replay window of one epoch in one direction."""
    cdef readonly uint32_t epoch
    cdef object aead
    cdef object encrypt_into
    cdef object decrypt_into
    cdef uint8_t iv[12]
    cdef bytearray key
    cdef ReplayWindow window
    cdef readonly bint erased

    cdef void nonce(self, uint32_t epoch_id, uint64_t seq, uint8_t* out) noexcept
    cdef void erase(self)


cdef class EpochMachine:
    cdef readonly int rx_state
    cdef readonly int tx_state
    cdef TrafficKey rx_cur
    cdef TrafficKey rx_next
    cdef TrafficKey tx_cur
    cdef TrafficKey tx_pending
    cdef bytearray _secret
    cdef bytes _tx_dir
    cdef bytes _rx_dir
    cdef readonly uint32_t commit_threshold
    cdef readonly double max_transition_time
    cdef public double transition_bound    # max_transition_time, or more on a long path
    cdef readonly uint32_t replay_window
    cdef readonly uint64_t tx_seq
    cdef readonly uint32_t packets_on_next
    cdef double _first_next_at
    cdef double _armed_at
    cdef uint32_t _phase0_on_next
    cdef bint _secret_ahead
    cdef readonly uint32_t abandons
    cdef double _tx_installed_at
    cdef readonly bint next_epoch_seen
    cdef readonly bint early

    cdef int _rx_step(self, int event) except -2
    cdef int _tx_step(self, int event) except -2
    cdef void _commit(self)
    cdef void _abandon(self)
    cdef double _rx_deadline(self)
    cdef TrafficKey rx_key(self, int key_phase, uint32_t epoch_id, int attempt)
    cdef int on_authenticated(self, TrafficKey key, uint64_t seq, double now,
                              int key_phase) except -1
    cdef int on_sent(self, double now) except -1
    cdef int poll(self, double now, bint may_abandon) except -1
