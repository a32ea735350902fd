# cython: language_level=3
"""One PALISADE session, sans-IO: datagrams and time in, datagrams and events out.

Theory of operation
-------------------
A ``Connection`` never touches a socket or a clock. The shell around it calls

    receive_datagram(data, addr, now)   for every datagram from the peer
    datagrams_to_send(now)              to collect what to transmit
    get_timer() / handle_timer(now)     to drive retransmissions and timeouts
    next_event()                        to read what happened (palisade_c.events)

Two kinds of datagrams exist. Cleartext handshake records ("QH") carry CH/SH/CF, acks,
retries and ErrorResponses; they are reassembled under hard memory caps
(:mod:`palisade_c.reassembly`) and handed whole to :mod:`palisade_c.handshake`. Encrypted
packets ("QP") go through the compiled :class:`~palisade_c.record.RecordLayer`; control frames
inside them drive rekeying and close.

Every state change goes through the compiled :class:`~palisade_c.fsm.StateMachine`, whose
table lists the legal edges (seed §1, §2, §6). If the table refuses an event, the input that
caused it is dropped and counted under ``illegal-event``; nothing else changes. Nothing a peer
sends raises out of this class: malformed input is dropped and counted, and protocol failures
end the session with a spec error code (an ErrorResponse during the handshake, a hard
CTRL_CLOSE afterwards) and a :class:`~palisade_c.events.ConnectionClosed` event.

Rekeying is server-authoritative (PROFILE §6): the server arms its receiver and announces
CTRL_REKEY(next); the client arms, installs its sender and acknowledges on the new epoch; the
server installs its sender only on that evidence, so no packet is ever sealed under an epoch
the peer cannot open. A client that wants new keys sends a request and waits.

Compiled form
-------------
``Connection`` is a cdef class with C fields (declared in connection.pxd): counters are C
integers, an optional time is a double plus a flag, and the objects it owns (state machine,
reassembly table, flight, timer, amplification limiter, record layers) are typed, so the
per-datagram handshake path (receive_datagram -> decode -> _client_on_record /
_server_on_record -> _reassemble -> reply) runs as C calls between cdef methods and reads
their fields directly. It keeps an instance ``__dict__``, as the plain class had: ``_seal`` is
cpdef, so an override set on one instance (the rekey tests watch every seal that way) is
honoured, while sessions without one skip the lookup. The handshake itself
(:mod:`palisade_c.handshake`) stays Python; its cost is the KEM, signatures and SHA3.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import logging
from collections import deque
from hashlib import sha3_256
from collections.abc import Callable
from typing import Any

from palisade_c import frames as F
from palisade_c import pathinfo
from palisade_c import wire
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION
from palisade_c.errors import (
    BackPressureError,
    ControlFrameError,
    DecodeError,
    ErrorCode,
    HandshakeError,
    PacketTooLargeError,
    StateError,
    code_name,
)
from palisade_c.events import (
    ConnectionClosed,
    DataReceived,
    EpochChanged,
    HandshakeCompleted,
    NewTicket,
    PathMigrated,
)
from palisade_c.handshake import (
    ClientHandshake,
    ClientResumeHandshake,
    ServerHandshake,
    ServerResumeHandshake,
)
from palisade_c.keyschedule import ticket_psk, wipe
from palisade_c.reassembly import FragmentStatus
from palisade_c.safetext import printable
from palisade_c.shaping import MODE_RATE, Shaper, Shaping
from palisade_c.record import STREAM_DUMMY, STREAM_KEEPALIVE, make_rid
from palisade_c.tickets import (
    TICKET_NONCE_LEN,
    ClientTicket,
    decode_new_ticket,
    encode_new_ticket,
)

from palisade_c.frames cimport ControlFrame
from palisade_c.fsm cimport StateMachine
from palisade_c.hsrecord cimport (
    MSG_CLIENT_FINISHED,
    MSG_CLIENT_FINISHED_RESUME,
    MSG_CLIENT_HELLO,
    MSG_CLIENT_HELLO_RESUME,
    MSG_ERROR_RESPONSE,
    MSG_HANDSHAKE_ACK,
    MSG_RETRY,
    MSG_SERVER_HELLO,
    MSG_SERVER_HELLO_RESUME,
    RID_LEN,
    HandshakeAck,
    HandshakeRecord,
    decode_ack_ptr,
    decode_ptr,
)
from palisade_c.reassembly cimport AmplificationLimiter, Flight, ReassemblyTable, RetransmitTimer
from palisade_c.record cimport MIN_PACKET_LEN, Record, RecordLayer

Addr = Any  # a transport address: (host, port) for UDP, a path for serial links

log = logging.getLogger("palisade_c.connection")

#: Encrypted packets that may wait for the server's keys (PROFILE §3). Each may be at most
#: ``max_datagram_size`` bytes, so one session holds at most that many datagrams' worth.
MAX_EARLY_PACKETS = 16
#: Migrate nonces remembered per session to refuse replays (each is 32 random bytes).
MAX_MIGRATE_NONCES = 1024
#: Bytes a full handshake puts on the wire (both directions, ML-KEM-768 + ML-DSA-65): what a
#: slow link needs time for on top of the configured handshake timeout.
HANDSHAKE_WIRE_BYTES = 16_500
# Seconds a live peer has to answer the probe a gateway's REBOOT notice triggers (plus the
# link's airtime); a session still silent then is gone [profile, docs/protocol.md §14.1].
PROBE_TIMEOUT = 3.0
#: Bytes of the reply each flight waits for. A flight's first retransmission timeout must
#: cover the reply's airtime too, or on a slow link it fires while the reply is still arriving.
_REPLY_BYTES = {
    MSG_CLIENT_HELLO: 8_000,
    MSG_SERVER_HELLO: 4_600,
    MSG_CLIENT_FINISHED: 64,
    MSG_CLIENT_HELLO_RESUME: 2_400,
    MSG_SERVER_HELLO_RESUME: 1_200,
    MSG_CLIENT_FINISHED_RESUME: 64,
}
#: Largest application stream id; 0xFE and 0xFF are keepalive and dummy.
MAX_APP_STREAM = 0xFD
#: Times the server arms and announces one epoch before the rekey counts as failed and the
#: session closes with ErrorRekeyTimeout [profile]. Each attempt lasts at most the epoch
#: machine's transition bound (docs §5.1); between attempts the back-off doubles from
#: rekey_retransmit, up to max_rto.
REKEY_ATTEMPTS = 4
MAX_ERROR_DETAIL = 200
#: Bytes at the end of a session RID that bind it to the client's hello RID (§8.4).
SESSION_RID_TAG_LEN = 7
_SESSION_RID_LABEL = b"PALISADE session rid"

EventLog = Callable[[dict[str, Any]], None]

# C copies of the constants the per-packet paths compare against.
cdef int _STREAM_KEEPALIVE = STREAM_KEEPALIVE
cdef int _STREAM_DUMMY = STREAM_DUMMY
cdef int _PLUS_RESUMPTION = PLUS_RESUMPTION
cdef int _PLUS_MIGRATION = PLUS_MIGRATION
cdef Py_ssize_t _MAX_EARLY_PACKETS = MAX_EARLY_PACKETS
cdef Py_ssize_t _MAX_MIGRATE_NONCES = MAX_MIGRATE_NONCES
cdef Py_ssize_t _MAX_ERROR_DETAIL = MAX_ERROR_DETAIL
cdef int _REKEY_ATTEMPTS = REKEY_ATTEMPTS
cdef object _MALFORMED = FragmentStatus.MALFORMED
cdef object _REFUSED = FragmentStatus.REFUSED
cdef object _COMPLETE = FragmentStatus.COMPLETE
cdef int _DEBUG = logging.DEBUG

# Deadlines an application call armed from a stale clock (it was given no ``now``): they are
# re-based by the next call that carries a time (_fresh).
cdef int _STALE_DRAIN = 1
cdef int _STALE_CLOSE_RESEND = 2
cdef int _STALE_REKEY = 4
cdef int _STALE_EPOCH = 8
cdef int _STALE_SEND = 16


cdef inline bint _is_finished(int msg_type) noexcept:
    return msg_type == MSG_CLIENT_FINISHED or msg_type == MSG_CLIENT_FINISHED_RESUME


cdef inline double _fmax(double a, double b) noexcept:
    return b if b > a else a


cdef inline bint _is_hello(int msg_type) noexcept:
    return msg_type == MSG_CLIENT_HELLO or msg_type == MSG_CLIENT_HELLO_RESUME


cdef bytes _session_rid_tag(bytes hello_rid, bytes head):
    return sha3_256(_SESSION_RID_LABEL + hello_rid + head).digest()[:SESSION_RID_TAG_LEN]


def session_rid(bytes hello_rid, bytes prefix, bytes random7) -> bytes:
    """The session RID a server gives the client whose hello came under ``hello_rid``:
    ``prefix`` (8), rotation epoch 0, 7 random bytes, then 7 bytes of SHA3-256 over the hello
    RID and those 17 bytes [profile, changed: §8.4]. Only someone who saw the hello can make
    one, so a client can drop replies that do not answer its own hello."""
    if len(prefix) != 8 or len(random7) != 7 or len(hello_rid) != RID_LEN:
        raise ValueError("need an 8-byte prefix, 7 random bytes and a 24-byte hello RID")
    head = prefix + b"\x00\x00" + random7
    return head + _session_rid_tag(hello_rid, head)


def answers_hello(bytes hello_rid, bytes rid) -> bool:
    """True if ``rid`` is a session RID made for the hello sent under ``hello_rid``."""
    return (len(rid) == RID_LEN
            and rid[RID_LEN - SESSION_RID_TAG_LEN:] == _session_rid_tag(
                hello_rid, rid[:RID_LEN - SESSION_RID_TAG_LEN]))


cdef inline bint _same_addr(a, b) except -1:
    # (host, port) decides; an IPv6 socket address adds flow info and scope id, which a
    # resolver and recvfrom() need not spell alike.
    if type(a) is tuple and type(b) is tuple and len(<tuple>a) >= 2 and len(<tuple>b) >= 2:
        return a[0] == b[0] and a[1] == b[1]
    return a == b


cdef inline bint _debug_logging() except -1:
    # Checked before building a debug record: the logger caches its answer, so this costs one
    # call where log.debug() would cost two even when nothing is logged.
    return log.isEnabledFor(_DEBUG)


cdef class EarlyBufferPool:
    """Bytes of encrypted packets waiting for keys, across every session that shares it.

    A half-open session costs its creator one small hello fragment, so what it may buffer is
    bounded twice: per session (MAX_EARLY_PACKETS datagrams of at most max_datagram_size) and
    per endpoint (``limit``), which a flood of sessions cannot exceed. ``refused`` counts the
    packets turned away by either bound."""

    def __init__(self, Py_ssize_t limit):
        self.limit = limit
        self.used = 0
        self.refused = 0


cdef class Connection:
    """A client or server session. See the module docstring for the calling convention."""

    def __init__(self, config, bint is_client, *, event_log=None, name="", tickets=None,
                 early_pool=None):
        self.config = config
        self.is_client = is_client
        self.name = name or ("client" if is_client else "server")
        #: Called whenever this session queues output or an event, even from an application
        #: call such as send_data(); the server endpoint uses it to visit only busy sessions.
        self.on_wakeup = None
        self._fsm = StateMachine(not is_client)
        self._event_log = event_log
        self._rand = config.jitter
        self._now = 0.0
        self._stale_mask = 0
        self._out = []
        self._events = deque()
        self.peer_addr = None
        #: The session RID (server's choice, carried by SH); the client's first-flight rid
        #: until then.
        self.rid = b""
        self._hello_rid = b""
        self.record = None
        self.peer_fingerprint = None
        self.plus_features = 0
        self.resumption_secret = None
        self._client_hs = None
        self._server_hs = None
        # PALISADE-PLUS: resumption, 0-RTT and migration.
        self._tickets = tickets if tickets is not None else config.tickets
        self._resume_hs = None
        self._server_resume_hs = None
        self._early = None  # 0-RTT keys (client seals, server opens)
        self._early_budget = 0
        self._early_bytes = 0
        self.resumed = False
        self._candidate = None
        self._candidate_count = 0
        self._candidate_since = 0.0
        self._candidate_amp = None
        self._path_challenge = None
        self._migrate_nonces = {}
        self._reasm = ReassemblyTable(4, max_age=config.handshake_timeout)
        self._flight = None
        self._flight_timer = self._new_timer()
        self._has_hs_deadline = False
        self._flight_sent_at = 0.0
        self._retried = False
        self._rejected = None
        self._resume_args = None
        self._pending_ack = None  # reassembly key
        self._has_ack_deadline = False
        self._ack_backoff = 0.0
        # A quarter of the first retransmission timeout, stretched on slow links so the ack
        # does not race the rest of the burst still crossing the wire.
        self._ack_delay = config.initial_rto / 4 + config.link_time(2 * config.max_datagram_size)
        # Server side before the client proved its address (PROFILE §8).
        self._amp = AmplificationLimiter(config.amplification_factor)
        self._amp_queue = deque()
        self._shaper = None
        self.shaping = Shaping()
        self._early_packets = []
        self._early_buffered = 0
        self._early_pool = early_pool if early_pool is not None \
            else EarlyBufferPool(config.max_early_buffer_bytes)
        # Session timers.
        self._last_recv = 0.0
        self._last_send = 0.0
        self._has_drain_deadline = False
        self._close_info = None
        # The close we sent, resent while draining: a single lost frame must not leave the
        # peer waiting for its idle timeout.
        self._close_frame = None
        self._has_close_resend_at = False
        # Rekey bookkeeping.
        self._epoch_started = 0.0
        self._epoch_bytes = 0
        self._rekey_next = -1
        self._has_rekey_deadline = False
        self._rekey_interval = config.rekey_retransmit
        self._rekey_attempt = 0
        self._rekey_started = 0.0
        self._abandons_seen = 0
        self._rtt_sample = 0.0
        self._flight_started_at = 0.0
        self._reported_epoch = 0
        # Counters.
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.hs_bytes_in = 0
        self.hs_bytes_out = 0
        self._drops = {}

    # ------------------------------------------------------------------ public state

    @property
    def state(self):
        """The seed's state name: C_IDLE ... C_CLOSED or S_IDLE ... S_CLOSED."""
        return self._fsm.name

    @property
    def established(self):
        return self._fsm.established

    @property
    def closed(self):
        return self._fsm.closed

    @property
    def epoch(self):
        if self.record is not None and not self.record.erased:
            return self.record.epoch
        return self._reported_epoch

    @property
    def early_buffered_bytes(self):
        """Bytes of encrypted packets held until this session has keys (server)."""
        return self._early_buffered

    @property
    def drop_counts(self):
        """Dropped input by reason: the record layer's counters plus the connection's own."""
        out = dict(self._drops)
        for layer in (self.record, self._early):
            if layer is not None:
                for k, v in layer.drop_counts.items():
                    out[k] = out.get(k, 0) + v
        return out

    @property
    def counters(self):
        return {
            "state": self.state,
            "epoch": self.epoch,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "handshake_bytes_in": self.hs_bytes_in,
            "handshake_bytes_out": self.hs_bytes_out,
            "drops": self.drop_counts,
        }

    # ------------------------------------------------------------------ sans-IO API

    def connect(self, addr, double now, *, ticket=None, early_data=None, early_stream=0):
        """Client: start the handshake towards ``addr``.

        With a ``ticket`` (PLUS) the client tries resumption, sending ``early_data`` as 0-RTT
        packets on ``early_stream`` if given; a refused ticket falls back to a full handshake
        on its own. Early data is replayable: send only what is safe to receive twice.
        """
        if not self.is_client:
            raise StateError("connect() is for clients")
        if not self._fsm.can("connect"):
            raise StateError(f"connect() in state {self.state}")
        if early_data is not None and ticket is None:
            raise StateError("early data needs a resumption ticket")
        if not 0 <= early_stream <= MAX_APP_STREAM:
            raise ValueError(f"early_stream must be 0..{MAX_APP_STREAM}")
        self._now = now
        self.peer_addr = addr
        self._hs_deadline = now + self._handshake_budget()
        self._has_hs_deadline = True
        self._new_hello_rid()
        # A ticket is only as good as the pin of the server that issued it: after the pin is
        # removed, resuming would skip the check a full handshake makes (0x0107).
        if ticket is not None and ticket.usable(self.config.ticket_clock()) \
                and self.config.trust.has_fingerprint(ticket.server_fingerprint):
            self._fire("resume")
            self._start_resumption(ticket, early_data, early_stream)
            return
        self._fire("connect")
        self._start_full_handshake()

    cdef int _new_hello_rid(self) except -1:
        node_id = self.config.node_id
        if node_id is None:
            rand = self.config.rng(22)  # a random steering prefix and the RID's random tail
            self._hello_rid = self.rid = make_rid(rand[:8], 0, rand[8:])
        else:
            self._hello_rid = self.rid = make_rid(node_id, 0, self.config.rng(14))
        return 0

    cdef int _start_full_handshake(self) except -1:
        self._client_hs = ClientHandshake(self.config)
        self._send_message(MSG_CLIENT_HELLO, 0, self._client_hs.client_hello_bytes)
        self._fire("hello_sent")
        return 0

    cdef int _start_resumption(self, ticket, early_data, int early_stream) except -1:
        cdef Py_ssize_t room
        # Kept until the resumption ends: a Retry makes the client send it all again under
        # the cookie RID.
        self._resume_args = (ticket, early_data, early_stream)
        offer = early_data is not None and ticket.max_early_data > 0
        self._resume_hs = ClientResumeHandshake(self.config, ticket, offer)
        self._send_message(MSG_CLIENT_HELLO_RESUME, 0, self._resume_hs.hello_bytes)
        secret = self._resume_hs.early_secret
        if early_data is None or secret is None:
            return 0
        self._early = RecordLayer(secret, True, self._hello_rid, early=True,
                                  replay_window=self.config.replay_window)
        wipe(secret)
        # Never more than the ticket allows: the server would refuse the rest anyway.
        data = early_data[:ticket.max_early_data]
        room = self.config.max_datagram_size - MIN_PACKET_LEN
        for i in (range(0, len(data), room) if data else range(1)):
            self._send_raw(self._early._seal(data[i:i + room], early_stream, False, 0,
                                             self._now))
        return 0

    cdef int _fallback_to_full_handshake(self, int code) except -1:
        """The server refused our ticket: forget it and run a full handshake [seed §4]."""
        self._log_event("resumption-refused", {"code": code})
        if self._resume_hs is not None:
            self._resume_hs.erase()
        self._resume_hs = None
        if self._early is not None:
            self._early.erase()
            self._early = None
        self._resume_args = None
        self._flight_timer._stop()
        self._fire("resume_rejected")
        self._new_hello_rid()
        # A new hello, a new attempt: it may need (and may honour) a Retry of its own, and
        # what was rejected under the old hello says nothing about the new one.
        self._retried = False
        self._rejected = None
        self._start_full_handshake()
        return 0

    cpdef receive_datagram(self, data, addr, double now):
        """Feed one datagram from the transport. Never raises for anything in ``data``."""
        cdef bytes raw
        cdef Py_ssize_t n
        self._fresh(now)
        if self._fsm.closed:
            self._drop("closed")
            return
        raw = data if type(data) is bytes else bytes(data)
        n = PyBytes_GET_SIZE(raw)
        if n < 2:
            self._drop("truncated")
            return
        if raw[0] == 0x51 and raw[1] == 0x48:  # "QH"
            if self.is_client and not _same_addr(addr, self.peer_addr):
                # The client's socket is not connected: anyone can send to it. A handshake
                # record that did not come from the server we talk to is not a reply (§8.4).
                self._drop("wrong-source")
                return
            self.hs_bytes_in += n
            if not self.is_client and not self._amp._validated:
                self._amp._on_received(n)
            self._on_handshake_datagram(raw, addr, now)
            if self._amp_queue:
                self._flush_amplification()
        elif raw[0] == 0x51 and raw[1] == 0x50:  # "QP"
            self._on_packet(raw, addr, now)
        elif raw[0] == 0x51 and raw[1] == 0x4E:  # "QN": a gateway notice, only ever a hint
            self._on_notice(raw, addr, now)
        else:
            self._drop("bad-magic")

    cpdef list datagrams_to_send(self, now=None):
        """Everything queued for the transport, in order. Clears the queue.

        With ``now``, deadlines that an application call armed without a time are re-based
        on it first (see :meth:`close`)."""
        if now is not None:
            self._fresh(now)
        out, self._out = self._out, []
        return out

    cpdef object get_timer(self):
        """The earliest time at which handle_timer() has work, or None."""
        cdef bint found = False
        cdef double best = 0.0
        cdef double t
        cdef Py_ssize_t i
        cdef RecordLayer record
        if self._fsm.closed:
            return None
        # A plain loop over the candidates: this runs after every datagram on a server.
        cdef bint[6] has = [
            self._flight_timer._running, self._has_hs_deadline, self._has_drain_deadline,
            self._has_rekey_deadline, self._has_ack_deadline, self._has_close_resend_at,
        ]
        cdef double[6] times = [
            self._flight_timer._deadline, self._hs_deadline, self._drain_deadline,
            self._rekey_deadline, self._ack_deadline, self._close_resend_at,
        ]
        for i in range(6):
            if has[i] and (not found or times[i] < best):
                best = times[i]
                found = True
        record = self.record
        if record is not None and not record.erased:
            cfg = self.config
            rt = record.get_timer()
            if rt is not None and (not found or <double>rt < best):
                best = rt
                found = True
            sh = self._shaper
            if sh is not None and sh.mode == MODE_RATE \
                    and (not found or <double>sh.next_slot < best):
                best = sh.next_slot  # Mode 2: the next constant-rate slot (docs §17.4)
                found = True
            if self._fsm.established:
                t = min(self._last_recv + <double>cfg.idle_timeout,
                        self._last_send + <double>cfg.keepalive_interval)
                if self._rekey_next < 0:  # the age trigger waits while a rekey runs
                    t = min(t, self._epoch_started + <double>cfg.rekey_after_seconds)
                else:  # and a running rekey has a budget
                    t = min(t, self._rekey_started + self._rekey_budget())
                if not found or t < best:
                    best = t
                    found = True
        return best if found else None

    cpdef handle_timer(self, double now):
        """Run whatever is due at ``now``: retransmissions, timeouts, keepalives, commits.

        Invariant: every deadline ``get_timer()`` reports is serviced here in every state, so
        afterwards ``get_timer()`` is None or later than ``now``. A shell that trusts it would
        otherwise call again at once, forever. Should a bug break it anyway, the session ends
        with ErrorInternal (counted as ``timer-stalled``) rather than spin its caller."""
        cdef object after
        self._service_timers(now)
        after = self.get_timer()
        if after is not None and <double>after <= now:
            self._drop("timer-stalled")
            log.error("%s: deadline %.6f did not advance past %.6f in %s; closing", self.name,
                      <double>after, now, self.state)
            self._fail(ErrorCode.ErrorInternal, "internal error: timer did not advance",
                       send=True)

    cdef int _service_timers(self, double now) except -1:
        self._fresh(now)
        if self._fsm.closed:
            return 0
        if self._has_hs_deadline and now >= self._hs_deadline:
            if self._fsm.name == "S_WAIT_FIN":
                self._expire_handshake()
            else:
                self._handshake_gave_up()
            return 0
        if self._has_ack_deadline and now >= self._ack_deadline:
            self._send_pending_ack()
        if self._flight_timer.due(now):
            if self._flight_timer.on_timeout(now):
                # Holding part of the server's reply, the client probes with an ack instead
                # of repeating its hello (RFC 9002 §6.2.2.1: never go silent while waiting).
                if not self._probe_reply():
                    self._resend_flight()
            elif self._fsm.name == "S_WAIT_FIN":
                self._expire_handshake()
                return 0
            elif not self._fsm.established:
                self._handshake_gave_up()
                return 0
            else:
                # Established on our side, yet the server never acknowledged CF nor sent one
                # authenticated packet (either clears the flight): the session never formed.
                self._fail(ErrorCode.ErrorHandshakeTimeout,
                           "server never confirmed the handshake", send=False)
                return 0
        if self._has_drain_deadline and now >= self._drain_deadline:
            self._has_drain_deadline = False
            self._finish_close()
            return 0
        if self._has_close_resend_at and now >= self._close_resend_at:
            self._resend_close()
        if self._has_rekey_deadline and now >= self._rekey_deadline:
            # Reported in every state, so serviced in every state: a rekey (or a reboot probe
            # riding on one, §14.1) only makes sense on an established session; anywhere else
            # its timer just stops.
            if self._fsm.established and self.record is not None and not self.record.erased:
                if self._probe_failed(now):
                    self._probe_lost()
                    return 0
                if self._rekey_next >= 0:
                    self._retransmit_rekey(now)
                    self._clamp_probe()
                else:
                    self._has_rekey_deadline = False  # only the probe's check was due
            else:
                self._has_rekey_deadline = False
        if self.record is None or self.record.erased:
            return 0
        sh = self._shaper
        if sh is not None and sh.mode == MODE_RATE and now >= <double>sh.next_slot:
            self._send_slot()
            sh.advance(now)
        self.record.handle_timer(now)
        if self.record.epochs.abandons != self._abandons_seen:
            self._on_abandoned(now)
            if self._fsm.closed:
                return 0
        self._after_epoch_activity(now)
        if self._fsm.established:
            if now >= self._last_recv + <double>self.config.idle_timeout:
                self._idle_out()
                return 0
            if self._rekey_next >= 0 and now >= self._rekey_started + self._rekey_budget():
                # Whatever the path did to it, a rekey ends in bounded time (docs §9).
                self._fail(ErrorCode.ErrorRekeyTimeout,
                           f"rekey to epoch {self._rekey_next} did not complete", send=True)
                return 0
            self._maybe_rekey(now)
            if now >= self._last_send + <double>self.config.keepalive_interval:
                self._seal(b"", _STREAM_KEEPALIVE)
        return 0

    cpdef next_event(self):
        return self._events.popleft() if self._events else None

    @property
    def max_payload(self):
        """The largest ``send_data`` payload that fits in one datagram on the current path:
        the datagram size (config, or what the path taught us) less headers and tag."""
        if self._shaper is not None and self._shaper.mode == MODE_RATE:
            return min(self._shaper.size, self.config.max_datagram_size) - MIN_PACKET_LEN
        return self.config.max_datagram_size - MIN_PACKET_LEN

    @property
    def send_queue_room(self):
        """Mode 2: application packets ``send_data`` still accepts before it raises
        BackPressureError (None when the session does not queue: Modes 0 and 1)."""
        if self._shaper is not None and self._shaper.mode == MODE_RATE:
            return self._shaper.room
        return None

    @property
    def shaping_stats(self):
        """Traffic shaping counters (slots, dummies, pad_bytes, queued, refused), or None."""
        return None if self._shaper is None else self._shaper.stats()

    def send_data(self, data, stream_id=0, now=None):
        """Encrypt ``data`` as one packet on ``stream_id`` (0..253).

        Raises PacketTooLargeError (carrying ``max_payload``) when it would not fit in one
        datagram of the path: the datagram size is a promise, never exceeded. Under
        constant-rate shaping (Mode 2) the limit is the slot, and a full send queue raises
        BackPressureError (nothing queued).

        ``now`` (optional, like every application call here): the present time. A call
        without it arms any deadline (a rekey this packet triggers) from the last time the
        connection saw, and the next call that carries a time re-bases it."""
        cdef Py_ssize_t n, room
        if not 0 <= stream_id <= MAX_APP_STREAM:
            raise ValueError(f"stream_id must be 0..{MAX_APP_STREAM}")
        if not self._fsm.established:
            raise StateError(f"cannot send in state {self.state}")
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        room = self.config.max_datagram_size - MIN_PACKET_LEN
        if n > room:
            raise PacketTooLargeError(
                f"payload of {n} bytes exceeds the path's maximum payload of {room} bytes "
                f"(datagrams of {self.config.max_datagram_size} bytes)", room)
        sh = self._shaper
        if sh is not None and sh.mode == MODE_RATE:
            # Mode 2 refuses what does not fit a slot rather than split or grow it (docs §17.4).
            room = self.max_payload
            if n > room:
                raise PacketTooLargeError(
                    f"payload of {n} bytes exceeds the constant-rate slot's payload of "
                    f"{room} bytes", room)
            if sh.room <= 0:
                sh.refused += 1
                raise BackPressureError(
                    f"constant-rate send queue full ({sh.limit} packets); retry after a slot")
        cdef long long rekey_before = self._rekey_next
        self._api_clock(now)
        self._seal(data, stream_id)
        self._maybe_rekey(self._now)
        if now is None:
            self._stale_mask |= _STALE_SEND
            if self._rekey_next != rekey_before:
                self._stale_mask |= _STALE_REKEY | _STALE_EPOCH

    cdef int _fresh(self, double now) except -1:
        """A call carrying the present time: re-base what was armed without one, so every
        deadline counts from when its call really happened (at the latest, from now)."""
        cdef int mask = self._stale_mask
        cdef double delta = now - self._now
        self._stale_mask = 0
        if mask and delta > 0:
            if mask & _STALE_DRAIN and self._has_drain_deadline:
                self._drain_deadline += delta
            if mask & _STALE_CLOSE_RESEND and self._has_close_resend_at:
                self._close_resend_at += delta
            if mask & _STALE_REKEY and self._has_rekey_deadline:
                self._rekey_deadline += delta
            if mask & _STALE_REKEY and self._rekey_next >= 0 and self._rekey_started == self._now:
                self._rekey_started = now
            if mask & _STALE_EPOCH and self.record is not None and not self.record.erased:
                self.record.epochs.rebase(self._now, now)
            if mask & _STALE_SEND and self._last_send == self._now:
                self._last_send = now
        self._now = now
        return 0

    cdef int _api_clock(self, object now) except -1:
        """An application call with a time takes it. One without marks, once it has armed
        them, the deadlines it armed in ``_stale_mask``; the next call with a time re-bases
        exactly those (a deadline some earlier timed call set stays as it was)."""
        if now is not None:
            self._fresh(now)
        return 0

    def close(self, error_code=0, reason="", now=None):
        """Soft close: send CTRL_CLOSE(hard=0), drain for a bounded time, then CLOSED.

        The drain counts from ``now``; without it, from the next call that carries a time
        (``datagrams_to_send(now)``, ``handle_timer(now)``, ``receive_datagram``)."""
        if not 0 <= error_code <= 0xFFFF:
            raise ValueError("error_code must fit in u16")
        if self._fsm.closed or self._fsm.name.endswith(("_CLOSING", "_ABORT", "_IDLE")):
            return
        self._api_clock(now)
        if self.record is None:
            # No keys: nothing to drain and no authenticated way to tell the peer.
            if self._fire("close"):
                self._close_info = (error_code, reason, False)
                self._finish_close()
            return
        self._close_info = (error_code, reason, False)
        self._close_frame = F.encode_close(error_code, False, reason)
        self._send_frame(self._close_frame)
        self._fire("close")
        self._has_rekey_deadline = False  # a closing session finishes no rekey
        self._drain_deadline = self._now + <double>self.config.close_drain_time
        self._has_drain_deadline = True
        self._close_resend_at = self._now + <double>self.config.close_drain_time / 3
        self._has_close_resend_at = True
        if now is None:
            self._stale_mask |= _STALE_DRAIN | _STALE_CLOSE_RESEND | _STALE_SEND

    def request_rekey(self, now=None):
        """Ask for new keys now (client: a request; server: an announcement). ``now`` as
        for :meth:`close`."""
        if not self._fsm.established or self.record is None:
            raise StateError(f"cannot rekey in state {self.state}")
        cdef long long rekey_before = self._rekey_next
        self._api_clock(now)
        if self.is_client:
            self._client_request_rekey()
        else:
            self._server_start_rekey(self._now)
        if now is None and self._rekey_next != rekey_before:
            self._stale_mask |= _STALE_REKEY | _STALE_EPOCH | _STALE_SEND

    # ------------------------------------------------------------------ internals: plumbing

    cdef double _handshake_budget(self) except? -1.0:
        """The configured handshake timeout plus twice the handshake's airtime on this link."""
        return self.config.handshake_timeout + 2 * self.config.link_time(HANDSHAKE_WIRE_BYTES)

    @property
    def handshake_budget(self):
        """Seconds this session allows its handshake: the configured timeout plus twice the
        handshake's airtime on this link (a shell waiting for it should wait as long)."""
        return self._handshake_budget()

    cdef RetransmitTimer _new_timer(self):
        return RetransmitTimer(
            self._rand, initial=self.config.initial_rto,
            maximum=max(self.config.max_rto, self.config.initial_rto),
        )

    cdef bint _fire(self, str event) except -1:
        cdef str before = self._fsm.name
        if not self._fsm.fire(event):
            self._drop("illegal-event")
            if _debug_logging():
                log.debug("%s: event %s refused in %s", self.name, event, before)
            return False
        if _debug_logging():
            log.debug("%s: %s --%s--> %s", self.name, before, event, self._fsm.name)
        if self._event_log is not None:
            self._log_event("transition", {"old": before, "event": event, "new": self._fsm.name})
        return True

    cdef int _drop(self, str reason) except -1:
        self._drops[reason] = self._drops.get(reason, 0) + 1
        return 0

    cdef int _log_event(self, str kind, dict fields) except -1:
        cdef dict entry
        if self._event_log is not None:
            entry = {"t": round(self._now, 6), "conn": self.name, "kind": kind}
            entry.update(fields)
            self._event_log(entry)
        return 0

    cdef int _emit(self, event) except -1:
        self._events.append(event)
        if self.on_wakeup is not None:
            self.on_wakeup(self)
        return 0

    cdef int _send_raw(self, bytes data, object addr=None, bint handshake=False) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef AmplificationLimiter amp
        target = self.peer_addr if addr is None else addr
        if handshake:
            # Handshake traffic has its own counters; packets/bytes in and out are the
            # encrypted data plane in both directions alike.
            self.hs_bytes_out += n
            if not self.is_client and not self._amp._validated:
                if self._amp_queue or not self._amp._can_send(n):
                    # Over the budget, a resend of a record still queued adds nothing.
                    if data not in self._amp_queue:
                        self._amp_queue.append(data)
                    return 0
                self._amp._on_sent(n)
        else:
            self.packets_out += 1
            self.bytes_out += n
            amp = self._candidate_amp
            if addr is None and amp is not None and amp._can_send(n):
                # The peer is talking from a candidate path it has not proven yet: answer
                # there, within its 3x budget (PROFILE §8), as QUIC does; otherwise the old
                # path, which may be gone, would swallow every reply until validation.
                amp._on_sent(n)
                target = self._candidate
        self._out.append((data, target))
        if self.on_wakeup is not None:
            self.on_wakeup(self)
        self._last_send = self._now
        return 0

    cdef int _flush_amplification(self) except -1:
        cdef bytes data
        while self._amp_queue and (self._amp._validated
                                   or self._amp._can_send(len(self._amp_queue[0]))):
            data = self._amp_queue.popleft()
            if not self._amp._validated:
                self._amp._on_sent(PyBytes_GET_SIZE(data))
            self._out.append((data, self.peer_addr))
            if self.on_wakeup is not None:
                self.on_wakeup(self)
        return 0

    cdef int _send_message(self, int msg_type, int msg_seq, bytes message) except -1:
        """Send one handshake message to the peer as a flight of records under the current
        RID, and start the flight's retransmission timer."""
        cdef Flight flight = Flight.from_message(msg_type, self.rid, msg_seq, message,
                                                 self.config.max_datagram_size)
        self._flight = flight
        self._flight_timer = self._new_timer()
        airtime_bytes = flight._total_bytes + _REPLY_BYTES.get(flight._msg_type, 0)
        self._flight_timer._scale_for_link(airtime_bytes, self.config.link_bits_per_second)
        for rec in flight._records:
            self._send_raw(rec, None, handshake=True)
        self._flight_sent_at = self._flight_started_at = self._now
        self._flight_timer._start(self._now)
        return 0

    cdef int _resend_flight(self, bint prompted=False) except -1:
        """Resend what the peer has not acknowledged. ``prompted``: because the peer repeated
        an earlier message; such resends happen at most once per retransmission timeout, so
        a burst of duplicates cannot multiply the traffic on a slow link."""
        if self._flight is None:
            return 0
        # The gap is the initial timeout plus the flight's own airtime, not the backed-off
        # timeout (the peer's prompts, a repeated hello or a probe ack, are backed off
        # already) nor the link floor, which covers the reply's airtime too: on a slow link
        # that would keep us deaf to the peer for tens of seconds after each send.
        if prompted and self._now - self._flight_sent_at < (
                self._flight_timer._initial
                + <double>self.config.link_time(self._flight._total_bytes)):
            self._drop("resend-suppressed")
            return 0
        self._flight_sent_at = self._now
        for rec in self._flight.records_to_resend():
            self._send_raw(rec, None, handshake=True)
        return 0

    cdef int _send_error_response(self, int code, str detail, bytes rid) except -1:
        body = wire.ErrorResponse(error_code=code,
                                  details=detail[:_MAX_ERROR_DETAIL]).encode()
        rec = HandshakeRecord(MSG_ERROR_RESPONSE, rid, 0, 0, len(body), body)
        self._send_raw(rec.encode(), None, handshake=True)
        return 0

    cdef str _timeout_detail(self):
        """Why a handshake ran out of time, telling silence from a reply that stalled."""
        if self.hs_bytes_in == 0:
            return "handshake timed out: nothing received from the peer"
        return f"handshake timed out: received {self.hs_bytes_in} bytes, then stalled"

    cdef int _handshake_gave_up(self) except -1:
        """The handshake budget or the hello's resends ran out. A client that rejected a
        reply reports why (the server's key not pinned, say), as it would have at once if
        that reply could not have been a forgery; otherwise it is a timeout."""
        if self._rejected is not None:
            code, detail, rid = self._rejected
            self.rid = rid  # the ErrorResponse goes to the session that sent that reply
            self._fail(code, detail, send=True)
            return 0
        self._fail(ErrorCode.ErrorHandshakeTimeout, self._timeout_detail(), send=False)
        return 0

    # ------------------------------------------------------------------ handshake datagrams

    cdef int _on_handshake_datagram(self, bytes data, addr, double now) except -1:
        cdef HandshakeRecord rec
        try:
            rec = decode_ptr(<const unsigned char*>PyBytes_AS_STRING(data),
                             PyBytes_GET_SIZE(data))
        except DecodeError:
            self._drop("handshake-malformed")
            return 0
        if self.is_client:
            self._client_on_record(rec, now)
        else:
            self._server_on_record(rec, addr, now)
        return 0

    cdef int _on_ack(self, HandshakeRecord rec) except -1:
        cdef HandshakeAck ack
        cdef Flight flight
        try:
            ack = decode_ack_ptr(<const unsigned char*>PyBytes_AS_STRING(rec.fragment),
                                 PyBytes_GET_SIZE(rec.fragment))
        except DecodeError:
            self._drop("handshake-malformed")
            return 0
        flight = self._flight
        if flight is None or not flight._on_ack(ack):
            self._drop("stale-ack")
            return 0
        if flight._acknowledged():
            self._flight_timer._stop()
            if self._fsm.established:
                self._flight = None
        else:
            # The peer is missing part of our flight and says so (its delayed ack, or a probe
            # while it waits): resend the rest now rather than at our backed-off timeout.
            self._resend_flight(prompted=True)
        return 0

    cdef bytes _reassemble(self, HandshakeRecord rec, double now):
        """Add a fragment; acknowledge partial progress; return the message when complete."""
        result = self._reasm._add_record(rec, now, False)
        status = result.status
        if status is _MALFORMED or status is _REFUSED:
            self._drop("handshake-" + status.value)
            return None
        if status is _COMPLETE:
            # The reply (or the explicit CF ack) tells the peer everything arrived.
            self._pending_ack = None
            self._has_ack_deadline = False
            return result.message
        # Delayed ack: a burst of fragments earns one ack, sent only if the message is still
        # incomplete when the delay runs out (that is when the sender needs it). The ack is
        # built then, from what is held then.
        self._pending_ack = (rec.rid, rec.msg_type, rec.msg_seq)
        if not self._has_ack_deadline or now + self._ack_delay < self._ack_deadline:
            self._ack_deadline = now + self._ack_delay
            self._has_ack_deadline = True
        self._ack_backoff = 0.0  # progress: a stall from here is acked promptly again
        return None

    cdef int _send_pending_ack(self) except -1:
        cdef RetransmitTimer timer
        if self._pending_ack is not None:
            reasm = self._reasm.get(self._pending_ack)
            if reasm is not None:  # the table holds started, incomplete messages only
                self._send_raw(reasm.ack().to_record(self._pending_ack[0]), None,
                               handshake=True)
                if not self.is_client and not self._fsm.established:
                    # A server holding part of the client's hello or Finished acks again,
                    # backing off, while the rest does not come: each ack prompts the client
                    # to resend what is missing, so its resends do not depend on its own,
                    # backed-off timer alone (§8.5; the client probes the same way).
                    timer = self._flight_timer
                    self._ack_backoff = min(
                        _fmax(2 * self._ack_backoff, _fmax(timer._initial, 4 * self._ack_delay)),
                        _fmax(timer._maximum, 4 * self._ack_delay))
                    self._ack_deadline = self._now + self._ack_backoff
                    return 0
        self._pending_ack = None
        self._has_ack_deadline = False
        return 0

    # client --------------------------------------------------------------------------------

    cdef int _client_on_record(self, HandshakeRecord rec, double now) except -1:
        cdef int t = rec.msg_type
        if t == MSG_HANDSHAKE_ACK:
            if rec.rid == self._hello_rid or rec.rid == self.rid:
                self._on_ack(rec)
            else:
                self._drop("unknown-rid")
        elif t == MSG_ERROR_RESPONSE:
            self._client_on_error_response(rec)
        elif t == MSG_RETRY:
            self._client_on_retry(rec)
        elif t == MSG_SERVER_HELLO:
            self._client_on_server_hello(rec, now)
        elif t == MSG_SERVER_HELLO_RESUME:
            self._client_on_server_hello_resume(rec, now)
        else:
            self._drop("unexpected-handshake")
        return 0

    cdef object _error_response(self, HandshakeRecord rec):
        try:
            return wire.ErrorResponse.decode(rec.fragment)
        except DecodeError:
            self._drop("handshake-malformed")
            return None

    cdef int _client_on_error_response(self, HandshakeRecord rec) except -1:
        # Only an error that answers our own handshake, while it can still fail, counts.
        cdef str state = self._fsm.name
        cdef bint cf_unconfirmed = (self._flight is not None
                                    and _is_finished(self._flight._msg_type))
        cdef bint awaiting = state == "C_WAIT_SH" or state == "C_RESUME_PENDING" \
            or cf_unconfirmed
        if not (rec.rid == self._hello_rid or rec.rid == self.rid) or not awaiting:
            self._drop("stale-error-response")
            return 0
        err = self._error_response(rec)
        if err is None:
            return 0
        if state == "C_RESUME_PENDING" and not 0x0200 <= err.error_code <= 0x02FF:
            # A refused ticket: fall back to a full handshake [seed §4]. A session error
            # (limit reached, expired) is about the server, not the ticket: a full handshake
            # would meet it again, so it ends the attempt like any other refusal.
            self._fallback_to_full_handshake(err.error_code)
            return 0
        self._abort(err.error_code, f"server refused the handshake: {err.text}", by_peer=True,
                    send=False)
        return 0

    cdef int _client_on_retry(self, HandshakeRecord rec) except -1:
        # A server above its cookie threshold answers a ClientHelloResume with a Retry as
        # well as a ClientHello: both waiting states honour it (§8.6).
        cdef str state = self._fsm.name
        if (state != "C_WAIT_SH" and state != "C_RESUME_PENDING") \
                or rec.rid != self._hello_rid or self._retried:
            self._drop("stale-retry")
            return 0
        cdef bytes new_rid = rec.fragment
        if PyBytes_GET_SIZE(new_rid) != RID_LEN or new_rid[:8] != self._hello_rid[:8]:
            self._drop("handshake-malformed")
            return 0
        self._retried = True
        self._reasm.discard_rid(self._hello_rid)
        self._hello_rid = self.rid = new_rid
        self._log_event("retry", {})
        if state == "C_WAIT_SH":
            assert self._client_hs is not None
            self._send_message(MSG_CLIENT_HELLO, 0, self._client_hs.client_hello_bytes)
            return 0
        # The resumption starts over under the cookie RID: a fresh CHR, and the 0-RTT data
        # sealed again, since the RID is part of every packet's associated data. The server
        # kept nothing (a Retry is stateless), so the ticket is still unused.
        assert self._resume_args is not None
        ticket, early_data, early_stream = self._resume_args
        if self._resume_hs is not None:
            self._resume_hs.erase()
            self._resume_hs = None
        if self._early is not None:
            self._early.erase()
            self._early = None
        self._start_resumption(ticket, early_data, early_stream)
        return 0

    cdef bint _answers_hello(self, bytes rid) except -1:
        """True if ``rid`` is a session RID made for our current hello (§8.4): it ends in the
        check bytes over our hello RID and, if we targeted a node id, keeps that prefix."""
        if PyBytes_GET_SIZE(rid) != RID_LEN or not self._hello_rid:
            return False
        # A client that targeted a node id expects the session RID to keep that steering
        # prefix (PROFILE §4). One that did not used a random prefix, and the server puts its
        # own node id there, so there is nothing to compare.
        if self.config.node_id is not None and rid[:8] != self._hello_rid[:8]:
            return False
        return rid[RID_LEN - SESSION_RID_TAG_LEN:] == _session_rid_tag(
            self._hello_rid, rid[:RID_LEN - SESSION_RID_TAG_LEN])

    cdef int _reject_reply(self, bytes rid, object exc) except -1:
        """A complete SH/SHR that failed verification before its signature (or MAC) held.
        It may be a forgery racing the genuine reply, so it ends nothing by itself: forget
        what was assembled under its RID (a forged fragment may be what broke it), ask for
        the reply again, and give the genuine one a few timeouts to arrive. If none does,
        the handshake fails with this error (§8.4)."""
        cdef double grace
        self._drop("reply-rejected")
        self._log_event("reply-rejected", {"code": int(exc.code)})
        self._reasm.discard_rid(rid)
        self._rejected = (int(exc.code), exc.detail, rid)
        grace = self._now + 4 * _fmax(self._flight_timer._initial, self._flight_timer._floor)
        if self._has_hs_deadline and grace < self._hs_deadline:
            self._hs_deadline = grace
        self._resend_flight(prompted=True)
        return 0

    cdef int _probe_reply(self) except -1:
        """Client waiting for SH or SHR: acknowledge what it holds of a reply that answers
        its hello. Returns 1 if it sent such an ack (the probe), 0 if it holds nothing."""
        cdef int sent = 0
        if not self.is_client or self._flight is None or not _is_hello(self._flight._msg_type):
            return 0
        for key, reasm in list(self._reasm._entries.items()):
            if (key[1] == MSG_SERVER_HELLO or key[1] == MSG_SERVER_HELLO_RESUME) \
                    and self._answers_hello(key[0]):
                self._send_raw(reasm.ack().to_record(key[0]), None, handshake=True)
                sent = 1
        if sent:
            self._log_event("reply-probe", {})
        return sent

    cdef bytes _server_reply(self, HandshakeRecord rec, double now, str waiting):
        """A fragment of SH or SHR: the whole reply once complete, else None."""
        cdef bytes message
        # Only a reply under a session RID made for our own hello counts; anything else
        # (a forgery, a replay of another session's flight) is dropped, never fatal.
        if not self._answers_hello(rec.rid):
            self._drop("unknown-rid")
            return None
        if self._fsm.name != waiting:
            if self._flight is not None and _is_finished(self._flight._msg_type) \
                    and rec.rid == self.rid:
                # The server is still resending its hello: our Finished is lost. Resend what
                # the server has not acknowledged.
                self._resend_flight(prompted=True)
            else:
                self._drop("unexpected-handshake")
            return None
        message = self._reassemble(rec, now)
        if message is None and self._flight is not None and _is_hello(self._flight._msg_type):
            # The server is answering: the hello's timer now guards the reply. It fires only
            # after a full timeout without a fragment, and then probes (see handle_timer). On
            # a slow link that timeout covers what is still missing of the reply, not the
            # hello and the whole reply as at first.
            reasm = self._reasm.get((rec.rid, rec.msg_type, rec.msg_seq))
            if reasm is not None:
                self._flight_timer._scale_for_link(
                    rec.msg_length - reasm.bytes_held + 64, self.config.link_bits_per_second)
            self._flight_timer._start(now)
        return message

    cdef int _client_on_server_hello(self, HandshakeRecord rec, double now) except -1:
        cdef bytes message = self._server_reply(rec, now, "C_WAIT_SH")
        if message is None:
            return 0
        hs = self._client_hs
        assert hs is not None
        try:
            cf = hs.on_server_hello(message)
        except HandshakeError as exc:
            if not hs.authentic:
                self._reject_reply(rec.rid, exc)
                return 0
            # Signed by the server, yet broken: the server's own failure.
            self.rid = rec.rid
            self._fire("sh_received")
            self._fail(exc.code, exc.detail, send=True)
            return 0
        if not self._fire("sh_received"):
            return 0
        self.rid = rec.rid  # the session RID the server chose, for CF or for our error
        result = hs.result
        assert result is not None
        self._fire("sh_verified")
        self._rtt_sample = now - self._flight_started_at  # before CF restarts the flight clock
        self._send_message(MSG_CLIENT_FINISHED, 1, cf)
        self._install_keys(result, now)
        return 0

    cdef int _client_on_server_hello_resume(self, HandshakeRecord rec, double now) except -1:
        cdef bytes message = self._server_reply(rec, now, "C_RESUME_PENDING")
        if message is None:
            return 0
        resume = self._resume_hs
        assert resume is not None
        try:
            cfr = resume.on_server_hello_resume(message)
        except HandshakeError as exc:
            if not resume.authentic:
                self._reject_reply(rec.rid, exc)
                return 0
            self.rid = rec.rid
            self._fail(exc.code, exc.detail, send=True)
            return 0
        self.rid = rec.rid  # the session RID the server chose, for CFR or for our error
        self._resume_args = None
        result = resume.result
        assert result is not None
        self._fire("resume_accepted")
        self._rtt_sample = now - self._flight_started_at
        self._send_message(MSG_CLIENT_FINISHED_RESUME, 1, cfr)
        if self._early is not None:
            self._early.erase()  # 1-RTT keys from here on
            self._early = None
        self._install_keys(result, now, early_data_accepted=resume.accepted_0rtt)
        self._resume_hs = None
        return 0

    # server --------------------------------------------------------------------------------

    cdef int _server_on_record(self, HandshakeRecord rec, addr, double now) except -1:
        cdef int t = rec.msg_type
        if self._fsm.name == "S_IDLE":
            self._fire("listen")
        if t == MSG_CLIENT_HELLO:
            self._server_on_client_hello(rec, addr, now)
        elif _is_finished(t):
            self._server_on_client_finished(rec, now)
        elif t == MSG_CLIENT_HELLO_RESUME:
            self._server_on_client_hello_resume(rec, addr, now)
        elif t == MSG_HANDSHAKE_ACK:
            if rec.rid == self.rid:
                self._amp.validate()  # only a peer that saw SH knows the session RID
                self._on_ack(rec)
            else:
                self._drop("unknown-rid")
        elif t == MSG_ERROR_RESPONSE:
            if rec.rid != self.rid or self._fsm.name != "S_WAIT_FIN":
                self._drop("stale-error-response")
                return 0
            err = self._error_response(rec)
            if err is None:
                return 0
            self._abort(err.error_code, f"client refused the handshake: {err.text}",
                        by_peer=True, send=False)
        else:
            self._drop("unexpected-handshake")
        return 0

    cdef bytes _client_hello(self, HandshakeRecord rec, addr, double now, str first,
                             str waiting, bint resumed):
        """A fragment of CH (or CHR): the whole hello once complete, else None."""
        if self._fsm.name == "S_LISTEN":
            self.peer_addr = addr
            self._hello_rid = rec.rid
            self._hs_deadline = now + self._handshake_budget()
            self._has_hs_deadline = True
            self._fire(first)
        elif rec.rid != self._hello_rid:
            self._drop("unknown-rid")
            return None
        if self._fsm.name != waiting:
            # The hello again: our reply (or part of it) was lost. Resend what is missing.
            if self._fsm.name == "S_WAIT_FIN" \
                    and resumed == (self._server_resume_hs is not None) \
                    and self._reasm._add_record(rec, now, False).status is not _MALFORMED:
                self._resend_flight(prompted=True)
            else:
                self._drop("unexpected-handshake")
            return None
        return self._reassemble(rec, now)

    cdef bytes _new_session_rid(self, bytes hello_rid):
        """The server's session RID: its node id (or the client's prefix), rotation epoch 0,
        7 bytes that are random or start with the RID layout's routing fields, and 7 check
        bytes over the client's hello RID (§3.3, §8.4)."""
        prefix = self.config.node_id if self.config.node_id is not None else hello_rid[:8]
        layout = self.config.rid_layout  # routing fields for load balancers and workers
        head = self.config.rng(7) if layout is None else layout.tail(self.config.rng)[:7]
        return session_rid(hello_rid, prefix, head)

    cdef int _server_on_client_hello(self, HandshakeRecord rec, addr, double now) except -1:
        cdef bytes message = self._client_hello(rec, addr, now, "ch_received", "S_WAIT_CH",
                                                False)
        if message is None:
            return 0
        self._server_hs = ServerHandshake(self.config)
        try:
            sh = self._server_hs.on_client_hello(message)
        except HandshakeError as exc:
            self.rid = self._hello_rid
            self._fail(exc.code, exc.detail, send=True)
            return 0
        self._fire("ch_parsed")
        self._fire("ch_verified")
        self.rid = self._new_session_rid(rec.rid)
        self._send_message(MSG_SERVER_HELLO, 0, sh)
        self._fire("sh_sent")
        return 0

    cdef int _server_on_client_hello_resume(self, HandshakeRecord rec, addr,
                                            double now) except -1:
        cdef bytes message = self._client_hello(rec, addr, now, "chr_received",
                                                "S_RESUME_WAIT_CHR", True)
        if message is None:
            return 0
        self.rid = self._hello_rid
        tickets = self._tickets
        if tickets is None or not self.config.plus_features & _PLUS_RESUMPTION:
            self._refuse_resumption(int(ErrorCode.ErrorTicketInvalid), "resumption disabled")
            return 0
        resume = ServerResumeHandshake(self.config, tickets)
        try:
            shr = resume.on_client_hello_resume(message)
        except HandshakeError as exc:
            if 0x0400 <= exc.code <= 0x04FF:
                self._refuse_resumption(int(exc.code), exc.detail)
            else:
                self._fail(exc.code, exc.detail, send=True)
            return 0
        self._server_resume_hs = resume
        self._fire("resume_accepted")
        self.rid = self._new_session_rid(rec.rid)
        self._send_message(MSG_SERVER_HELLO_RESUME, 0, shr)
        self._fire("sh_sent")
        if resume.accept_0rtt and resume.early_secret is not None and resume.inner is not None:
            self._early = RecordLayer(resume.early_secret, False, self._hello_rid, early=True,
                                      replay_window=self.config.replay_window)
            wipe(resume.early_secret)
            self._early_budget = resume.inner.max_early_data  # the ticket's, not the offer
        for pkt in self._take_early_packets():
            self._on_packet(pkt, self.peer_addr, now)
        return 0

    cdef int _refuse_resumption(self, int code, str detail) except -1:
        """Tell the client its ticket is no good so it falls back; this session ends."""
        self._send_error_response(code, detail, self._hello_rid)
        self._log_event("resumption-refused", {"code": code})
        self._fire("resume_rejected")
        self._teardown()
        self._emit(ConnectionClosed(code, detail, False))
        return 0

    cdef int _server_on_client_finished(self, HandshakeRecord rec, double now) except -1:
        if rec.rid != self.rid:
            self._drop("unknown-rid")
            return 0
        self._amp.validate()  # the client echoes the session RID: it received our SH
        if self._fsm.name != "S_WAIT_FIN":
            if self._fsm.established:
                # CF retransmitted: our ack was lost. The table answers with a full ack.
                again = self._reasm._add_record(rec, now, True)
                if again.ack is not None:
                    self._send_raw(again.ack.to_record(self.rid), None, handshake=True)
                return 0
            self._drop("unexpected-handshake")
            return 0
        cdef bint resumed = rec.msg_type == MSG_CLIENT_FINISHED_RESUME
        if resumed != (self._server_resume_hs is not None):
            self._drop("unexpected-handshake")  # CF for a resumption, or CFR for a full one
            return 0
        self._flight_timer._stop()  # a CF fragment proves SH arrived
        cdef bytes message = self._reassemble(rec, now)
        if message is None:
            return 0
        try:
            if self._server_resume_hs is not None:
                result = self._server_resume_hs.on_client_finished_resume(message)
            else:
                assert self._server_hs is not None
                result = self._server_hs.on_client_finished(message)
        except HandshakeError as exc:
            self._fail(exc.code, exc.detail, send=True)
            return 0
        self._fire("fin_received")
        self._rtt_sample = now - self._flight_started_at
        ack = HandshakeAck(rec.msg_type, rec.msg_seq, [(0, len(message))])
        self._send_raw(ack.to_record(self.rid), None, handshake=True)
        self._flight = None
        self._server_resume_hs = None
        if self._early is not None:
            self._early.erase()  # the 0-RTT window closes once 1-RTT keys exist
            self._early = None
        self._install_keys(result, now)
        for pkt in self._take_early_packets():
            self._on_packet(pkt, self.peer_addr, now)
        return 0

    cdef int _install_keys(self, result, double now, bint early_data_accepted=False) except -1:
        cfg = self.config
        self.record = RecordLayer(
            result.master_secret, self.is_client, self.rid,
            replay_window=cfg.replay_window, commit_threshold=cfg.commit_threshold,
            max_transition_time=cfg.max_transition_time,
        )
        wipe(result.master_secret)  # the record layer derived what it needs and kept no copy
        # A rekey attempt must outlast a few round trips of this path, or a long path would
        # never show its evidence in time (docs §5.1). The handshake gave one sample.
        self.record.epochs.transition_bound = max(
            <double>cfg.max_transition_time,
            3 * min(max(self._rtt_sample, 0.0), <double>cfg.max_rto))
        self.resumption_secret = result.resumption_secret
        self.peer_fingerprint = result.peer_fingerprint
        self.plus_features = result.plus_features
        self.shaping = result.shaping
        if self.shaping.mode:
            self._shaper = Shaper(self.shaping, cfg.rng, now, cfg.shaping_queue_limit)
        self._has_hs_deadline = False
        self._client_hs = self._server_hs = None
        self.resumed = result.resumed
        self._last_recv = self._last_send = self._epoch_started = now
        self._fire("keys_derived")
        self._log_event("established", {"peer": result.peer_fingerprint[:16],
                                        "resumed": self.resumed})
        self._emit(HandshakeCompleted(result.peer_fingerprint, resumed=self.resumed,
                                      plus_features=self.plus_features,
                                      early_data_accepted=early_data_accepted,
                                      shaping=self.shaping))
        if not self.is_client:
            self._issue_ticket(result)
        return 0

    cdef int _issue_ticket(self, result) except -1:
        """Server: one NEW_TICKET after every (full or resumed) handshake, when negotiated."""
        tickets = self._tickets
        if tickets is None or not self.plus_features & _PLUS_RESUMPTION \
                or self.resumption_secret is None:
            return 0
        nonce = self.config.rng(TICKET_NONCE_LEN)
        psk = ticket_psk(self.resumption_secret, nonce)
        try:
            ticket = tickets.issue(psk, nonce, bytes.fromhex(result.peer_fingerprint),
                                   result.kem, result.sig, result.aead)
        finally:
            wipe(psk)
        self._send_frame(encode_new_ticket(tickets.lifetime, tickets.max_early_data, nonce,
                                           ticket))
        return 0

    # ------------------------------------------------------------------ encrypted packets

    cdef int _on_packet(self, bytes data, addr, double now) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef RecordLayer record
        cdef Record rec
        if self._early is not None and not self.is_client and n >= 30 \
                and data[6:30] == self._hello_rid and self._hello_rid != self.rid:
            self._on_early_packet(data, now)  # 0-RTT packets carry the first-flight RID
            return 0
        record = self.record
        if record is None or record.erased:
            if not self.is_client \
                    and (self._fsm.name == "S_WAIT_FIN" or self._fsm.name == "S_RESUME_WAIT_CHR"):
                # Data may overtake CF, and 0-RTT data may overtake CHR (PROFILE §3, §7).
                self._buffer_early_packet(data)
            else:
                self._drop("no-keys")
            return 0
        dummies = record.dummies_received
        rec = record._open(data, now)
        if rec is None:
            if record.dummies_received != dummies:
                self._on_dummy(n, now)
            return 0
        if not self.is_client and self.peer_addr is not None and addr != self.peer_addr:
            if rec.control and self._carries_refused_migrate(rec):
                # A migration the session refuses (replayed nonce, wrong epoch or reason)
                # proves nothing about this address: it does not become a candidate. The
                # packet is authenticated, so its frames and data are still processed.
                self._drop("path-change-refused")
            else:
                self._on_new_path(addr, n, now)
        self.packets_in += 1
        self.bytes_in += n
        self._epoch_bytes += n
        self._last_recv = now
        if self._flight is not None and self.is_client:
            # Any packet under the new keys proves the server has our CF (PROFILE §3).
            self._flight = None
            self._flight_timer._stop()
        if self._rekey_next >= 0 and rec.epoch == self._rekey_next:
            self._on_rekey_evidence(now)
        if rec.control:
            self._on_control(rec, addr, now)
        elif rec.stream_id != _STREAM_KEEPALIVE and rec.stream_id != _STREAM_DUMMY:
            if self._fsm.closed:
                return 0
            self._emit(DataReceived(rec.stream_id, rec.payload))
        self._after_epoch_activity(now)
        return 0

    cdef int _on_dummy(self, Py_ssize_t n, double now) except -1:
        """An authenticated dummy (stream 0xFF): discarded by the record layer, never
        delivered (spec §10.1), yet proof that the peer is alive. Under constant-rate
        shaping dummies are all a quiet peer sends; without this the idle timer would end a
        healthy session (docs §17.4)."""
        self.packets_in += 1
        self.bytes_in += n
        self._epoch_bytes += n
        self._last_recv = now
        if self._flight is not None and self.is_client:
            self._flight = None  # a packet under the new keys proves the server has our CF
            self._flight_timer._stop()
        self._after_epoch_activity(now)
        return 0

    cdef int _buffer_early_packet(self, bytes data) except -1:
        """Hold a packet until the keys exist, within the per-session and endpoint bounds."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef EarlyBufferPool pool = self._early_pool
        if n > self.config.max_datagram_size \
                or len(self._early_packets) >= _MAX_EARLY_PACKETS \
                or pool.used + n > pool.limit:
            pool.refused += 1
            self._drop("early-buffer-full")
            return 0
        self._early_packets.append(data)
        self._early_buffered += n
        pool.used += n
        return 0

    cdef list _take_early_packets(self):
        """Empty the early-packet buffer, giving its bytes back to the pool."""
        cdef list held = self._early_packets
        self._early_packets = []
        self._early_pool.used -= self._early_buffered
        self._early_buffered = 0
        return held

    cdef int _on_early_packet(self, bytes data, double now) except -1:
        """Server: one 0-RTT packet. Replayable, so only allowlisted streams and keepalives,
        never a control frame, and never past the ticket's allowance [spec §12.8, seed §4]."""
        assert self._early is not None
        cdef Record rec = self._early._open(data, now)
        if rec is None:
            return 0
        if rec.control:
            self._drop("early-control-ignored")
            return 0
        if rec.stream_id == _STREAM_KEEPALIVE or rec.stream_id == _STREAM_DUMMY:
            return 0
        if rec.stream_id not in self.config.early_data_streams:
            self._drop("early-stream-refused")
            return 0
        if self._early_bytes + PyBytes_GET_SIZE(rec.payload) > self._early_budget:
            self._drop("early-data-limit")
            return 0
        self._early_bytes += PyBytes_GET_SIZE(rec.payload)
        self.packets_in += 1
        self.bytes_in += PyBytes_GET_SIZE(data)
        self._emit(DataReceived(rec.stream_id, rec.payload, early=True))
        return 0

    # ------------------------------------------------------------------ migration (PLUS)

    cdef bint _migration(self) noexcept:
        return (self.plus_features & _PLUS_MIGRATION) != 0

    def migrate(self, now=None):
        """Client: announce that our address changed (soft migration, spec §13.2).

        Call after the transport moved to its new address; the next packet carries
        CTRL_MIGRATE from there, and the server validates the new path before using it.
        ``now`` as for :meth:`close`."""
        if not self.is_client or not self._fsm.established or self.record is None:
            raise StateError("migrate() is for an established client")
        if not self._migration():
            raise StateError("migration was not negotiated (PALISADE-PLUS feature 0x02)")
        self._api_clock(now)
        self._send_frame(F.encode_migrate(self.config.rng(32), self.record.epoch))
        if now is None:
            self._stale_mask |= _STALE_SEND

    cdef int _on_new_path(self, addr, Py_ssize_t size, double now) except -1:
        """Server: an authenticated packet came from an address other than the primary path:
        NAT rebinding, or a migration whose CTRL_MIGRATE is inside this very packet. Both make
        the address a candidate; the primary path changes only once it is validated."""
        if not self._migration():
            self._drop("path-change-ignored")  # CORE: the session stays on its path
            return 0
        if addr != self._candidate:
            self._candidate = addr
            self._candidate_count = 0
            self._candidate_since = now
            self._candidate_amp = AmplificationLimiter(self.config.amplification_factor)
            self._path_challenge = self.config.rng(32)
            self._candidate_amp._on_received(size)
            self._log_event("path-candidate", {})
            self._send_path_challenge()
        else:
            assert self._candidate_amp is not None
            self._candidate_amp._on_received(size)
        self._candidate_count += 1
        if now - self._candidate_since > <double>self.config.migration_window:
            # Too slow to count as one burst: start counting again from this packet.
            self._candidate_since = now
            self._candidate_count = 1
        if self._candidate_count >= self.config.migration_packets:
            self._promote_candidate()
        return 0

    cdef int _send_path_challenge(self) except -1:
        cdef bytes pkt
        cdef AmplificationLimiter amp
        assert self.record is not None and self._path_challenge is not None
        frame = F.encode_path(F.CTRL_PATH_CHALLENGE, self._path_challenge)
        pkt = self.record._seal(F.encode_frames([frame]), 0, True, 0, self._now)
        amp = self._candidate_amp
        # An unvalidated path gets at most 3x what it sent us (PROFILE §8).
        if amp is not None and amp._can_send(PyBytes_GET_SIZE(pkt)):
            amp._on_sent(PyBytes_GET_SIZE(pkt))
            # An explicit address: _send_raw counts the packet and skips its candidate branch.
            self._send_raw(pkt, self._candidate)
        else:
            self._drop("amplification-deferred")
        return 0

    cdef int _promote_candidate(self) except -1:
        self.peer_addr = self._candidate
        self._candidate = None
        self._candidate_amp = None
        self._path_challenge = None
        self._log_event("path-migrated", {})
        self._emit(PathMigrated(self.peer_addr))
        return 0

    cdef str _migrate_problem(self, bytes nonce, int reason, Record rec):
        """Why a CTRL_MIGRATE is refused (its drop counter), or None if it is valid."""
        if nonce in self._migrate_nonces:
            return "migrate-replay"  # single use [spec §13]
        if reason != F.MIGRATE_REASON_SOFT or self.record is None \
                or rec.epoch != self.record.epoch:
            return "migrate-invalid"
        return None

    cdef bint _carries_refused_migrate(self, Record rec) except -1:
        """Server, packet from a new address: does it carry a CTRL_MIGRATE we refuse?
        Checked before the frames run, so the address is judged before anything answers it."""
        cdef ControlFrame frame
        if self.is_client or not self._migration():
            return False
        try:
            frames = F.decode_frames(rec.payload)
        except ControlFrameError:
            return False  # _on_control drops and counts it
        for frame in frames:
            if frame.ctrl_type == F.CTRL_MIGRATE:
                try:
                    nonce, _observed, reason = F.decode_migrate(frame)
                except ControlFrameError:
                    return True
                if self._migrate_problem(nonce, reason, rec) is not None:
                    return True
        return False

    cdef int _on_migrate_frame(self, ControlFrame frame, Record rec) except -1:
        nonce, _observed, reason = F.decode_migrate(frame)
        if self.is_client or not self._migration():
            self._drop("ignored-control")
            return 0
        problem = self._migrate_problem(nonce, reason, rec)
        if problem is not None:
            self._drop(problem)
            return 0
        if len(self._migrate_nonces) >= _MAX_MIGRATE_NONCES:
            # Forget the oldest: a dict keeps insertion order, so the memory is the last 1024
            # nonces seen, as documented (set.pop() dropped an arbitrary one).
            del self._migrate_nonces[next(iter(self._migrate_nonces))]
        self._migrate_nonces[nonce] = None
        # The candidate itself was set by _on_new_path when this packet arrived.
        return 0

    # ------------------------------------------------------------------ gateway notices

    def _on_notice(self, bytes raw, addr, double now):
        """A cleartext gateway notice (palisade_c.pathinfo; docs/protocol.md, "Gateway
        notices" [profile]). Unauthenticated, so it can only narrow the path or prompt a
        check; accepted only from the peer's address and about our own RID."""
        if not self.is_client:
            self._drop("notice-unexpected")
            return
        try:
            notice = pathinfo.parse_notice(raw)
        except DecodeError:
            self._drop("notice-malformed")
            return
        if addr != self.peer_addr or (notice.rid != self.rid and notice.rid != self._hello_rid):
            self._drop("notice-unmatched")
            return
        if isinstance(notice, pathinfo.PathNotice):
            self._on_path_notice(notice.max_datagram, notice.link_bps)
        else:
            self._on_reboot_notice(notice.boot_counter, now)

    def _on_path_notice(self, int max_datagram, link_bps):
        cdef Flight flight
        cdef HandshakeRecord rec
        old = self.config
        cfg = pathinfo.narrow_config(old, max_datagram, link_bps)
        if cfg is old:
            return  # nothing smaller or slower than what we use: never raise on its word
        old_budget = self._handshake_budget()
        self.config = cfg
        self._ack_delay = cfg.initial_rto / 4 + cfg.link_time(2 * cfg.max_datagram_size)
        if self._has_hs_deadline:
            self._hs_deadline += self._handshake_budget() - old_budget
        self._log_event("path", {"max_datagram": cfg.max_datagram_size,
                                 "link_bps": cfg.link_bits_per_second})
        log.info("%s: path narrowed to %d-byte datagrams%s", self.name, cfg.max_datagram_size,
                 f" at {cfg.link_bits_per_second:g} bit/s" if cfg.link_bits_per_second else "")
        flight = self._flight
        if flight is None or flight._rid != self.rid \
                or max(len(r) for r in flight._records) <= cfg.max_datagram_size:
            return
        # Refragment the unacknowledged flight to the new size: its records are being dropped
        # on the way. At most twice at once per session (each notice must narrow, but a forged
        # stream of them must not make us resend a whole flight per notice); after that the
        # smaller records wait for the retransmission timer.
        message = bytearray(flight._msg_length)
        for raw in flight._records:
            rec = decode_ptr(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
            message[rec.frag_offset:rec.frag_offset + len(rec.fragment)] = rec.fragment
        # Kept in the instance dict: connection.pxd (shared by other modules) stays as it is.
        resends = getattr(self, "_path_resends", 0)
        if resends < 2:
            setattr(self, "_path_resends", resends + 1)
            self._send_message(flight._msg_type, flight._msg_seq, bytes(message))
        else:
            self._flight = Flight.from_message(flight._msg_type, self.rid, flight._msg_seq,
                                               bytes(message), cfg.max_datagram_size)

    def _on_reboot_notice(self, boot_counter, double now):
        """The gateway says the device restarted. Never a reason to end the session by itself
        (anyone can send this): a reason to check at once. Mid-handshake, resend the flight
        (rate-limited like any prompted resend); established, ask for a rekey, which a live
        peer answers with an authenticated announcement within a round trip. If nothing
        authenticated arrives by the probe deadline, the session is gone (§14.1)."""
        cfg = self.config
        if not self._fsm.established:
            self._resend_flight(prompted=True)
            return
        if getattr(self, "_probe", None) is not None:
            if self._probe_failed(now):  # due, and its timer has not run yet
                self._probe_lost()
                return
            if getattr(self, "_probe", None) is not None:
                return  # one probe at a time: a stream of notices costs one rekey
        self._client_request_rekey()
        if self._rekey_next < 0:
            # No request could go out (our receiver is still switching epochs, which itself
            # means the peer spoke moments ago): without a question there is no probe.
            self._drop("probe-deferred")
            return
        self._log_event("probe", {"boot_counter": boot_counter})
        log.info("%s: gateway reports a device restart (boot counter %#x); probing the "
                 "session", self.name, boot_counter)
        deadline = now + PROBE_TIMEOUT + 4 * cfg.link_time(cfg.max_datagram_size)
        setattr(self, "_probe", (self._last_recv, deadline, boot_counter))
        self._clamp_probe()

    def _clamp_probe(self):
        """Make the rekey timer (armed by the probe's request, or by a rekey in progress) fire
        by the probe deadline at the latest: handle_timer checks the probe then."""
        probe = getattr(self, "_probe", None)
        if probe is not None and (not self._has_rekey_deadline
                                  or self._rekey_deadline > probe[1]):
            self._rekey_deadline = probe[1]
            self._has_rekey_deadline = True

    def _probe_lost(self):
        self._fail(ErrorCode.ErrorSessionNotFound,
                   "the device behind the gateway restarted (no answer to the probe)",
                   send=False)

    def _probe_failed(self, double now):
        """True once a pending probe's deadline passed with nothing authenticated received
        since it began; clears a probe that is answered or expired."""
        probe = getattr(self, "_probe", None)
        if probe is None:
            return False
        last_recv, deadline, boot_counter = probe
        if self._last_recv > last_recv:
            setattr(self, "_probe", None)  # the peer answered: the session lives
            return False
        if now < deadline:
            return False
        setattr(self, "_probe", None)
        return True

    # ------------------------------------------------------------------ control frames

    cpdef _seal(self, payload, int stream_id, bint control=False):
        cdef bytes pkt
        cdef Py_ssize_t pad = 0
        assert self.record is not None
        sh = self._shaper
        if sh is not None:
            # Shaping changes only padding and departure time (spec §10.1); the record layer
            # seals every packet, nonce, epoch and seq as usual, when it leaves.
            if sh.mode == MODE_RATE:
                if not sh.bypass:
                    if stream_id == _STREAM_KEEPALIVE:
                        self._last_send = self._now  # the slots keep the path alive
                    elif control:
                        sh.control.append(bytes(payload))
                    else:
                        sh.data.append((bytes(payload), stream_id))
                    return
                pad = sh.slot_pad(len(payload))
            else:
                pad = sh.pad_for(len(payload), self.config.max_datagram_size)
        pkt = self.record._seal(payload, stream_id, control, pad, self._now)
        self._epoch_bytes += PyBytes_GET_SIZE(pkt)
        self._send_raw(pkt)

    cdef int _send_slot(self) except -1:
        """Mode 2: one slot's packet, of the session's fixed size: a queued control message,
        else queued data, else a dummy on stream 0xFF (docs §17.4)."""
        cdef bytes pkt
        sh = self._shaper
        payload, stream_id, control = sh.next_item()
        pkt = self.record._seal(payload, stream_id, control, sh.slot_pad(len(payload)),
                                self._now)
        self._epoch_bytes += PyBytes_GET_SIZE(pkt)
        self._send_raw(pkt)
        return 0

    def _send_control(self, *frames):
        self._seal(F.encode_frames(frames), 0, True)

    cdef int _send_frame(self, ControlFrame frame) except -1:
        """_send_control for the one frame every internal caller sends."""
        self._seal(F.encode_frames((frame,)), 0, True)
        return 0

    cdef int _on_control(self, Record rec, addr, double now) except -1:
        cdef ControlFrame frame
        cdef int t
        try:
            frames = F.decode_frames(rec.payload)
        except ControlFrameError:
            self._drop("malformed-control")
            return 0
        for frame in frames:
            t = frame.ctrl_type
            try:
                if t == F.CTRL_REKEY:
                    self._on_rekey_frame(frame, rec, now)
                elif t == F.CTRL_CLOSE:
                    self._on_close_frame(frame)
                elif t == F.CTRL_NEW_TICKET and self.is_client \
                        and self.plus_features & _PLUS_RESUMPTION:
                    self._on_new_ticket(frame)
                elif t == F.CTRL_MIGRATE:
                    self._on_migrate_frame(frame, rec)
                elif t == F.CTRL_PATH_CHALLENGE and self._migration():
                    data = F.decode_path(frame)
                    self._send_frame(F.encode_path(F.CTRL_PATH_RESPONSE, data))
                elif t == F.CTRL_PATH_RESPONSE and self._migration():
                    if self._path_challenge is not None \
                            and F.decode_path(frame) == self._path_challenge \
                            and addr == self._candidate:
                        self._promote_candidate()
                    else:
                        self._drop("stale-path-response")
                else:
                    # Unknown types, and PLUS types this session did not negotiate, are
                    # ignored [spec §14.3].
                    self._drop("ignored-control")
            except ControlFrameError:
                self._drop("malformed-control")
            if self._fsm.closed:
                return 0
        return 0

    cdef int _on_new_ticket(self, ControlFrame frame) except -1:
        lifetime, max_early, nonce, ticket = decode_new_ticket(frame)
        if self.resumption_secret is None or self.peer_fingerprint is None:
            return 0
        psk = ticket_psk(self.resumption_secret, nonce)
        try:
            saved = ClientTicket(ticket, bytes(psk), self.peer_fingerprint,
                                 self.config.ticket_clock() + lifetime, max_early)
        finally:
            wipe(psk)
        self._emit(NewTicket(saved))
        return 0

    # ------------------------------------------------------------------ rekeying

    cdef int _maybe_rekey(self, double now) except -1:
        cdef RecordLayer record = self.record
        if record is None or not self._fsm.established or self._rekey_next >= 0:
            return 0
        cfg = self.config
        due = (record.needs_rekey or self._epoch_bytes >= cfg.rekey_after_bytes
               or now >= self._epoch_started + <double>cfg.rekey_after_seconds)
        if not due:
            return 0
        if self.is_client:
            self._client_request_rekey()
        else:
            self._server_start_rekey(now)
        return 0

    cdef int _client_request_rekey(self) except -1:
        assert self.record is not None
        if self._rekey_next >= 0 or self.record.epochs.rx_state_name != "STEADY":
            return 0  # one already in progress
        if not self._fire("rekey_request"):
            return 0
        self._rekey_next = self.record.epoch + 1
        self._rekey_started = self._now
        self._send_frame(F.encode_rekey(self._rekey_next, F.REKEY_REQUEST))
        self._arm_rekey_timer(self._now)
        return 0

    cdef int _server_start_rekey(self, double now) except -1:
        cdef RecordLayer record = self.record
        assert record is not None
        epochs = record.epochs
        if self._rekey_next >= 0 or epochs.rx_state_name != "STEADY" \
                or epochs.install_pending:
            return 0
        if epochs.tx_state_name == "TRANSITION":
            # Both halves are on the current epoch; the key_phase hint has done its job.
            record.complete_transition()
        if self._fsm.name == "S_ESTABLISHED" and not self._fire("rekey_request"):
            return 0
        self._rekey_next = record.arm_next_epoch(now)
        self._rekey_started = now
        self._rekey_attempt = 1
        self._log_event("rekey-announce", {"next_epoch": self._rekey_next})
        self._send_frame(F.encode_rekey(self._rekey_next, F.REKEY_ANNOUNCE))
        self._arm_rekey_timer(now)
        return 0

    cdef int _arm_rekey_timer(self, double now) except -1:
        self._rekey_interval = self.config.rekey_retransmit
        if not self.is_client:
            # At least four announcements (or acks) fit in one attempt (docs §9).
            self._rekey_interval = min(self._rekey_interval,
                                       self.record.epochs.transition_bound / 4)
        self._rekey_deadline = now + self._rekey_interval
        self._has_rekey_deadline = True
        return 0

    cdef int _retransmit_rekey(self, double now) except -1:
        cdef RecordLayer record = self.record
        assert record is not None and self._rekey_next >= 0
        epochs = record.epochs
        kind = F.REKEY_REQUEST if self.is_client else F.REKEY_ANNOUNCE
        if not self.is_client:
            if epochs.rx_state_name == "STEADY" and epochs.epoch + 1 == self._rekey_next:
                # The back-off after an abandoned attempt ran out: arm the same epoch again
                # and announce it afresh (a new attempt, with a new transition bound).
                self._rekey_attempt += 1
                record.arm_next_epoch(now, self._rekey_next)
                self._log_event("rekey-retry", {"next_epoch": self._rekey_next,
                                                "attempt": self._rekey_attempt})
                self._send_frame(F.encode_rekey(self._rekey_next, F.REKEY_ANNOUNCE))
                self._arm_rekey_timer(now)
                return 0
            if not epochs.install_pending:
                # Installed on the client's evidence; its sender has not shown it finished
                # its transition yet (no key_phase 0 packet on the new epoch). Repeat our
                # ack on the new epoch: receiving one is what lets it finish (docs §9).
                if epochs.next_phase0_seen or epochs.rx_state_name == "STEADY":
                    self._has_rekey_deadline = False
                    return 0
                kind = F.REKEY_ACK
        self._send_frame(F.encode_rekey(self._rekey_next, kind))
        self._rekey_interval = min(self._rekey_interval * 2, <double>self.config.max_rto)
        if not self.is_client:
            self._rekey_interval = min(self._rekey_interval, epochs.transition_bound / 4)
        self._rekey_deadline = now + self._rekey_interval
        self._has_rekey_deadline = True
        return 0

    cdef double _rekey_budget(self):
        """Longest a rekey may run, from request or announcement to both sides committed:
        every attempt at its longest (2 transition times) plus the longest back-off."""
        cfg = self.config
        return _REKEY_ATTEMPTS * (2 * <double>self.record.epochs.transition_bound
                                  + max(<double>cfg.max_rto, <double>cfg.rekey_retransmit))

    cdef int _on_abandoned(self, double now) except -1:
        """Server: an attempt ended with no sign that the client moved. Its keys are gone;
        retry after a back-off, or give up after REKEY_ATTEMPTS attempts (docs §9)."""
        cdef double backoff
        self._abandons_seen = self.record.epochs.abandons
        self._log_event("rekey-abandoned", {"next_epoch": self._rekey_next,
                                            "attempt": self._rekey_attempt})
        if self.is_client or self._rekey_next < 0 or not self._fsm.established:
            self._has_rekey_deadline = False
            return 0
        if self._rekey_attempt >= _REKEY_ATTEMPTS:
            self._fail(ErrorCode.ErrorRekeyTimeout,
                       f"peer never moved to epoch {self._rekey_next} "
                       f"in {self._rekey_attempt} attempts", send=True)
            return 0
        backoff = min(<double>self.config.rekey_retransmit * (1 << (self._rekey_attempt - 1)),
                      <double>self.config.max_rto)
        self._rekey_deadline = now + backoff
        self._has_rekey_deadline = True
        return 0

    cdef int _on_rekey_frame(self, ControlFrame frame, Record rec, double now) except -1:
        cdef RecordLayer record = self.record
        assert record is not None
        next_epoch, kind = F.decode_rekey(frame)
        epochs = record.epochs
        if self.is_client:
            if kind == F.REKEY_ACK and next_epoch == epochs.send_epoch:
                # The server installed the epoch we send on. Opening this packet ended our
                # key_phase hint; answer, so the server sees a key_phase 0 packet from us even
                # if we have nothing else to send (it commits on those, docs §9). The server
                # repeats its ack only until it sees one, so this cannot ping-pong.
                self._send_frame(F.encode_rekey(next_epoch, F.REKEY_ACK))
                return 0
            if kind != F.REKEY_ANNOUNCE:
                self._drop("unexpected-rekey")
                return 0
            if (epochs.rx_state_name == "TRANSITION" and epochs.next_epoch is not None
                    and next_epoch == epochs.next_epoch + 1 and rec.epoch == epochs.next_epoch):
                # An authenticated announcement of the epoch after our pending one proves the
                # server finished the last rekey: commit ours explicitly before moving on.
                record.commit_epoch_transition()
            if epochs.tx_state_name == "TRANSITION" and next_epoch == epochs.send_epoch + 1 \
                    and epochs.epoch == epochs.send_epoch:
                record.complete_transition()
            if next_epoch == epochs.send_epoch and epochs.epoch + 1 >= next_epoch:
                # A duplicate announcement: we already moved. Re-acknowledge (idempotent).
                self._send_frame(F.encode_rekey(next_epoch, F.REKEY_ACK))
                return 0
            if next_epoch != epochs.epoch + 1 or epochs.rx_state_name != "STEADY" \
                    or epochs.install_pending:
                self._drop("unexpected-rekey")
                return 0
            # Seed §3: arm the receiver and install the sender at once, then ack on the new
            # epoch so the server learns we can open it.
            record.arm_next_epoch(now, next_epoch)
            record.install_next_epoch(now)
            if self._rekey_next < 0:
                self._rekey_started = now  # the server's rekey: our budget starts here
            self._rekey_next = next_epoch
            self._has_rekey_deadline = False
            self._log_event("rekey-armed", {"next_epoch": next_epoch})
            self._send_frame(F.encode_rekey(next_epoch, F.REKEY_ACK))
            return 0
        # server
        if kind == F.REKEY_REQUEST:
            if next_epoch == epochs.epoch + 1 and self._rekey_next < 0:
                self._server_start_rekey(now)
            elif self._rekey_next >= 0:
                pass  # already announced; the announcement's timer covers it
            else:
                self._drop("unexpected-rekey")
        elif kind == F.REKEY_ACK:
            if self._rekey_next == next_epoch:
                self._on_rekey_evidence(now)
            else:
                self._drop("stale-rekey-ack")
        else:
            self._drop("unexpected-rekey")
        return 0

    cdef int _on_rekey_evidence(self, double now) except -1:
        """The peer is on the new epoch. The server may now install its sender (PROFILE §6)."""
        assert self.record is not None
        epochs = self.record.epochs
        if self.is_client:
            self._has_rekey_deadline = False
            return 0
        if epochs.install_pending:
            self.record.install_next_epoch(now)
            self._log_event("rekey-installed", {"epoch": self.record.send_epoch})
            # Show the client at once that we moved: the first packet it opens on the new
            # epoch ends its key_phase hint, even if the application has nothing to send. The
            # ack is repeated (the rekey timer) until the client's key_phase 0 packets arrive.
            self._send_frame(F.encode_rekey(self.record.send_epoch, F.REKEY_ACK))
            self._arm_rekey_timer(now)
        if epochs.next_phase0_seen or epochs.rx_state_name == "STEADY":
            self._has_rekey_deadline = False
        return 0

    cdef int _after_epoch_activity(self, double now) except -1:
        """Report a committed epoch change once both halves are on it."""
        cdef RecordLayer record = self.record
        if record is None or record.erased:
            return 0
        epoch = record.epoch
        if epoch != self._reported_epoch and record.send_epoch == epoch:
            self._reported_epoch = epoch
            self._rekey_next = -1
            self._rekey_attempt = 0
            self._has_rekey_deadline = False
            self._epoch_started = now
            self._epoch_bytes = 0
            if self._fsm.name.endswith("_REKEY_PENDING"):
                self._fire("rekey_done")
            self._log_event("epoch", {"epoch": epoch})
            self._emit(EpochChanged(epoch))
        return 0

    # ------------------------------------------------------------------ close and abort

    cdef int _on_close_frame(self, ControlFrame frame) except -1:
        code, hard, reason = F.decode_close(frame)
        if hard:
            self._abort(code, reason, by_peer=True, send=False)
            return 0
        if self._fsm.name.endswith("_CLOSING"):
            if self._close_info is not None and self._close_info[2]:
                # The peer resent its close: our answer was lost. Answer again; no new state.
                self._send_frame(F.encode_close(0, False, ""))
                return 0
            self._fire("peer_close")  # the peer's answer to our close
            self._finish_close()
            return 0
        if not self._fire("peer_close"):
            return 0
        self._close_info = (code, reason, True)
        # Seed §6: close reasons SHOULD be logged. The reason is the peer's text: escaped.
        log.info("%s: closed by peer: %s: %s", self.name, code_name(code), printable(reason))
        self._has_rekey_deadline = False  # a closing session finishes no rekey
        self._log_event("peer-close", {"code": code})
        self._send_frame(F.encode_close(0, False, ""))  # answer, so the peer can finish
        self._drain_deadline = self._now + <double>self.config.close_drain_time
        self._has_drain_deadline = True
        return 0

    cdef int _resend_close(self) except -1:
        """Initiator while draining: send our close again, every third of the drain time."""
        if self._close_frame is None or not self._fsm.name.endswith("_CLOSING"):
            self._has_close_resend_at = False
            return 0
        self._send_frame(self._close_frame)
        self._close_resend_at = self._now + <double>self.config.close_drain_time / 3
        self._has_close_resend_at = True
        return 0

    cdef int _finish_close(self) except -1:
        if self._fsm.name.endswith("_CLOSING"):
            self._fire("drained")
        code, reason, by_peer = self._close_info or (0, "", False)
        self._teardown()
        self._emit(ConnectionClosed(code, reason, by_peer))
        self._log_event("closed", {"code": code, "by_peer": by_peer})
        return 0

    cdef int _idle_out(self) except -1:
        self._fire("idle_timeout")
        self._teardown()
        code = int(ErrorCode.ErrorIdleTimeout)
        self._emit(ConnectionClosed(code, "idle timeout: peer silent", False))
        self._log_event("closed", {"code": code, "reason": "idle"})
        return 0

    cdef int _expire_handshake(self) except -1:
        """Server: the session it answered never finished in time. The client may still be
        waiting for our ack of its Finished; tell it the half-open session is gone
        (ErrorSessionExpired, under the session RID) rather than leave it to its own timeout."""
        if self.rid:
            self._send_error_response(int(ErrorCode.ErrorSessionExpired),
                                      "handshake expired before the client finished it",
                                      self.rid)
        # Locally it is what it was: our handshake timed out.
        self._fail(ErrorCode.ErrorHandshakeTimeout, self._timeout_detail(), send=False)
        return 0

    cpdef _fail(self, int code, str detail, bint send):
        """We detected a fatal problem: tell the peer where allowed, then ABORT -> CLOSED."""
        self._abort(code, detail, by_peer=False, send=send)

    cdef int _abort(self, int code, str detail, bint by_peer, bint send) except -1:
        cdef str before
        if self._fsm.closed:
            return 0
        # The detail may be the peer's text (a close reason, an ErrorResponse): escaped, so it
        # cannot forge log lines or drive the terminal.
        log.info("%s: abort %s: %s", self.name, code_name(code), printable(detail))
        if send:
            if self.record is not None and not self.record.erased:
                if self._shaper is not None:
                    self._shaper.bypass = True  # the session ends now: no slot to wait for
                try:
                    self._send_frame(F.encode_close(code, True, detail[:64]))
                except StateError:
                    pass
            elif self.rid:
                self._send_error_response(code, detail, self.rid)
        before = self._fsm.name
        if not self._fsm.fire("fatal"):
            # Idle or listening: there is nothing to abort; just close.
            if self._fsm.fire("close"):
                self._log_event("transition", {"old": before, "event": "close",
                                               "new": self._fsm.name})
        else:
            self._log_event("transition", {"old": before, "event": "fatal",
                                           "new": self._fsm.name})
        self._teardown()
        before = self._fsm.name
        if self._fsm.fire("aborted"):
            self._log_event("transition", {"old": before, "event": "aborted",
                                           "new": self._fsm.name})
        self._emit(ConnectionClosed(code, detail, by_peer))
        self._log_event("closed", {"code": code, "by_peer": by_peer})
        return 0

    cdef int _teardown(self) except -1:
        """Erase every secret; stop every timer. Called on the way into CLOSED."""
        if self.record is not None:
            self.record.erase()
        for hs_obj in (self._client_hs, self._server_hs, self._resume_hs,
                       self._server_resume_hs):
            if hs_obj is not None:
                hs_obj.erase()
        self._client_hs = self._server_hs = None
        self._resume_hs = self._server_resume_hs = None
        if self._early is not None:
            self._early.erase()
            self._early = None
        if self.resumption_secret is not None:
            wipe(self.resumption_secret)
        self._flight = None
        self._flight_timer._stop()
        self._has_hs_deadline = self._has_drain_deadline = self._has_rekey_deadline = False
        self._has_close_resend_at = False
        self._pending_ack = None
        self._has_ack_deadline = False
        self._take_early_packets()
        self._amp_queue.clear()
        self._resume_args = None
        return 0
