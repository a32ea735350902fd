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
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from palisade_c import frames as F
from palisade_c import hsrecord as hs
from palisade_c import wire
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.errors import (
    ControlFrameError,
    DecodeError,
    ErrorCode,
    HandshakeError,
    StateError,
    code_name,
)
from palisade_c.events import (
    ConnectionClosed,
    DataReceived,
    EpochChanged,
    Event,
    HandshakeCompleted,
    NewTicket,
    PathMigrated,
)
from palisade_c.fsm import StateMachine
from palisade_c.handshake import (
    ClientHandshake,
    ClientResumeHandshake,
    HandshakeResult,
    ServerHandshake,
    ServerResumeHandshake,
)
from palisade_c.keyschedule import ticket_psk, wipe
from palisade_c.reassembly import (
    AmplificationLimiter,
    Flight,
    FragmentStatus,
    ReassemblyTable,
    RetransmitTimer,
)
from palisade_c.record import STREAM_DUMMY, STREAM_KEEPALIVE, Record, RecordLayer
from palisade_c.tickets import (
    TICKET_NONCE_LEN,
    ClientTicket,
    TicketService,
    decode_new_ticket,
    encode_new_ticket,
)

Addr = Any  # a transport address: (host, port) for UDP, a path for serial links

log = logging.getLogger("palisade_c.connection")

#: Encrypted packets that may wait for the server's keys (PROFILE §3).
MAX_EARLY_PACKETS = 16
#: Migrate nonces remembered per session to refuse replays (each is 32 random bytes).
MAX_MIGRATE_NONCES = 1024
_FINISHED_TYPES = (hs.MSG_CLIENT_FINISHED, hs.MSG_CLIENT_FINISHED_RESUME)
#: Bytes a full handshake puts on the wire (both directions, ML-KEM-768 + ML-DSA-65): what a
#: slow link needs time for on top of the configured handshake timeout.
HANDSHAKE_WIRE_BYTES = 16_500
#: Bytes of the reply each flight waits for. A flight's first retransmission timeout must
#: cover the reply's airtime too, or on a slow link it fires while the reply is still arriving.
_REPLY_BYTES = {
    hs.MSG_CLIENT_HELLO: 8_000,
    hs.MSG_SERVER_HELLO: 4_600,
    hs.MSG_CLIENT_FINISHED: 64,
    hs.MSG_CLIENT_HELLO_RESUME: 2_400,
    hs.MSG_SERVER_HELLO_RESUME: 1_200,
    hs.MSG_CLIENT_FINISHED_RESUME: 64,
}
#: Largest application stream id; 0xFE and 0xFF are keepalive and dummy.
MAX_APP_STREAM = 0xFD
MAX_ERROR_DETAIL = 200

EventLog = Callable[[dict[str, Any]], None]


