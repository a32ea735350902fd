# Declarations of one PALISADE session (connection.pyx), for other compiled modules to cimport.

# Not final: Connection stays subclassable from Python, as it was as a plain class.
from palisade_c.fsm cimport StateMachine
from palisade_c.frames cimport ControlFrame
from palisade_c.hsrecord cimport HandshakeRecord
from palisade_c.reassembly cimport AmplificationLimiter, Flight, ReassemblyTable, RetransmitTimer
from palisade_c.record cimport Record, RecordLayer


cdef class EarlyBufferPool:
    cdef readonly Py_ssize_t limit
    cdef readonly Py_ssize_t used
    cdef readonly Py_ssize_t refused


cdef class Connection:
    # An instance __dict__, as the plain class had: tests wrap a session's _seal on the instance
    # (cpdef methods look such an override up), and applications may tag sessions.
    cdef dict __dict__
    cdef object __weakref__

    cdef readonly object config
    cdef readonly bint is_client
    cdef readonly str name
    cdef public object on_wakeup
    cdef StateMachine _fsm
    cdef object _event_log
    cdef object _rand
    cdef double _now
    cdef readonly int _stale_mask           # deadlines armed from a stale _now (_STALE_*)
    cdef list _out                          # (datagram, addr) pairs not yet collected
    cdef object _events                     # deque of Event
    cdef public object peer_addr
    cdef readonly bytes rid
    cdef bytes _hello_rid
    cdef readonly RecordLayer record
    cdef readonly str peer_fingerprint
    cdef readonly int plus_features
    cdef readonly bytearray resumption_secret
    cdef object _client_hs
    cdef object _server_hs
    # PALISADE-PLUS: resumption, 0-RTT and migration.
    cdef object _tickets
    cdef object _resume_hs
    cdef object _server_resume_hs
    cdef readonly RecordLayer _early        # 0-RTT keys (client seals, server opens)
    cdef long long _early_budget
    cdef long long _early_bytes
    cdef readonly bint resumed
    cdef object _candidate
    cdef Py_ssize_t _candidate_count
    cdef double _candidate_since
    cdef AmplificationLimiter _candidate_amp
    cdef bytes _path_challenge
    cdef dict _migrate_nonces               # nonce -> None, oldest first (FIFO)
    # Handshake delivery. An optional time is a double plus a flag (False: None).
    cdef ReassemblyTable _reasm
    cdef Flight _flight
    cdef RetransmitTimer _flight_timer
    cdef bint _has_hs_deadline
    cdef double _hs_deadline
    cdef double _flight_sent_at
    cdef bint _retried
    cdef tuple _pending_ack                 # reassembly key, or None
    cdef bint _has_ack_deadline
    cdef double _ack_deadline
    cdef double _ack_delay
    cdef readonly AmplificationLimiter _amp
    cdef object _amp_queue                  # deque of handshake datagrams over the budget
    cdef object _shaper                     # palisade_c.shaping.Shaper, or None in Mode 0
    cdef readonly object shaping            # the agreed palisade_c.shaping.Shaping
    cdef list _early_packets
    cdef Py_ssize_t _early_buffered         # bytes in _early_packets
    cdef EarlyBufferPool _early_pool        # shared by every session of an endpoint
    # Session timers.
    cdef double _last_recv
    cdef double _last_send
    cdef bint _has_drain_deadline
    cdef double _drain_deadline
    cdef tuple _close_info                  # (code, reason, by_peer), or None
    cdef ControlFrame _close_frame
    cdef bint _has_close_resend_at
    cdef double _close_resend_at
    # Rekey bookkeeping.
    cdef double _epoch_started
    cdef long long _epoch_bytes
    cdef long long _rekey_next              # -1: no rekey in progress (epochs are u32)
    cdef bint _has_rekey_deadline
    cdef double _rekey_deadline
    cdef double _rekey_interval
    cdef int _rekey_attempt                 # announcements armed for this rekey (server)
    cdef double _rekey_started              # when this rekey began (its budget counts from it)
    cdef unsigned int _abandons_seen        # the epoch machine's abandons we acted on
    cdef double _rtt_sample                 # handshake round trip (hello sent -> reply whole)
    cdef double _flight_started_at          # first send of the current flight (not resends)
    cdef long long _reported_epoch
    # Counters.
    cdef readonly long long packets_in
    cdef readonly long long packets_out
    cdef readonly long long bytes_in
    cdef readonly long long bytes_out
    cdef readonly long long hs_bytes_in
    cdef readonly long long hs_bytes_out
    cdef dict _drops
    # Client handshake liveness and reply checks (issue 10, items 1, 2 and the Retry of 6).
    cdef tuple _rejected                    # (code, detail, rid) of the last rejected reply
    cdef tuple _resume_args                 # (ticket, early_data, early_stream) until SHR
    cdef double _ack_backoff                # server: gap before acking a stalled message again

    # sans-IO API (Python calls these too)
    cpdef receive_datagram(self, data, addr, double now)
    cpdef list datagrams_to_send(self, now=*)
    cpdef object get_timer(self)
    cpdef handle_timer(self, double now)
    cdef int _service_timers(self, double now) except -1
    cdef int _fresh(self, double now) except -1
    cdef int _api_clock(self, object now) except -1
    cpdef next_event(self)

    # plumbing
    cdef int _new_hello_rid(self) except -1
    cdef int _start_full_handshake(self) except -1
    cdef int _start_resumption(self, ticket, early_data, int early_stream) except -1
    cdef int _fallback_to_full_handshake(self, int code) except -1
    cdef double _handshake_budget(self) except? -1.0
    cdef RetransmitTimer _new_timer(self)
    cdef bint _fire(self, str event) except -1
    cdef int _drop(self, str reason) except -1
    cdef int _log_event(self, str kind, dict fields) except -1
    cdef int _emit(self, event) except -1
    cdef int _send_raw(self, bytes data, object addr=*, bint handshake=*) except -1
    cdef int _send_slot(self) except -1
    cdef int _on_dummy(self, Py_ssize_t n, double now) except -1
    cdef int _flush_amplification(self) except -1
    cdef int _send_message(self, int msg_type, int msg_seq, bytes message) except -1
    cdef int _resend_flight(self, bint prompted=*) except -1
    cdef int _send_error_response(self, int code, str detail, bytes rid) except -1
    cdef str _timeout_detail(self)
    cdef int _handshake_gave_up(self) except -1

    # handshake datagrams
    cdef int _on_handshake_datagram(self, bytes data, addr, double now) except -1
    cdef int _on_ack(self, HandshakeRecord rec) except -1
    cdef bytes _reassemble(self, HandshakeRecord rec, double now)
    cdef int _send_pending_ack(self) except -1
    cdef int _client_on_record(self, HandshakeRecord rec, double now) except -1
    cdef object _error_response(self, HandshakeRecord rec)
    cdef int _client_on_error_response(self, HandshakeRecord rec) except -1
    cdef int _client_on_retry(self, HandshakeRecord rec) except -1
    cdef bint _answers_hello(self, bytes rid) except -1
    cdef int _reject_reply(self, bytes rid, object exc) except -1
    cdef int _probe_reply(self) except -1
    cdef bytes _server_reply(self, HandshakeRecord rec, double now, str waiting)
    cdef int _client_on_server_hello(self, HandshakeRecord rec, double now) except -1
    cdef int _client_on_server_hello_resume(self, HandshakeRecord rec, double now) except -1
    cdef int _server_on_record(self, HandshakeRecord rec, addr, double now) except -1
    cdef bytes _client_hello(self, HandshakeRecord rec, addr, double now, str first, str waiting,
                             bint resumed)
    cdef bytes _new_session_rid(self, bytes hello_rid)
    cdef int _server_on_client_hello(self, HandshakeRecord rec, addr, double now) except -1
    cdef int _server_on_client_hello_resume(self, HandshakeRecord rec, addr,
                                            double now) except -1
    cdef int _refuse_resumption(self, int code, str detail) except -1
    cdef int _server_on_client_finished(self, HandshakeRecord rec, double now) except -1
    cdef int _install_keys(self, result, double now, bint early_data_accepted=*) except -1
    cdef int _issue_ticket(self, result) except -1

    # encrypted packets
    cdef int _on_packet(self, bytes data, addr, double now) except -1
    cdef int _on_early_packet(self, bytes data, double now) except -1
    cdef int _buffer_early_packet(self, bytes data) except -1
    cdef list _take_early_packets(self)

    # migration (PLUS)
    cdef bint _migration(self) noexcept
    cdef int _promote_candidate(self) except -1
    cdef int _on_migrate_frame(self, ControlFrame frame, Record rec) except -1
    cdef str _migrate_problem(self, bytes nonce, int reason, Record rec)
    cdef bint _carries_refused_migrate(self, Record rec) except -1
    cdef int _on_new_path(self, addr, Py_ssize_t size, double now) except -1
    cdef int _send_path_challenge(self) except -1

    # control frames
    cpdef _seal(self, payload, int stream_id, bint control=*)
    cdef int _send_frame(self, ControlFrame frame) except -1
    cdef int _on_control(self, Record rec, addr, double now) except -1
    cdef int _on_new_ticket(self, ControlFrame frame) except -1

    # rekeying
    cdef int _maybe_rekey(self, double now) except -1
    cdef int _client_request_rekey(self) except -1
    cdef int _server_start_rekey(self, double now) except -1
    cdef int _arm_rekey_timer(self, double now) except -1
    cdef int _retransmit_rekey(self, double now) except -1
    cdef double _rekey_budget(self)
    cdef int _on_abandoned(self, double now) except -1
    cdef int _on_rekey_frame(self, ControlFrame frame, Record rec, double now) except -1
    cdef int _on_rekey_evidence(self, double now) except -1
    cdef int _after_epoch_activity(self, double now) except -1

    # close and abort
    cdef int _on_close_frame(self, ControlFrame frame) except -1
    cdef int _resend_close(self) except -1
    cdef int _finish_close(self) except -1
    cdef int _idle_out(self) except -1
    cdef int _expire_handshake(self) except -1
    cpdef _fail(self, int code, str detail, bint send)
    cdef int _abort(self, int code, str detail, bint by_peer, bint send) except -1
    cdef int _teardown(self) except -1
