# cython: language_level=3
"""Client and server connection state machines (seed §1, §2, §6).

Theory of operation
-------------------
Each connection owns one ``StateMachine`` for its role. The machine knows nothing about
packets or keys: the connection decides *what happened* (a ServerHello arrived and parsed, the
signature verified, a close frame authenticated) and reports it as an event. The machine looks
the (state, event) pair up in its role's table and either moves to the listed state or refuses.
A refused event changes nothing; the connection then drops the packet that caused it and
counts it. Because every state change goes through ``fire``, a state can only be reached along
an edge in the table: invalid transitions cannot happen, not merely "should not".

The handshake edges follow the seed's state descriptions; the close and error edges follow
seed §6: a soft close goes through CLOSING (draining) to CLOSED, a fatal error through ABORT to
CLOSED, and CLOSED accepts no event at all. Resumption (PLUS) runs through C_RESUME_PENDING
and S_RESUME_WAIT_CHR; a refused ticket sends the client back to C_INITIATING for a full
handshake and ends the server's attempt.
"""

cimport cython

# -- states -------------------------------------------------------------------------------------

CLIENT_STATES = (
    "C_IDLE", "C_INITIATING", "C_WAIT_SH", "C_VERIFY_SH", "C_DERIVE_KEYS", "C_ESTABLISHED",
    "C_REKEY_PENDING", "C_RESUME_PENDING", "C_CLOSING", "C_ABORT", "C_CLOSED",
)
SERVER_STATES = (
    "S_IDLE", "S_LISTEN", "S_WAIT_CH", "S_VERIFY_CH", "S_PREPARE_SH", "S_WAIT_FIN",
    "S_DERIVE_KEYS", "S_ESTABLISHED", "S_REKEY_PENDING", "S_RESUME_WAIT_CHR", "S_CLOSING",
    "S_ABORT", "S_CLOSED",
)

# -- events -------------------------------------------------------------------------------------

EVENTS = (
    "connect",          # client: the application asked for a session
    "hello_sent",       # client: CH (or CHR) is on the wire
    "sh_received",      # client: a complete ServerHello arrived
    "sh_verified",      # client: SH algorithms, pinning, signature and KEM all good
    "keys_derived",     # both: traffic keys installed
    "rekey_request",    # client asks for a rekey / server announces one
    "rekey_done",       # the epoch change completed
    "resume",           # client: start resumption with a ticket
    "resume_accepted",  # ticket accepted
    "resume_rejected",  # ticket refused: fall back to a full handshake
    "listen",           # server: ready for a ClientHello
    "ch_received",      # server: a complete ClientHello arrived
    "ch_parsed",        # server: it decoded
    "ch_verified",      # server: version, algorithms, pinning good
    "sh_sent",          # server: SH is on the wire
    "fin_received",     # server: a complete ClientFinished arrived and verified
    "chr_received",     # server: a complete ClientHelloResume arrived
    "close",            # local soft close
    "peer_close",       # authenticated CTRL_CLOSE(hard=0) from the peer
    "drained",          # the close drain period ended
    "fatal",            # protocol violation, integrity failure, hard close, timeout
    "aborted",          # the abort was handled (keys erased, error sent)
    "idle_timeout",     # nothing heard for the idle timeout
)
cdef dict _EVENT_INDEX = {name: i for i, name in enumerate(EVENTS)}

# The tables, as readable edge lists; compiled into C arrays below.
_CLIENT_EDGES = (
    ("C_IDLE", "connect", "C_INITIATING"),
    ("C_IDLE", "resume", "C_RESUME_PENDING"),
    ("C_INITIATING", "hello_sent", "C_WAIT_SH"),
    ("C_WAIT_SH", "sh_received", "C_VERIFY_SH"),
    ("C_VERIFY_SH", "sh_verified", "C_DERIVE_KEYS"),
    ("C_DERIVE_KEYS", "keys_derived", "C_ESTABLISHED"),
    ("C_RESUME_PENDING", "resume_accepted", "C_DERIVE_KEYS"),
    ("C_RESUME_PENDING", "resume_rejected", "C_INITIATING"),
    ("C_ESTABLISHED", "rekey_request", "C_REKEY_PENDING"),
    ("C_REKEY_PENDING", "rekey_done", "C_ESTABLISHED"),
    # close: with keys there is something to drain; without, there is nothing to say.
    ("C_ESTABLISHED", "close", "C_CLOSING"),
    ("C_REKEY_PENDING", "close", "C_CLOSING"),
    ("C_INITIATING", "close", "C_CLOSED"),
    ("C_WAIT_SH", "close", "C_CLOSED"),
    ("C_RESUME_PENDING", "close", "C_CLOSED"),
    ("C_ESTABLISHED", "peer_close", "C_CLOSING"),
    ("C_REKEY_PENDING", "peer_close", "C_CLOSING"),
    ("C_CLOSING", "peer_close", "C_CLOSED"),
    ("C_CLOSING", "drained", "C_CLOSED"),
    ("C_ESTABLISHED", "idle_timeout", "C_CLOSED"),
    ("C_REKEY_PENDING", "idle_timeout", "C_CLOSED"),
    ("C_CLOSING", "idle_timeout", "C_CLOSED"),
    ("C_INITIATING", "fatal", "C_ABORT"),
    ("C_WAIT_SH", "fatal", "C_ABORT"),
    ("C_VERIFY_SH", "fatal", "C_ABORT"),
    ("C_DERIVE_KEYS", "fatal", "C_ABORT"),
    ("C_RESUME_PENDING", "fatal", "C_ABORT"),
    ("C_ESTABLISHED", "fatal", "C_ABORT"),
    ("C_REKEY_PENDING", "fatal", "C_ABORT"),
    ("C_CLOSING", "fatal", "C_ABORT"),
    ("C_ABORT", "aborted", "C_CLOSED"),
)

