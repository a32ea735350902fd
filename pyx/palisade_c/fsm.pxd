cdef class StateMachine:
    cdef readonly int role
    cdef readonly int state
    cdef tuple _names

    cpdef bint can(self, str event)
    cpdef bint fire(self, str event)
