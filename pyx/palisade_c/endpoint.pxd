# Declarations of the server endpoint (endpoint.pyx).

cimport cython

from palisade_c.connection cimport Connection, EarlyBufferPool


@cython.final
cdef class ServerEndpoint:
    cdef readonly object config
    cdef object _event_log
    cdef dict _by_rid               # RID -> session (first-flight and session RIDs)
    cdef dict _sessions             # session -> None: the live sessions, in arrival order
    cdef set _half_open
    cdef set _busy                  # sessions with output or events not yet collected
    cdef list _timers               # heap of (deadline, tiebreak, session)
    cdef dict _deadlines            # session -> its live deadline (None: no timer)
    cdef Py_ssize_t _tiebreak
    cdef object _cookies
    cdef list _out
    cdef object _events
    cdef dict _drops
    cdef EarlyBufferPool _early_pool
    cdef bint _has_purge_at                 # a ticket service to purge (PLUS)
    cdef double _purge_at
    cdef Py_ssize_t _serial
    cdef public Py_ssize_t retries_sent
    cdef public Py_ssize_t limit_replies_sent
    cdef double _limit_tokens               # ErrorSessionLimitExceeded token bucket
    cdef double _limit_refill_at
    cdef public object tickets

    cdef void _drop(self, str reason)
    cdef Connection _accept(self, bytes rid, object addr, double now)
    cdef void _send_retry(self, bytes rid, object addr, double now)
    cdef void _refuse_for_limit(self, bytes rid, object addr, double now)
    cdef void _collect(self, Connection conn)
    cdef void _evict_stalled(self, Connection conn, double now)
