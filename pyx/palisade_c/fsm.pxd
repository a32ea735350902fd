cdef class StateMachine:
    cdef readonly int role
    cdef readonly int state
    cdef tuple _names
    # Derived from ``state`` on every move, so the per-datagram checks are field reads.
    cdef readonly str name
    cdef readonly bint closed
    cdef readonly bint established

    cdef inline void _enter(self, int state)

    cpdef bint can(self, str event)
    cpdef bint fire(self, str event)
