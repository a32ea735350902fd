# C-level view of the handshake message codecs in wire.pyx (PROFILE §2, §7).
# Other compiled modules may cimport these classes to read fields without Python attribute
# lookups. Every class is final: decode() builds instances without running __init__, so a
# subclass could never rely on its own constructor having run.
cimport cython


@cython.final
cdef class Extension:
    cdef readonly int type
    cdef readonly bytes data
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ClientHello:
    cdef readonly int version
    cdef readonly tuple supported_kems
    cdef readonly tuple supported_sigs
    cdef readonly tuple supported_aeads
    cdef readonly bytes client_nonce
    cdef readonly bytes k_c
    cdef readonly bytes client_certificate
    cdef readonly bytes client_signature
    cdef readonly bytes padding
    cdef readonly tuple extensions
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ServerHello:
    cdef readonly int version
    cdef readonly int kem_choice
    cdef readonly int sig_choice
    cdef readonly int aead_choice
    cdef readonly bytes server_nonce
    cdef readonly bytes k_s
    cdef readonly bytes ct_c
    cdef readonly bytes server_certificate
    cdef readonly bytes server_signature
    cdef readonly bytes padding
    cdef readonly tuple extensions
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ClientFinished:
    cdef readonly bytes ct_s
    cdef readonly bytes client_signature
    cdef readonly bytes padding
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ErrorResponse:
    cdef readonly int error_code
    cdef readonly bytes details
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ClientHelloResume:
    cdef readonly int version
    cdef readonly bytes ticket
    cdef readonly bytes k_c
    cdef readonly bytes resume_nonce
    cdef readonly bint early_data_offered
    cdef readonly bytes padding
    cdef readonly tuple extensions
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ServerHelloResume:
    cdef readonly int version
    cdef readonly bint accept_0rtt
    cdef readonly bytes server_nonce
    cdef readonly bytes k_s
    cdef readonly bytes ct_c
    cdef readonly bytes mac
    cdef readonly bytes padding
    cdef readonly tuple extensions
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class ClientFinishedResume:
    cdef readonly bytes ct_s
    cdef readonly bytes mac
    cdef bytes _encode(self, bint transcript)
