# C-level view of the handshake message codecs in wire.pyx (PROFILE §2, §7).
# Other compiled modules may cimport these classes to read fields without Python attribute
# lookups. Every message class is final: decode() builds instances without running __init__,
# so a subclass could never rely on its own constructor having run.
cimport cython


# The shared base: encode, equality, hashing and pickling all go through _encode, which
# each class below overrides (overrides are not redeclared here).
cdef class _Message:
    cdef bytes _encode(self, bint transcript)


@cython.final
cdef class Extension(_Message):
    cdef readonly int type
    cdef readonly bytes data


@cython.final
cdef class ClientHello(_Message):
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


@cython.final
cdef class ServerHello(_Message):
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


@cython.final
cdef class ClientFinished(_Message):
    cdef readonly bytes ct_s
    cdef readonly bytes client_signature
    cdef readonly bytes padding


@cython.final
cdef class ErrorResponse(_Message):
    cdef readonly int error_code
    cdef readonly bytes details


@cython.final
cdef class ClientHelloResume(_Message):
    cdef readonly int version
    cdef readonly bytes ticket
    cdef readonly bytes k_c
    cdef readonly bytes resume_nonce
    cdef readonly bint early_data_offered
    cdef readonly bytes padding
    cdef readonly tuple extensions


@cython.final
cdef class ServerHelloResume(_Message):
    cdef readonly int version
    cdef readonly bint accept_0rtt
    cdef readonly bytes server_nonce
    cdef readonly bytes k_s
    cdef readonly bytes ct_c
    cdef readonly bytes mac
    cdef readonly bytes padding
    cdef readonly tuple extensions


@cython.final
cdef class ClientFinishedResume(_Message):
    cdef readonly bytes ct_s
    cdef readonly bytes mac
