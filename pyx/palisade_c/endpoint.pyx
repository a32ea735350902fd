# cython: language_level=3
"""Server endpoint: many sessions behind one transport, demultiplexed by RID (sans-IO).

Theory of operation
-------------------
Every PALISADE datagram carries its RID at bytes 6..30, in handshake records and encrypted
packets alike (PROFILE §4), so demultiplexing is one dictionary lookup; the source address is
not used to find a session, which is what lets a client's address change under it. Each session
is registered under two RIDs: the client's first-flight RID (so retransmitted ClientHello
fragments find it) and the session RID the server chose in its ServerHello.

A datagram with an unknown RID creates a session only if it is a ClientHello (or, PLUS, a
ClientHelloResume) fragment that decodes, and only within two limits:

* ``max_half_open`` sessions may be mid-handshake at once; beyond it new ones are dropped.
* Past ``cookie_threshold`` half-open sessions the endpoint stops allocating anything for a
  ClientHello until the client proves its address: it answers with a Retry record (type 0x7D)
  carrying a new RID whose 14 random bytes are a compact stateless cookie
  (HMAC-SHA3-256 over the client address, steering prefix and time). The client restarts its
  ClientHello under that RID; each fragment then carries the cookie, so it is checked per
  datagram without reassembly state, and a session created that way starts address-validated.

Every datagram a server receives goes through ``receive_datagram`` and ``_collect``, so the
endpoint is a cdef class with typed fields: the demultiplexing, the half-open bookkeeping and
the timer heap cost no attribute lookups per datagram.
"""


cimport cython

import heapq
import logging
from collections import deque
from typing import NamedTuple

from palisade_c import hsrecord as hs
from palisade_c import wire
from palisade_c.config import PLUS_RESUMPTION
from palisade_c.errors import DecodeError, ErrorCode
from palisade_c.reassembly import CookieIssuer
from palisade_c.tickets import PURGE_BACKLOG_DELAY, PURGE_BATCH, PURGE_INTERVAL, TicketService

from palisade_c.connection cimport Connection, EarlyBufferPool
from palisade_c.hsrecord cimport (
    HS_HEADER_LEN,
    MSG_CLIENT_HELLO,
    MSG_CLIENT_HELLO_RESUME,
    RID_LEN,
    RID_OFFSET,
)

COOKIE_LIFETIME = 30.0
#: ErrorSessionLimitExceeded answers: a token bucket of this many per second, this deep. Each
#: answer is smaller than the hello fragment it answers, and the bucket keeps a flood of
#: spoofed hellos from turning the server into a reflector.
LIMIT_REPLY_RATE = 20.0
LIMIT_REPLY_BURST = 20.0
_LIMIT_DETAIL = "server at its session limit; try again later"

log = logging.getLogger("palisade_c.endpoint")

_heappush = heapq.heappush
_heappop = heapq.heappop


def _cookie_addr(addr):
    """The address in the (host, port) form the cookie MAC takes. Transport addresses are
    opaque here (a serial device path, a gateway name); anything that is not a (host, port)
    tuple is bound by its text instead of making CookieIssuer raise."""
    if (isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], (str, bytes))
            and type(addr[1]) is int and 0 <= addr[1] <= 0xFFFF):
        return addr
    return (repr(addr), 0)


class EndpointEvent(NamedTuple):
    """An event from one of the endpoint's sessions."""

    connection: object
    event: object