class Connection:
    """A client or server session. See the module docstring for the calling convention."""

    def __init__(
        self,
        config: Config,
        is_client: bool,
        *,
        event_log: EventLog | None = None,
        name: str = "",
        tickets: TicketService | None = None,
    ) -> None:
        self.config = config
        self.is_client = is_client
        self.name = name or ("client" if is_client else "server")
        #: Called whenever this session queues output or an event, even from an application
        #: call such as send_data(); the server endpoint uses it to visit only busy sessions.
        self.on_wakeup: Callable[[Connection], None] | None = None
        self._fsm = StateMachine(not is_client)
        self._event_log = event_log
        self._rand = config.jitter
        self._now = 0.0
        self._out: list[tuple[bytes, Addr]] = []
        self._events: deque[Event] = deque()
        self.peer_addr: Addr | None = None
        #: The session RID (server's choice, carried by SH); the client's first-flight rid
        #: until then.
        self.rid: bytes = b""
        self._hello_rid: bytes = b""
        self.record: RecordLayer | None = None
        self.peer_fingerprint: str | None = None
        self.plus_features = 0
        self.resumption_secret: bytearray | None = None
        self._client_hs: ClientHandshake | None = None
        self._server_hs: ServerHandshake | None = None
        # PALISADE-PLUS: resumption, 0-RTT and migration.
        self._tickets = tickets if tickets is not None else config.tickets
        self._resume_hs: ClientResumeHandshake | None = None
        self._server_resume_hs: ServerResumeHandshake | None = None
        self._early: RecordLayer | None = None  # 0-RTT keys (client seals, server opens)
        self._early_budget = 0
        self._early_bytes = 0
        self.resumed = False
        self._candidate: Addr | None = None
        self._candidate_count = 0
        self._candidate_since = 0.0
        self._candidate_amp: AmplificationLimiter | None = None
        self._path_challenge: bytes | None = None
        self._migrate_nonces: set[bytes] = set()
        self._last_addr: Addr | None = None
        self._reasm = ReassemblyTable(4, max_age=config.handshake_timeout)
        self._flight: Flight | None = None
        self._flight_addr: Addr | None = None
        self._flight_timer = self._new_timer()
        self._hs_deadline: float | None = None
        self._flight_sent_at = 0.0
        self._retried = False
        self._pending_ack: tuple[bytes, int, int] | None = None  # reassembly key
        self._ack_deadline: float | None = None
        # A quarter of the first retransmission timeout, stretched on slow links so the ack
        # does not race the rest of the burst still crossing the wire.
        self._ack_delay = config.initial_rto / 4 + config.link_time(2 * config.max_datagram_size)
        # Server side before the client proved its address (PROFILE §8).
        self._amp = AmplificationLimiter(config.amplification_factor)
        self._amp_queue: deque[bytes] = deque()
        self._early_packets: list[bytes] = []
        # Session timers.
        self._last_recv = 0.0
        self._last_send = 0.0
        self._drain_deadline: float | None = None
        self._close_info: tuple[int, str, bool] | None = None
        # The close we sent, resent while draining: a single lost frame must not leave the
        # peer waiting for its idle timeout.
        self._close_frame: F.ControlFrame | None = None
        self._close_resend_at: float | None = None
        # Rekey bookkeeping.
        self._epoch_started = 0.0
        self._epoch_bytes = 0
        self._rekey_next: int | None = None
        self._rekey_deadline: float | None = None
        self._rekey_interval = config.rekey_retransmit
        self._reported_epoch = 0
        # Counters.
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.hs_bytes_in = 0
        self.hs_bytes_out = 0
        self._drops: dict[str, int] = {}

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> str:
        """The seed's state name: C_IDLE ... C_CLOSED or S_IDLE ... S_CLOSED."""
        return self._fsm.name

    @property
    def established(self) -> bool:
        return self._fsm.established

    @property
    def closed(self) -> bool:
        return self._fsm.closed

    @property
    def epoch(self) -> int:
        if self.record is not None and not self.record.erased:
            return self.record.epoch
        return self._reported_epoch

    @property
    def drop_counts(self) -> dict[str, int]:
        """Dropped input by reason: the record layer's counters plus the connection's own."""
        out = dict(self._drops)
        for layer in (self.record, self._early):
            if layer is not None:
                for k, v in layer.drop_counts.items():
                    out[k] = out.get(k, 0) + v
        return out

    @property
    def counters(self) -> dict[str, Any]:
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

    def connect(self, addr: Addr, now: float, *, ticket: ClientTicket | None = None,
                early_data: bytes | None = None, early_stream: int = 0) -> None:
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
        self._flight_addr = addr
        self._hs_deadline = now + self._handshake_budget()
        self._new_hello_rid()
        if ticket is not None and ticket.usable(self.config.ticket_clock()):
            self._start_resumption(ticket, early_data, early_stream)
            return
        self._fire("connect")
        self._start_full_handshake()

    def _new_hello_rid(self) -> None:
        node_id = self.config.node_id
        if node_id is None:
            rand = self.config.rng(22)  # a random steering prefix and the RID's random tail
            self._hello_rid = self.rid = rand[:8] + b"\x00\x00" + rand[8:]
        else:
            self._hello_rid = self.rid = node_id + b"\x00\x00" + self.config.rng(14)

    def _start_full_handshake(self) -> None:
        self._client_hs = ClientHandshake(self.config)
        self._send_flight(
            Flight.from_message(
                hs.MSG_CLIENT_HELLO, self.rid, 0, self._client_hs.client_hello_bytes,
                self.config.max_datagram_size,
            ),
            self.peer_addr,
        )
        self._fire("hello_sent")

    def _start_resumption(self, ticket: ClientTicket, early_data: bytes | None,
                          early_stream: int) -> None:
        self._fire("resume")
        offer = early_data is not None and ticket.max_early_data > 0
        self._resume_hs = ClientResumeHandshake(self.config, ticket, offer)
        self._send_flight(
            Flight.from_message(hs.MSG_CLIENT_HELLO_RESUME, self.rid, 0,
                                self._resume_hs.hello_bytes, self.config.max_datagram_size),
            self.peer_addr,
        )
        secret = self._resume_hs.early_secret
        if early_data is None or secret is None:
            return
        self._early = RecordLayer(secret, True, self._hello_rid, early=True,
                                  replay_window=self.config.replay_window)
        wipe(secret)
        # Never more than the ticket allows: the server would refuse the rest anyway.
        data = early_data[:ticket.max_early_data]
        room = self.config.max_datagram_size - 61
        for i in range(0, len(data), room) if data else range(1):
            self._send_raw(self._early.seal(data[i:i + room], early_stream, False, 0, self._now))

    def _fallback_to_full_handshake(self, code: int) -> None:
        """The server refused our ticket: forget it and run a full handshake [seed §4]."""
        self._log_event("resumption-refused", code=code)
        if self._resume_hs is not None:
            self._resume_hs.erase()
        self._resume_hs = None
        if self._early is not None:
            self._early.erase()
            self._early = None
        self._flight_timer.stop()
        self._fire("resume_rejected")
        self._new_hello_rid()
        self._start_full_handshake()

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Feed one datagram from the transport. Never raises for anything in ``data``."""
        self._now = now
        if self._fsm.closed:
            self._drop("closed")
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) < 2:
            self._drop("truncated")
            return
        if data[0] == 0x51 and data[1] == 0x48:  # "QH"
            self.hs_bytes_in += len(data)
            if not self.is_client and not self._amp.validated:
                self._amp.on_received(len(data))
            self._on_handshake_datagram(data, addr, now)
            if self._amp_queue:
                self._flush_amplification()
        elif data[0] == 0x51 and data[1] == 0x50:  # "QP"
            self._on_packet(data, addr, now)
        else:
            self._drop("bad-magic")

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[bytes, Addr]]:
        """Everything queued for the transport, in order. Clears the queue."""
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        """The earliest time at which handle_timer() has work, or None."""
        if self._fsm.closed:
            return None
        best: float | None = None
        # A plain loop over the candidates: this runs after every datagram on a server.
        for t in (self._flight_timer.deadline, self._hs_deadline, self._drain_deadline,
                  self._rekey_deadline, self._ack_deadline, self._close_resend_at):
            if t is not None and (best is None or t < best):
                best = t
        record = self.record
        if record is not None and not record.erased:
            cfg = self.config
            t = record.get_timer()
            if t is not None and (best is None or t < best):
                best = t
            if self._fsm.established:
                t = min(self._last_recv + cfg.idle_timeout,
                        self._last_send + cfg.keepalive_interval)
                if self._rekey_next is None:  # the age trigger waits while a rekey runs
                    t = min(t, self._epoch_started + cfg.rekey_after_seconds)
                if best is None or t < best:
                    best = t
        return best

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now``: retransmissions, timeouts, keepalives, commits."""
        self._now = now
        if self._fsm.closed:
            return
        if self._hs_deadline is not None and now >= self._hs_deadline:
            self._fail(ErrorCode.ErrorHandshakeTimeout, "handshake timed out", send=False)
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._send_pending_ack()
        if self._flight_timer.due(now):
            if self._flight_timer.on_timeout(now):
                self._resend_flight()
            elif not self._fsm.established:
                self._fail(ErrorCode.ErrorHandshakeTimeout, "no answer to the handshake",
                           send=False)
                return
            else:
                # Established on our side, yet the server never acknowledged CF nor sent one
                # authenticated packet (either clears the flight): the session never formed.
                self._fail(ErrorCode.ErrorHandshakeTimeout,
                           "server never confirmed the handshake", send=False)
                return
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._drain_deadline = None
            self._finish_close()
            return
        if self._close_resend_at is not None and now >= self._close_resend_at:
            self._resend_close()
        if self.record is None or self.record.erased:
            return
        self.record.handle_timer(now)
        self._after_epoch_activity(now)
        if self._fsm.established:
            if now >= self._last_recv + self.config.idle_timeout:
                self._idle_out()
                return
            if self._rekey_deadline is not None and now >= self._rekey_deadline:
                self._retransmit_rekey(now)
            self._maybe_rekey(now)
            if now >= self._last_send + self.config.keepalive_interval:
                self._seal(b"", STREAM_KEEPALIVE)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def send_data(self, data: bytes, stream_id: int = 0) -> None:
        """Encrypt ``data`` as one packet on ``stream_id`` (0..253)."""
        if not 0 <= stream_id <= MAX_APP_STREAM:
            raise ValueError(f"stream_id must be 0..{MAX_APP_STREAM}")
        if not self._fsm.established:
            raise StateError(f"cannot send in state {self.state}")
        self._seal(data, stream_id)
        self._maybe_rekey(self._now)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Soft close: send CTRL_CLOSE(hard=0), drain for a bounded time, then CLOSED."""
        if not 0 <= error_code <= 0xFFFF:
            raise ValueError("error_code must fit in u16")
        if self._fsm.closed or self.state.endswith(("_CLOSING", "_ABORT", "_IDLE")):
            return
        if self.record is None:
            # No keys: nothing to drain and no authenticated way to tell the peer.
            if self._fire("close"):
                self._close_info = (error_code, reason, False)
                self._finish_close()
            return
        self._close_info = (error_code, reason, False)
        self._close_frame = F.encode_close(error_code, False, reason)
        self._send_control(self._close_frame)
        self._fire("close")
        self._drain_deadline = self._now + self.config.close_drain_time
        self._close_resend_at = self._now + self.config.close_drain_time / 3

    def request_rekey(self) -> None:
        """Ask for new keys now (client: a request; server: an announcement)."""
        if not self._fsm.established or self.record is None:
            raise StateError(f"cannot rekey in state {self.state}")
        if self.is_client:
            self._client_request_rekey()
        else:
            self._server_start_rekey(self._now)

    # ------------------------------------------------------------------ internals: plumbing

    def _handshake_budget(self) -> float:
        """The configured handshake timeout plus twice the handshake's airtime on this link."""
        return self.config.handshake_timeout + 2 * self.config.link_time(HANDSHAKE_WIRE_BYTES)

    def _new_timer(self) -> RetransmitTimer:
        return RetransmitTimer(
            self._rand, initial=self.config.initial_rto,
            maximum=max(self.config.max_rto, self.config.initial_rto),
        )

    def _fire(self, event: str) -> bool:
        before = self._fsm.name
        if not self._fsm.fire(event):
            self._drop("illegal-event")
            log.debug("%s: event %s refused in %s", self.name, event, before)
            return False
        log.debug("%s: %s --%s--> %s", self.name, before, event, self._fsm.name)
        self._log_event("transition", old=before, event=event, new=self._fsm.name)
        return True

    def _drop(self, reason: str) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + 1

    def _log_event(self, kind: str, **fields: Any) -> None:
        if self._event_log is not None:
            self._event_log({"t": round(self._now, 6), "conn": self.name, "kind": kind,
                             **fields})

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if self.on_wakeup is not None:
            self.on_wakeup(self)

    def _send_raw(self, data: bytes, addr: Addr | None = None, *, handshake: bool = False
                  ) -> None:
        target = self.peer_addr if addr is None else addr
        if handshake:
            # Handshake traffic has its own counters; packets/bytes in and out are the
            # encrypted data plane in both directions alike.
            self.hs_bytes_out += len(data)
            if not self.is_client and not self._amp.validated:
                if self._amp_queue or not self._amp.can_send(len(data)):
                    self._amp_queue.append(data)
                    return
                self._amp.on_sent(len(data))
        else:
            self.packets_out += 1
            self.bytes_out += len(data)
            amp = self._candidate_amp
            if addr is None and amp is not None and amp.can_send(len(data)):
                # The peer is talking from a candidate path it has not proven yet: answer
                # there, within its 3x budget (PROFILE §8), as QUIC does; otherwise the old
                # path, which may be gone, would swallow every reply until validation.
                amp.on_sent(len(data))
                target = self._candidate
        self._out.append((data, target))
        if self.on_wakeup is not None:
            self.on_wakeup(self)
        self._last_send = self._now

    def _flush_amplification(self) -> None:
        while self._amp_queue and (self._amp.validated
                                   or self._amp.can_send(len(self._amp_queue[0]))):
            data = self._amp_queue.popleft()
            if not self._amp.validated:
                self._amp.on_sent(len(data))
            self._out.append((data, self.peer_addr))
            if self.on_wakeup is not None:
                self.on_wakeup(self)

    def _send_flight(self, flight: Flight, addr: Addr | None = None) -> None:
        self._flight = flight
        self._flight_addr = addr
        self._flight_timer = self._new_timer()
        airtime_bytes = flight.total_bytes + _REPLY_BYTES.get(flight.msg_type, 0)
        self._flight_timer.scale_for_link(airtime_bytes, self.config.link_bits_per_second)
        for rec in flight.records:
            self._send_raw(rec, addr, handshake=True)
        self._flight_sent_at = self._now
        self._flight_timer.start(self._now)

    def _resend_flight(self, *, prompted: bool = False) -> None:
        """Resend what the peer has not acknowledged. ``prompted``: because the peer repeated
        an earlier message; such resends happen at most once per retransmission timeout, so
        a burst of duplicates cannot multiply the traffic on a slow link."""
        if self._flight is None:
            return
        if prompted and self._now - self._flight_sent_at < self._flight_timer.rto:
            self._drop("resend-suppressed")
            return
        self._flight_sent_at = self._now
        for rec in self._flight.records_to_resend():
            self._send_raw(rec, self._flight_addr, handshake=True)

    def _send_error_response(self, code: int, detail: str, rid: bytes) -> None:
        body = wire.ErrorResponse(error_code=int(code),
                                  details=detail[:MAX_ERROR_DETAIL]).encode()
        rec = hs.HandshakeRecord(hs.MSG_ERROR_RESPONSE, rid, 0, 0, len(body), body)
        self._send_raw(rec.encode(), handshake=True)

    # ------------------------------------------------------------------ handshake datagrams

    def _on_handshake_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        try:
            rec = hs.decode(data)
        except DecodeError:
            self._drop("handshake-malformed")
            return
        if self.is_client:
            self._client_on_record(rec, addr, now)
        else:
            self._server_on_record(rec, addr, now)

    def _on_ack(self, rec: hs.HandshakeRecord) -> None:
        try:
            ack = hs.decode_ack(rec.fragment)
        except DecodeError:
            self._drop("handshake-malformed")
            return
        flight = self._flight
        if flight is None or not flight.on_ack(ack):
            self._drop("stale-ack")
            return
        if flight.acknowledged:
            self._flight_timer.stop()
            if self._fsm.established:
                self._flight = None

    def _reassemble(self, rec: hs.HandshakeRecord, now: float) -> bytes | None:
        """Add a fragment; acknowledge partial progress; return the message when complete."""
        result = self._reasm.add(rec, now, ack=False)
        if result.status in (FragmentStatus.MALFORMED, FragmentStatus.REFUSED):
            self._drop("handshake-" + result.status.value)
            return None
        if result.status is FragmentStatus.COMPLETE:
            # The reply (or the explicit CF ack) tells the peer everything arrived.
            self._pending_ack = None
            self._ack_deadline = None
            return result.message
        # Delayed ack: a burst of fragments earns one ack, sent only if the message is still
        # incomplete when the delay runs out (that is when the sender needs it). The ack is
        # built then, from what is held then.
        self._pending_ack = (rec.rid, rec.msg_type, rec.msg_seq)
        if self._ack_deadline is None:
            self._ack_deadline = now + self._ack_delay
        return None

    def _send_pending_ack(self) -> None:
        if self._pending_ack is not None:
            reasm = self._reasm.get(self._pending_ack)
            if reasm is not None and reasm.started and not reasm.is_complete:
                self._send_raw(reasm.ack().to_record(self._pending_ack[0]), handshake=True)
        self._pending_ack = None
        self._ack_deadline = None

    # client --------------------------------------------------------------------------------

    def _client_on_record(self, rec: hs.HandshakeRecord, addr: Addr, now: float) -> None:
        t = rec.msg_type
        if t == hs.MSG_HANDSHAKE_ACK:
            if rec.rid in (self._hello_rid, self.rid):
                self._on_ack(rec)
            else:
                self._drop("unknown-rid")
        elif t == hs.MSG_ERROR_RESPONSE:
            self._client_on_error_response(rec)
        elif t == hs.MSG_RETRY:
            self._client_on_retry(rec)
        elif t == hs.MSG_SERVER_HELLO:
            self._client_on_server_hello(rec, now)
        elif t == hs.MSG_SERVER_HELLO_RESUME:
            self._client_on_server_hello_resume(rec, now)
        else:
            self._drop("unexpected-handshake")

    def _error_response(self, rec: hs.HandshakeRecord) -> wire.ErrorResponse | None:
        try:
            return wire.ErrorResponse.decode(rec.fragment)
        except DecodeError:
            self._drop("handshake-malformed")
            return None

    def _client_on_error_response(self, rec: hs.HandshakeRecord) -> None:
        # Only an error that answers our own handshake, while it can still fail, counts.
        cf_unconfirmed = (self._flight is not None
                          and self._flight.msg_type in _FINISHED_TYPES)
        awaiting = self.state in ("C_WAIT_SH", "C_RESUME_PENDING") or cf_unconfirmed
        if rec.rid not in (self._hello_rid, self.rid) or not awaiting:
            self._drop("stale-error-response")
            return
        err = self._error_response(rec)
        if err is None:
            return
        if self.state == "C_RESUME_PENDING":
            self._fallback_to_full_handshake(err.error_code)
            return
        self._abort(err.error_code, f"server refused the handshake: {err.text}", by_peer=True,
                    send=False)

    def _client_on_retry(self, rec: hs.HandshakeRecord) -> None:
        if self.state != "C_WAIT_SH" or rec.rid != self._hello_rid or self._retried:
            self._drop("stale-retry")
            return
        new_rid = rec.fragment
        if len(new_rid) != hs.RID_LEN or new_rid[:8] != self._hello_rid[:8]:
            self._drop("handshake-malformed")
            return
        assert self._client_hs is not None
        self._retried = True
        self._hello_rid = self.rid = new_rid
        self._log_event("retry")
        self._send_flight(
            Flight.from_message(hs.MSG_CLIENT_HELLO, new_rid, 0,
                                self._client_hs.client_hello_bytes,
                                self.config.max_datagram_size),
            self._flight_addr,
        )

    def _server_reply(self, rec: hs.HandshakeRecord, now: float, waiting: str) -> bytes | None:
        """A fragment of SH or SHR: the whole reply once complete, else None."""
        if self.state != waiting:
            if self._flight is not None and self._flight.msg_type in _FINISHED_TYPES:
                # The server is still resending its hello: our Finished is lost. Resend what
                # the server has not acknowledged.
                self._resend_flight(prompted=True)
            else:
                self._drop("unexpected-handshake")
            return None
        # A client that targeted a node id expects the session RID to keep that steering
        # prefix (PROFILE §4). One that did not used a random prefix, and the server puts its
        # own node id there, so there is nothing to compare.
        if self.config.node_id is not None and rec.rid[:8] != self._hello_rid[:8]:
            self._drop("unknown-rid")
            return None
        # Any fragment of the reply proves the server has our hello: stop resending it.
        # Missing reply fragments are the server's to resend (its timer, prompted by our
        # delayed ack).
        self._flight_timer.stop()
        return self._reassemble(rec, now)

    def _client_on_server_hello(self, rec: hs.HandshakeRecord, now: float) -> None:
        message = self._server_reply(rec, now, "C_WAIT_SH")
        if message is None:
            return
        if not self._fire("sh_received"):
            return
        assert self._client_hs is not None
        try:
            cf = self._client_hs.on_server_hello(message)
        except HandshakeError as exc:
            self.rid = rec.rid
            self._fail(exc.code, exc.detail, send=True)
            return
        result = self._client_hs.result
        assert result is not None
        self._fire("sh_verified")
        self.rid = rec.rid
        self._flight_timer.stop()
        self._send_flight(
            Flight.from_message(hs.MSG_CLIENT_FINISHED, self.rid, 1, cf,
                                self.config.max_datagram_size),
        )
        self._install_keys(result, now)

    def _client_on_server_hello_resume(self, rec: hs.HandshakeRecord, now: float) -> None:
        message = self._server_reply(rec, now, "C_RESUME_PENDING")
        if message is None:
            return
        resume = self._resume_hs
        assert resume is not None
        try:
            cfr = resume.on_server_hello_resume(message)
        except HandshakeError as exc:
            self.rid = rec.rid
            self._fail(exc.code, exc.detail, send=True)
            return
        result = resume.result
        assert result is not None
        self._fire("resume_accepted")
        self.rid = rec.rid
        self._flight_timer.stop()
        self._send_flight(
            Flight.from_message(hs.MSG_CLIENT_FINISHED_RESUME, self.rid, 1, cfr,
                                self.config.max_datagram_size),
        )
        if self._early is not None:
            self._early.erase()  # 1-RTT keys from here on
            self._early = None
        self._install_keys(result, now, early_data_accepted=resume.accepted_0rtt)
        self._resume_hs = None

    # server --------------------------------------------------------------------------------

    def _server_on_record(self, rec: hs.HandshakeRecord, addr: Addr, now: float) -> None:
        t = rec.msg_type
        if self.state == "S_IDLE":
            self._fire("listen")
        if t == hs.MSG_CLIENT_HELLO:
            self._server_on_client_hello(rec, addr, now)
        elif t in _FINISHED_TYPES:
            self._server_on_client_finished(rec, addr, now)
        elif t == hs.MSG_CLIENT_HELLO_RESUME:
            self._server_on_client_hello_resume(rec, addr, now)
        elif t == hs.MSG_HANDSHAKE_ACK:
            if rec.rid == self.rid:
                self._amp.validate()  # only a peer that saw SH knows the session RID
                self._on_ack(rec)
            else:
                self._drop("unknown-rid")
        elif t == hs.MSG_ERROR_RESPONSE:
            if rec.rid != self.rid or self.state != "S_WAIT_FIN":
                self._drop("stale-error-response")
                return
            err = self._error_response(rec)
            if err is None:
                return
            self._abort(err.error_code, f"client refused the handshake: {err.text}",
                        by_peer=True, send=False)
        else:
            self._drop("unexpected-handshake")

    def _client_hello(self, rec: hs.HandshakeRecord, addr: Addr, now: float, first: str,
                      waiting: str, resumed: bool) -> bytes | None:
        """A fragment of CH (or CHR): the whole hello once complete, else None."""
        if self.state == "S_LISTEN":
            self.peer_addr = addr
            self._hello_rid = rec.rid
            self._hs_deadline = now + self._handshake_budget()
            self._fire(first)
        elif rec.rid != self._hello_rid:
            self._drop("unknown-rid")
            return None
        if self.state != waiting:
            # The hello again: our reply (or part of it) was lost. Resend what is missing.
            if self.state == "S_WAIT_FIN" and resumed == (self._server_resume_hs is not None) \
                    and self._reasm.add(rec, now).status is not FragmentStatus.MALFORMED:
                self._resend_flight(prompted=True)
            else:
                self._drop("unexpected-handshake")
            return None
        return self._reassemble(rec, now)

    def _new_session_rid(self, hello_rid: bytes) -> bytes:
        """The server's session RID: its node id (or the client's prefix), rotation epoch 0,
        14 random bytes (PROFILE §4)."""
        prefix = self.config.node_id if self.config.node_id is not None else hello_rid[:8]
        return prefix + b"\x00\x00" + self.config.rng(14)

    def _server_on_client_hello(self, rec: hs.HandshakeRecord, addr: Addr, now: float) -> None:
        message = self._client_hello(rec, addr, now, "ch_received", "S_WAIT_CH", False)
        if message is None:
            return
        self._server_hs = ServerHandshake(self.config)
        try:
            sh = self._server_hs.on_client_hello(message)
        except HandshakeError as exc:
            self.rid = self._hello_rid
            self._fail(exc.code, exc.detail, send=True)
            return
        self._fire("ch_parsed")
        self._fire("ch_verified")
        self.rid = self._new_session_rid(rec.rid)
        self._send_flight(
            Flight.from_message(hs.MSG_SERVER_HELLO, self.rid, 0, sh,
                                self.config.max_datagram_size),
        )
        self._fire("sh_sent")

    def _server_on_client_hello_resume(self, rec: hs.HandshakeRecord, addr: Addr,
                                       now: float) -> None:
        message = self._client_hello(rec, addr, now, "chr_received", "S_RESUME_WAIT_CHR", True)
        if message is None:
            return
        self.rid = self._hello_rid
        tickets = self._tickets
        if tickets is None or not self.config.plus_features & PLUS_RESUMPTION:
            self._refuse_resumption(int(ErrorCode.ErrorTicketInvalid), "resumption disabled")
            return
        resume = ServerResumeHandshake(self.config, tickets)
        try:
            shr = resume.on_client_hello_resume(message)
        except HandshakeError as exc:
            if 0x0400 <= exc.code <= 0x04FF:
                self._refuse_resumption(int(exc.code), exc.detail)
            else:
                self._fail(exc.code, exc.detail, send=True)
            return
        self._server_resume_hs = resume
        self._fire("resume_accepted")
        self.rid = self._new_session_rid(rec.rid)
        self._send_flight(
            Flight.from_message(hs.MSG_SERVER_HELLO_RESUME, self.rid, 0, shr,
                                self.config.max_datagram_size),
        )
        self._fire("sh_sent")
        if resume.accept_0rtt and resume.early_secret is not None and resume.inner is not None:
            self._early = RecordLayer(resume.early_secret, False, self._hello_rid, early=True,
                                      replay_window=self.config.replay_window)
            wipe(resume.early_secret)
            self._early_budget = resume.inner.max_early_data  # the ticket's, not the offer
        waiting, self._early_packets = self._early_packets, []
        for pkt in waiting:
            self._on_packet(pkt, self.peer_addr, now)

    def _refuse_resumption(self, code: int, detail: str) -> None:
        """Tell the client its ticket is no good so it falls back; this session ends."""
        self._send_error_response(code, detail, self._hello_rid)
        self._log_event("resumption-refused", code=code)
        self._fire("resume_rejected")
        self._teardown()
        self._emit(ConnectionClosed(code, detail, False))

    def _server_on_client_finished(self, rec: hs.HandshakeRecord, addr: Addr, now: float
                                   ) -> None:
        if rec.rid != self.rid:
            self._drop("unknown-rid")
            return
        self._amp.validate()  # the client echoes the session RID: it received our SH
        if self.state != "S_WAIT_FIN":
            if self._fsm.established:
                # CF retransmitted: our ack was lost. The table answers with a full ack.
                again = self._reasm.add(rec, now)
                if again.ack is not None:
                    self._send_raw(again.ack.to_record(self.rid), handshake=True)
                return
            self._drop("unexpected-handshake")
            return
        resumed = rec.msg_type == hs.MSG_CLIENT_FINISHED_RESUME
        if resumed != (self._server_resume_hs is not None):
            self._drop("unexpected-handshake")  # CF for a resumption, or CFR for a full one
            return
        self._flight_timer.stop()  # a CF fragment proves SH arrived
        message = self._reassemble(rec, now)
        if message is None:
            return
        try:
            if self._server_resume_hs is not None:
                result = self._server_resume_hs.on_client_finished_resume(message)
            else:
                assert self._server_hs is not None
                result = self._server_hs.on_client_finished(message)
        except HandshakeError as exc:
            self._fail(exc.code, exc.detail, send=True)
            return
        self._fire("fin_received")
        ack = hs.HandshakeAck(rec.msg_type, rec.msg_seq, [(0, len(message))])
        self._send_raw(ack.to_record(self.rid), handshake=True)
        self._flight = None
        self._server_resume_hs = None
        if self._early is not None:
            self._early.erase()  # the 0-RTT window closes once 1-RTT keys exist
            self._early = None
        self._install_keys(result, now)
        early, self._early_packets = self._early_packets, []
        for pkt in early:
            self._on_packet(pkt, self.peer_addr, now)

    def _install_keys(self, result: HandshakeResult, now: float, *,
                      early_data_accepted: bool = False) -> None:
        cfg = self.config
        self.record = RecordLayer(
            result.master_secret, self.is_client, self.rid,
            replay_window=cfg.replay_window, commit_threshold=cfg.commit_threshold,
            max_transition_time=cfg.max_transition_time,
        )
        wipe(result.master_secret)  # the record layer derived what it needs and kept no copy
        self.resumption_secret = result.resumption_secret
        self.peer_fingerprint = result.peer_fingerprint
        self.plus_features = result.plus_features
        self._hs_deadline = None
        self._client_hs = self._server_hs = None
        self.resumed = result.resumed
        self._last_recv = self._last_send = self._epoch_started = now
        self._fire("keys_derived")
        self._log_event("established", peer=result.peer_fingerprint[:16], resumed=self.resumed)
        self._emit(HandshakeCompleted(result.peer_fingerprint, resumed=self.resumed,
                                      plus_features=self.plus_features,
                                      early_data_accepted=early_data_accepted))
        if not self.is_client:
            self._issue_ticket(result)

    def _issue_ticket(self, result: HandshakeResult) -> None:
        """Server: one NEW_TICKET after every (full or resumed) handshake, when negotiated."""
        tickets = self._tickets
        if tickets is None or not self.plus_features & PLUS_RESUMPTION \
                or self.resumption_secret is None:
            return
        nonce = self.config.rng(TICKET_NONCE_LEN)
        psk = ticket_psk(self.resumption_secret, nonce)
        try:
            ticket = tickets.issue(psk, nonce, bytes.fromhex(result.peer_fingerprint),
                                   result.kem, result.sig, result.aead)
        finally:
            wipe(psk)
        self._send_control(encode_new_ticket(tickets.lifetime, tickets.max_early_data, nonce,
                                             ticket))

    # ------------------------------------------------------------------ encrypted packets

    def _on_packet(self, data: bytes, addr: Addr, now: float) -> None:
        if self._early is not None and not self.is_client and len(data) >= 30 \
                and data[6:30] == self._hello_rid and self._hello_rid != self.rid:
            self._on_early_packet(data, now)  # 0-RTT packets carry the first-flight RID
            return
        record = self.record
        if record is None or record.erased:
            if not self.is_client and self.state in ("S_WAIT_FIN", "S_RESUME_WAIT_CHR") \
                    and len(self._early_packets) < MAX_EARLY_PACKETS:
                # Data may overtake CF, and 0-RTT data may overtake CHR (PROFILE §3, §7).
                self._early_packets.append(data)
            else:
                self._drop("no-keys")
            return
        rec = record.open(data, now)
        if rec is None:
            return
        self._last_addr = addr
        if addr != self.peer_addr and self.peer_addr is not None and not self.is_client:
            self._on_new_path(addr, len(data), now)
        self.packets_in += 1
        self.bytes_in += len(data)
        self._epoch_bytes += len(data)
        self._last_recv = now
        if self._flight is not None and self.is_client:
            # Any packet under the new keys proves the server has our CF (PROFILE §3).
            self._flight = None
            self._flight_timer.stop()
        if self._rekey_next is not None and rec.epoch == self._rekey_next:
            self._on_rekey_evidence(now)
        if rec.control:
            self._on_control(rec, now)
        elif rec.stream_id != STREAM_KEEPALIVE and rec.stream_id != STREAM_DUMMY:
            if self.state.endswith("_CLOSED"):
                return
            self._emit(DataReceived(rec.stream_id, rec.payload))
        self._after_epoch_activity(now)

    def _on_early_packet(self, data: bytes, now: float) -> None:
        """Server: one 0-RTT packet. Replayable, so only allowlisted streams and keepalives,
        never a control frame, and never past the ticket's allowance [spec §12.8, seed §4]."""
        assert self._early is not None
        rec = self._early.open(data, now)
        if rec is None:
            return
        if rec.control:
            self._drop("early-control-ignored")
            return
        if rec.stream_id == STREAM_KEEPALIVE or rec.stream_id == STREAM_DUMMY:
            return
        if rec.stream_id not in self.config.early_data_streams:
            self._drop("early-stream-refused")
            return
        if self._early_bytes + len(rec.payload) > self._early_budget:
            self._drop("early-data-limit")
            return
        self._early_bytes += len(rec.payload)
        self.packets_in += 1
        self.bytes_in += len(data)
        self._emit(DataReceived(rec.stream_id, rec.payload, early=True))

    # ------------------------------------------------------------------ migration (PLUS)

    @property
    def _migration(self) -> bool:
        return bool(self.plus_features & PLUS_MIGRATION)

    def migrate(self) -> None:
        """Client: announce that our address changed (soft migration, spec §13.2).

        Call after the transport moved to its new address; the next packet carries
        CTRL_MIGRATE from there, and the server validates the new path before using it."""
        if not self.is_client or not self._fsm.established or self.record is None:
            raise StateError("migrate() is for an established client")
        if not self._migration:
            raise StateError("migration was not negotiated (PALISADE-PLUS feature 0x02)")
        self._send_control(F.encode_migrate(self.config.rng(32), self.record.epoch))

    def _on_new_path(self, addr: Addr, size: int, now: float) -> None:
        """Server: an authenticated packet came from an address other than the primary path:
        NAT rebinding, or a migration whose CTRL_MIGRATE is inside this very packet. Both make
        the address a candidate; the primary path changes only once it is validated."""
        if not self._migration:
            self._drop("path-change-ignored")  # CORE: the session stays on its path
            return
        if addr != self._candidate:
            self._candidate = addr
            self._candidate_count = 0
            self._candidate_since = now
            self._candidate_amp = AmplificationLimiter(self.config.amplification_factor)
            self._path_challenge = self.config.rng(32)
            self._candidate_amp.on_received(size)
            self._log_event("path-candidate")
            self._send_path_challenge()
        else:
            assert self._candidate_amp is not None
            self._candidate_amp.on_received(size)
        self._candidate_count += 1
        if now - self._candidate_since > self.config.migration_window:
            # Too slow to count as one burst: start counting again from this packet.
            self._candidate_since = now
            self._candidate_count = 1
        if self._candidate_count >= self.config.migration_packets:
            self._promote_candidate()

    def _send_path_challenge(self) -> None:
        assert self.record is not None and self._path_challenge is not None
        frame = F.encode_path(F.CTRL_PATH_CHALLENGE, self._path_challenge)
        pkt = self.record.seal(F.encode_frames([frame]), 0, True, 0, self._now)
        amp = self._candidate_amp
        # An unvalidated path gets at most 3x what it sent us (PROFILE §8).
        if amp is not None and amp.can_send(len(pkt)):
            amp.on_sent(len(pkt))
            self._out.append((pkt, self._candidate))
            self.packets_out += 1
            self.bytes_out += len(pkt)
            if self.on_wakeup is not None:
                self.on_wakeup(self)
        else:
            self._drop("amplification-deferred")

    def _promote_candidate(self) -> None:
        self.peer_addr = self._candidate
        self._candidate = None
        self._candidate_amp = None
        self._path_challenge = None
        self._log_event("path-migrated")
        self._emit(PathMigrated(self.peer_addr))

    def _on_migrate_frame(self, frame: F.ControlFrame, rec: Record, addr: Addr) -> None:
        nonce, _observed, reason = F.decode_migrate(frame)
        if self.is_client or not self._migration:
            self._drop("ignored-control")
            return
        if nonce in self._migrate_nonces:
            self._drop("migrate-replay")  # single use [spec §13]
            return
        if reason != F.MIGRATE_REASON_SOFT or self.record is None \
                or rec.epoch != self.record.epoch:
            self._drop("migrate-invalid")
            return
        if len(self._migrate_nonces) >= MAX_MIGRATE_NONCES:
            self._migrate_nonces.pop()
        self._migrate_nonces.add(nonce)
        # The candidate itself was set by _on_new_path when this packet arrived.

    def _seal(self, payload: bytes, stream_id: int, control: bool = False) -> None:
        assert self.record is not None
        pkt = self.record.seal(payload, stream_id, control, 0, self._now)
        self._epoch_bytes += len(pkt)
        self._send_raw(pkt)

    def _send_control(self, *frames: F.ControlFrame) -> None:
        self._seal(F.encode_frames(frames), 0, True)

    def _on_control(self, rec: Record, now: float) -> None:
        try:
            frames = F.decode_frames(rec.payload)
        except ControlFrameError:
            self._drop("malformed-control")
            return
        for frame in frames:
            try:
                if frame.ctrl_type == F.CTRL_REKEY:
                    self._on_rekey_frame(frame, rec, now)
                elif frame.ctrl_type == F.CTRL_CLOSE:
                    self._on_close_frame(frame)
                elif frame.ctrl_type == F.CTRL_NEW_TICKET and self.is_client \
                        and self.plus_features & PLUS_RESUMPTION:
                    self._on_new_ticket(frame)
                elif frame.ctrl_type == F.CTRL_MIGRATE:
                    self._on_migrate_frame(frame, rec, self._last_addr)
                elif frame.ctrl_type == F.CTRL_PATH_CHALLENGE and self._migration:
                    data = F.decode_path(frame)
                    self._send_control(F.encode_path(F.CTRL_PATH_RESPONSE, data))
                elif frame.ctrl_type == F.CTRL_PATH_RESPONSE and self._migration:
                    if self._path_challenge is not None \
                            and F.decode_path(frame) == self._path_challenge \
                            and self._last_addr == self._candidate:
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
                return

    def _on_new_ticket(self, frame: F.ControlFrame) -> None:
        lifetime, max_early, nonce, ticket = decode_new_ticket(frame)
        if self.resumption_secret is None or self.peer_fingerprint is None:
            return
        psk = ticket_psk(self.resumption_secret, nonce)
        try:
            saved = ClientTicket(ticket, bytes(psk), self.peer_fingerprint,
                                 self.config.ticket_clock() + lifetime, max_early)
        finally:
            wipe(psk)
        self._emit(NewTicket(saved))

    # ------------------------------------------------------------------ rekeying

    def _maybe_rekey(self, now: float) -> None:
        record = self.record
        if record is None or not self._fsm.established or self._rekey_next is not None:
            return
        cfg = self.config
        due = (record.needs_rekey or self._epoch_bytes >= cfg.rekey_after_bytes
               or now >= self._epoch_started + cfg.rekey_after_seconds)
        if not due:
            return
        if self.is_client:
            self._client_request_rekey()
        else:
            self._server_start_rekey(now)

    def _client_request_rekey(self) -> None:
        assert self.record is not None
        if self._rekey_next is not None or self.record.epochs.rx_state_name != "STEADY":
            return  # one already in progress
        if not self._fire("rekey_request"):
            return
        self._rekey_next = self.record.epoch + 1
        self._send_control(F.encode_rekey(self._rekey_next, F.REKEY_REQUEST))
        self._arm_rekey_timer(self._now)

    def _server_start_rekey(self, now: float) -> None:
        record = self.record
        assert record is not None
        epochs = record.epochs
        if self._rekey_next is not None or epochs.rx_state_name != "STEADY" \
                or epochs.install_pending:
            return
        if epochs.tx_state_name == "TRANSITION":
            # Both halves are on the current epoch; the key_phase hint has done its job.
            record.complete_transition()
        if self.state == "S_ESTABLISHED" and not self._fire("rekey_request"):
            return
        self._rekey_next = record.arm_next_epoch(now)
        self._log_event("rekey-announce", next_epoch=self._rekey_next)
        self._send_control(F.encode_rekey(self._rekey_next, F.REKEY_ANNOUNCE))
        self._arm_rekey_timer(now)

    def _arm_rekey_timer(self, now: float) -> None:
        self._rekey_interval = self.config.rekey_retransmit
        self._rekey_deadline = now + self._rekey_interval

    def _retransmit_rekey(self, now: float) -> None:
        assert self.record is not None and self._rekey_next is not None
        kind = F.REKEY_REQUEST if self.is_client else F.REKEY_ANNOUNCE
        self._send_control(F.encode_rekey(self._rekey_next, kind))
        self._rekey_interval = min(self._rekey_interval * 2, self.config.max_rto)
        self._rekey_deadline = now + self._rekey_interval

    def _on_rekey_frame(self, frame: F.ControlFrame, rec: Record, now: float) -> None:
        record = self.record
        assert record is not None
        next_epoch, kind = F.decode_rekey(frame)
        epochs = record.epochs
        if self.is_client:
            if kind == F.REKEY_ACK and next_epoch == epochs.next_epoch:
                return  # the server installed the new epoch; the packet itself is the proof
            if kind != F.REKEY_ANNOUNCE:
                self._drop("unexpected-rekey")
                return
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
                self._send_control(F.encode_rekey(next_epoch, F.REKEY_ACK))
                return
            if next_epoch != epochs.epoch + 1 or epochs.rx_state_name != "STEADY" \
                    or epochs.install_pending:
                self._drop("unexpected-rekey")
                return
            # Seed §3: arm the receiver and install the sender at once, then ack on the new
            # epoch so the server learns we can open it.
            record.arm_next_epoch(now, next_epoch)
            record.install_next_epoch(now)
            self._rekey_next = next_epoch
            self._rekey_deadline = None
            self._log_event("rekey-armed", next_epoch=next_epoch)
            self._send_control(F.encode_rekey(next_epoch, F.REKEY_ACK))
            return
        # server
        if kind == F.REKEY_REQUEST:
            if next_epoch == epochs.epoch + 1 and self._rekey_next is None:
                self._server_start_rekey(now)
            elif self._rekey_next is not None:
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

    def _on_rekey_evidence(self, now: float) -> None:
        """The peer is on the new epoch. The server may now install its sender (PROFILE §6)."""
        assert self.record is not None
        if not self.is_client and self.record.epochs.install_pending:
            self.record.install_next_epoch(now)
            self._log_event("rekey-installed", epoch=self.record.send_epoch)
            # Show the client at once that we moved, so its transition clock starts even if
            # the application has nothing to send.
            self._send_control(F.encode_rekey(self.record.send_epoch, F.REKEY_ACK))
        if self.is_client or not self.record.epochs.install_pending:
            self._rekey_deadline = None

    def _after_epoch_activity(self, now: float) -> None:
        """Report a committed epoch change once both halves are on it."""
        record = self.record
        if record is None or record.erased:
            return
        epoch = record.epoch
        if epoch != self._reported_epoch and record.send_epoch == epoch:
            self._reported_epoch = epoch
            self._rekey_next = None
            self._rekey_deadline = None
            self._epoch_started = now
            self._epoch_bytes = 0
            if self.state.endswith("_REKEY_PENDING"):
                self._fire("rekey_done")
            self._log_event("epoch", epoch=epoch)
            self._emit(EpochChanged(epoch))

    # ------------------------------------------------------------------ close and abort

    def _on_close_frame(self, frame: F.ControlFrame) -> None:
        code, hard, reason = F.decode_close(frame)
        if hard:
            self._abort(code, reason, by_peer=True, send=False)
            return
        if self.state.endswith("_CLOSING"):
            if self._close_info is not None and self._close_info[2]:
                # The peer resent its close: our answer was lost. Answer again; no new state.
                self._send_control(F.encode_close(0, False, ""))
                return
            self._fire("peer_close")  # the peer's answer to our close
            self._finish_close()
            return
        if not self._fire("peer_close"):
            return
        self._close_info = (code, reason, True)
        self._log_event("peer-close", code=code)
        self._send_control(F.encode_close(0, False, ""))  # answer, so the peer can finish
        self._drain_deadline = self._now + self.config.close_drain_time

    def _resend_close(self) -> None:
        """Initiator while draining: send our close again, every third of the drain time."""
        if self._close_frame is None or not self.state.endswith("_CLOSING"):
            self._close_resend_at = None
            return
        self._send_control(self._close_frame)
        self._close_resend_at = self._now + self.config.close_drain_time / 3

    def _finish_close(self) -> None:
        if self.state.endswith("_CLOSING"):
            self._fire("drained")
        code, reason, by_peer = self._close_info or (0, "", False)
        self._teardown()
        self._emit(ConnectionClosed(code, reason, by_peer))
        self._log_event("closed", code=code, by_peer=by_peer)

    def _idle_out(self) -> None:
        self._fire("idle_timeout")
        self._teardown()
        code = int(ErrorCode.ErrorIdleTimeout)
        self._emit(ConnectionClosed(code, "idle timeout: peer silent", False))
        self._log_event("closed", code=code, reason="idle")

    def _fail(self, code: int, detail: str, *, send: bool) -> None:
        """We detected a fatal problem: tell the peer where allowed, then ABORT -> CLOSED."""
        self._abort(code, detail, by_peer=False, send=send)

    def _abort(self, code: int, detail: str, *, by_peer: bool, send: bool) -> None:
        if self._fsm.closed:
            return
        log.info("%s: abort %s: %s", self.name, code_name(code), detail)
        if send:
            if self.record is not None and not self.record.erased:
                try:
                    self._send_control(F.encode_close(code, True, detail[:64]))
                except StateError:
                    pass
            elif self.rid:
                self._send_error_response(code, detail, self.rid)
        before = self._fsm.name
        if not self._fsm.fire("fatal"):
            # Idle or listening: there is nothing to abort; just close.
            if self._fsm.fire("close"):
                self._log_event("transition", old=before, event="close", new=self._fsm.name)
        else:
            self._log_event("transition", old=before, event="fatal", new=self._fsm.name)
        self._teardown()
        before = self._fsm.name
        if self._fsm.fire("aborted"):
            self._log_event("transition", old=before, event="aborted", new=self._fsm.name)
        self._emit(ConnectionClosed(int(code), detail, by_peer))
        self._log_event("closed", code=int(code), by_peer=by_peer)

    def _teardown(self) -> None:
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
        self._flight_timer.stop()
        self._hs_deadline = self._drain_deadline = self._rekey_deadline = None
        self._close_resend_at = None
        self._pending_ack = self._ack_deadline = None
        self._early_packets.clear()
        self._amp_queue.clear()