_SERVER_EDGES = (
    ("S_IDLE", "listen", "S_LISTEN"),
    ("S_LISTEN", "ch_received", "S_WAIT_CH"),
    ("S_LISTEN", "chr_received", "S_RESUME_WAIT_CHR"),
    ("S_WAIT_CH", "ch_parsed", "S_VERIFY_CH"),
    ("S_VERIFY_CH", "ch_verified", "S_PREPARE_SH"),
    ("S_PREPARE_SH", "sh_sent", "S_WAIT_FIN"),
    ("S_WAIT_FIN", "fin_received", "S_DERIVE_KEYS"),
    ("S_DERIVE_KEYS", "keys_derived", "S_ESTABLISHED"),
    ("S_RESUME_WAIT_CHR", "resume_accepted", "S_PREPARE_SH"),
    ("S_RESUME_WAIT_CHR", "resume_rejected", "S_CLOSED"),
    ("S_RESUME_WAIT_CHR", "close", "S_CLOSED"),
    ("S_ESTABLISHED", "rekey_request", "S_REKEY_PENDING"),
    ("S_REKEY_PENDING", "rekey_done", "S_ESTABLISHED"),
    ("S_ESTABLISHED", "close", "S_CLOSING"),
    ("S_REKEY_PENDING", "close", "S_CLOSING"),
    ("S_LISTEN", "close", "S_CLOSED"),
    ("S_WAIT_CH", "close", "S_CLOSED"),
    ("S_WAIT_FIN", "close", "S_CLOSED"),
    ("S_ESTABLISHED", "peer_close", "S_CLOSING"),
    ("S_REKEY_PENDING", "peer_close", "S_CLOSING"),
    ("S_CLOSING", "peer_close", "S_CLOSED"),
    ("S_CLOSING", "drained", "S_CLOSED"),
    ("S_ESTABLISHED", "idle_timeout", "S_CLOSED"),
    ("S_REKEY_PENDING", "idle_timeout", "S_CLOSED"),
    ("S_CLOSING", "idle_timeout", "S_CLOSED"),
    ("S_WAIT_CH", "fatal", "S_ABORT"),
    ("S_VERIFY_CH", "fatal", "S_ABORT"),
    ("S_PREPARE_SH", "fatal", "S_ABORT"),
    ("S_WAIT_FIN", "fatal", "S_ABORT"),
    ("S_DERIVE_KEYS", "fatal", "S_ABORT"),
    ("S_RESUME_WAIT_CHR", "fatal", "S_ABORT"),
    ("S_ESTABLISHED", "fatal", "S_ABORT"),
    ("S_REKEY_PENDING", "fatal", "S_ABORT"),
    ("S_CLOSING", "fatal", "S_ABORT"),
    ("S_ABORT", "aborted", "S_CLOSED"),
)

cdef enum:
    _MAX_STATES = 16
    _MAX_EVENTS = 32

# _TABLE[role][state][event] = next state, or -1.
cdef int _TABLE[2][_MAX_STATES][_MAX_EVENTS]


cdef void _build(int role, tuple states, tuple edges) except *:
    cdef int s, e
    index = {name: i for i, name in enumerate(states)}
    for s in range(_MAX_STATES):
        for e in range(_MAX_EVENTS):
            _TABLE[role][s][e] = -1
    for src, ev, dst in edges:
        _TABLE[role][index[src]][_EVENT_INDEX[ev]] = index[dst]


assert len(SERVER_STATES) <= _MAX_STATES and len(EVENTS) <= _MAX_EVENTS
_build(0, CLIENT_STATES, _CLIENT_EDGES)
_build(1, SERVER_STATES, _SERVER_EDGES)


def transition_table(bint server) -> dict:
    """``{(state, event): next_state}`` for a role, read back from the compiled table."""
    cdef int role = 1 if server else 0
    states = SERVER_STATES if server else CLIENT_STATES
    out = {}
    for s in range(len(states)):
        for e in range(len(EVENTS)):
            if _TABLE[role][s][e] >= 0:
                out[(states[s], EVENTS[e])] = states[_TABLE[role][s][e]]
    return out


def event_id(str name) -> int:
    """Index of an event name (KeyError for an unknown one)."""
    return _EVENT_INDEX[name]


@cython.final
cdef class StateMachine:
    """The state of one connection; moves only along its role's table."""

    def __init__(self, bint server):
        self.role = 1 if server else 0
        self._names = SERVER_STATES if server else CLIENT_STATES
        self._enter(0)

    cdef inline void _enter(self, int state):
        cdef str name = self._names[state]
        self.state = state
        self.name = name
        self.closed = name.endswith("_CLOSED")
        self.established = name.endswith("_ESTABLISHED") or name.endswith("_REKEY_PENDING")

    cpdef bint can(self, str event):
        return _TABLE[self.role][self.state][<int>_EVENT_INDEX[event]] >= 0

    cpdef bint fire(self, str event):
        """Apply ``event``. True if the table allowed it; False (and no change) if not."""
        cdef int nxt = _TABLE[self.role][self.state][<int>_EVENT_INDEX[event]]
        if nxt < 0:
            return False
        self._enter(nxt)
        return True

    @property
    def is_server(self) -> bool:
        return self.role == 1

    def __repr__(self) -> str:
        return f"StateMachine({self.name})"