@cython.final
cdef class ServerEndpoint:
    """Accepts handshakes from any address and routes every datagram to its session."""

    def __init__(self, config, *, event_log=None):
        self.config = config
        self._event_log = event_log
        self._by_rid = {}
        self._sessions = {}
        self._half_open = set()
        # Sessions with output or events not yet collected (set by Connection.on_wakeup).
        self._busy = set()
        # Timer heap of (deadline, tiebreak, session); _deadlines holds each session's live one.
        self._timers = []
        self._deadlines = {}
        self._tiebreak = 0
        # Workers of one server share the cookie key: a Retry's RID may steer elsewhere.
        secret = config.cookie_secret if config.cookie_secret is not None else config.rng(32)
        self._cookies = CookieIssuer(secret, COOKIE_LIFETIME, compact=True)
        self._out = []
        self._events = deque()
        self._drops = {}
        # Encrypted packets waiting for keys, all sessions together (config bound).
        self._early_pool = EarlyBufferPool(config.max_early_buffer_bytes)
        self._serial = 0
        self.retries_sent = 0
        self.limit_replies_sent = 0
        self._limit_tokens = LIMIT_REPLY_BURST
        self._limit_refill_at = 0.0
        #: Resumption tickets for every session (PLUS): the configured service, or an
        #: in-memory one when resumption is allowed and none was given.
        self.tickets = config.tickets
        if self.tickets is None and config.plus_features & PLUS_RESUMPTION:
            self.tickets = TicketService(bytes.fromhex(config.identity.fingerprint),
                                         rng=config.rng, clock=config.ticket_clock)
        # Used-ticket ids expire with their tickets; the store forgets them in batches driven
        # by this timer. The first purge runs at the first timer call (a backlog left by an
        # earlier run), then every PURGE_INTERVAL.
        self._has_purge_at = self.tickets is not None
        self._purge_at = 0.0

    # -- introspection ------------------------------------------------------------------------

    @property
    def connections(self):
        return list(self._sessions)

    @property
    def half_open(self):
        """Sessions still in their handshake (kept as a set, so admission costs O(1))."""
        return len(self._half_open)

    @property
    def drop_counts(self):
        out = dict(self._drops)
        if self._early_pool.refused:
            out["early-buffer-full"] = self._early_pool.refused
        return out

    @property
    def early_buffered_bytes(self):
        """Bytes of encrypted packets that sessions hold until their keys exist."""
        return self._early_pool.used

    cdef void _drop(self, str reason):
        self._drops[reason] = self._drops.get(reason, 0) + 1

    # -- sans-IO API ----------------------------------------------------------------------------

    def receive_datagram(self, data, addr, double now):
        cdef bytes raw = data if type(data) is bytes else bytes(data)
        if len(raw) < HS_HEADER_LEN:
            self._drop("truncated")
            return
        if raw[0] != 0x51 or (raw[1] != 0x48 and raw[1] != 0x50):
            # Not PALISADE at all (a port scan, another protocol): its own drop class, so
            # that the logs tell it apart from stale sessions (unknown-rid). [profile §11]
            self._drop("bad-magic")
            return
        rid = raw[RID_OFFSET:RID_OFFSET + RID_LEN]
        cdef Connection conn = self._by_rid.get(rid)
        if conn is None:
            if raw[0] != 0x51 or raw[1] != 0x48 or raw[3] not in (MSG_CLIENT_HELLO,
                                                                  MSG_CLIENT_HELLO_RESUME):
                self._drop("unknown-rid")
                return
            try:
                hs.decode(raw)
            except DecodeError:
                # Only a record that decodes may open a session. A session made for a mere
                # lookalike would never leave S_IDLE, so no timer would ever free its
                # half-open slot.
                self._drop("handshake-malformed")
                return
            conn = self._accept(rid, addr, now)
            if conn is None:
                return
        conn.receive_datagram(raw, addr, now)
        self._collect(conn)

    def datagrams_to_send(self, now=None):
        cdef Connection conn
        # Only sessions that queued something since the last call (on_wakeup) are visited.
        while self._busy:
            conn = self._busy.pop()
            if now is not None and conn._stale_mask:
                # An application call on the session armed deadlines without a time: they
                # count from now (Connection.datagrams_to_send does the same).
                conn._fresh(now)
            self._collect(conn)
        out, self._out = self._out, []
        return out

    def get_timer(self):
        cdef list heap = self._timers
        # Entries are never updated in place: a stale one (the session's deadline moved) is
        # skipped here, so the heap top is always a live deadline.
        while heap and self._deadlines.get(heap[0][2]) != heap[0][0]:
            _heappop(heap)
        best = heap[0][0] if heap else None
        if self._has_purge_at and (best is None or self._purge_at < best):
            return self._purge_at
        return best

    def handle_timer(self, double now):
        """Run every session whose deadline is due. Each is visited at most once per call: a
        session that still reports a deadline at or before ``now`` after its own
        ``handle_timer(now)`` breaks the timer invariant (a core bug); it is closed with
        ErrorInternal and counted under ``timer-stalled`` instead of being polled again, so
        one session can never hold the whole server in this loop."""
        cdef list heap = self._timers
        cdef Connection conn
        if self._has_purge_at and now >= self._purge_at:
            purged = self.tickets.purge_expired(PURGE_BATCH)
            self._purge_at = now + (PURGE_BACKLOG_DELAY if purged >= PURGE_BATCH
                                    else PURGE_INTERVAL)
        while heap and heap[0][0] <= now:
            t, _, conn = _heappop(heap)
            if self._deadlines.get(conn) != t:
                continue  # stale entry
            self._deadlines[conn] = None
            conn.handle_timer(now)
            self._collect(conn)
            after = self._deadlines.get(conn)
            if after is not None and after <= now:
                self._evict_stalled(conn, now)

    cdef void _evict_stalled(self, Connection conn, double now):
        self._drop("timer-stalled")
        log.error("%s: deadline did not advance past %.6f; session closed", conn.name, now)
        try:
            conn._fail(int(ErrorCode.ErrorInternal), "internal error: timer did not advance",
                       True)
        except Exception:  # noqa: BLE001 - a broken session must not take the server with it
            log.exception("%s: closing a stalled session failed", conn.name)
        self._collect(conn)
        if not conn._fsm.closed:
            # It would not even close: forget it all the same, so it is never polled again.
            self._deadlines.pop(conn, None)
            self._half_open.discard(conn)
            self._busy.discard(conn)
            for k in (conn._hello_rid, conn.rid):
                if self._by_rid.get(k) is conn:
                    del self._by_rid[k]
            self._sessions.pop(conn, None)

    def next_event(self):
        return self._events.popleft() if self._events else None

    def close(self, int error_code=0, str reason="server shutting down", now=None):
        """Soft-close every session; their drains count from ``now`` (see Connection.close)."""
        cdef Connection conn
        for conn in list(self._sessions):
            conn.close(error_code, reason, now)
            self._collect(conn)

    # -- internals --------------------------------------------------------------------------------

    cdef Connection _accept(self, bytes rid, object addr, double now):
        cdef Py_ssize_t half_open = len(self._half_open)
        # At either cap a legitimate client is told at once (spec §14: 0x0202, not fatal)
        # instead of waiting for its handshake timeout.
        if len(self._sessions) >= self.config.max_sessions:
            self._drop("session-limit")
            self._refuse_for_limit(rid, addr, now)
            return None
        if half_open >= self.config.max_half_open:
            self._drop("half-open-limit")
            self._refuse_for_limit(rid, addr, now)
            return None
        cdef bint validated = False
        if half_open >= self.config.cookie_threshold:
            prefix, cookie = rid[:8], rid[10:]
            if not self._cookies.check(cookie, _cookie_addr(addr), now, prefix):
                self._send_retry(rid, addr, now)
                return None
            validated = True
        self._serial += 1
        cdef Connection conn = Connection(self.config, False, event_log=self._event_log,
                          name=f"server-{self._serial}", tickets=self.tickets,
                          early_pool=self._early_pool)
        if validated:
            conn._amp.validate()  # the cookie proves the client receives at this address
        conn.on_wakeup = self._busy.add
        self._sessions[conn] = None
        self._half_open.add(conn)
        self._by_rid[rid] = conn
        return conn

    cdef void _refuse_for_limit(self, bytes rid, object addr, double now):
        """ErrorResponse(ErrorSessionLimitExceeded) under the hello's RID, rate-limited."""
        cdef double tokens = self._limit_tokens
        if now > self._limit_refill_at:
            tokens = min(LIMIT_REPLY_BURST,
                         tokens + (now - self._limit_refill_at) * LIMIT_REPLY_RATE)
            self._limit_refill_at = now
        if tokens < 1.0:
            self._limit_tokens = tokens
            self._drop("limit-reply-suppressed")
            return
        self._limit_tokens = tokens - 1.0
        body = wire.ErrorResponse(error_code=int(ErrorCode.ErrorSessionLimitExceeded),
                                  details=_LIMIT_DETAIL).encode()
        rec = hs.HandshakeRecord(hs.MSG_ERROR_RESPONSE, rid, 0, 0, len(body), body)
        self._out.append((rec.encode(), addr))
        self.limit_replies_sent += 1

    cdef void _send_retry(self, bytes rid, object addr, double now):
        # A Retry answers one ClientHello fragment with one small record: no amplification.
        new_rid = rid[:8] + b"\x00\x00" + self._cookies.make(_cookie_addr(addr), now, rid[:8])
        rec = hs.HandshakeRecord(hs.MSG_RETRY, rid, 0, 0, len(new_rid), new_rid)
        self._out.append((rec.encode(), addr))
        self.retries_sent += 1

    cdef void _collect(self, Connection conn):
        """Take a session's output and events and refresh its place in the timer heap."""
        self._busy.discard(conn)
        rid = conn.rid
        if rid and rid not in self._by_rid:
            self._by_rid[rid] = conn
        if conn._out:
            self._out.extend(conn.datagrams_to_send())
        while conn._events:
            self._events.append(EndpointEvent(conn, conn._events.popleft()))
        cdef bint closed = conn._fsm.closed
        if closed or conn._fsm.established:
            self._half_open.discard(conn)
        deadline = None if closed else conn.get_timer()
        if deadline != self._deadlines.get(conn):
            self._deadlines[conn] = deadline
            if deadline is not None:
                self._tiebreak += 1
                _heappush(self._timers, (deadline, self._tiebreak, conn))
        if closed:
            self._deadlines.pop(conn, None)
            # A session is registered under its first-flight RID and its session RID only.
            for k in (conn._hello_rid, conn.rid):
                if self._by_rid.get(k) is conn:
                    del self._by_rid[k]
            self._sessions.pop(conn, None)
