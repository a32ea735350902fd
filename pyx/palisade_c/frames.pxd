cdef class ControlFrame:
    cdef readonly int ctrl_type
    cdef readonly bytes data
