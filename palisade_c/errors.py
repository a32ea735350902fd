"""Error codes and the exception tree.

Two kinds of failure exist and they never mix:

* **Local misuse** (calling an API in the wrong state, passing a bad argument, asking the record
  layer to send past its nonce budget) raises a subclass of :class:`PalisadeError`.
* **A malformed or hostile peer** never raises out of the core. Its packet is dropped and
  counted under a reason name, or the connection closes with one of the :class:`ErrorCode`
  values below. The codec exceptions (:class:`DecodeError` and subclasses) are raised by the
  decoders and caught by the layer that called them; they carry the code that the handshake
  puts on the wire.

Codes 0x0000-0x0108, 0x0200-0x0202, 0x0300, 0x0301 and 0x0305 are named by the visible spec; the
others in each range are this project's assignments (see docs/protocol.md, "Error codes").
"""

from __future__ import annotations

from enum import IntEnum

from palisade_c.safetext import printable


class ErrorCode(IntEnum):
    """The 16-bit error codes of spec §14 (ErrorResponse, CTRL_CLOSE, counters)."""

    ErrorNone = 0x0000
    # Handshake [spec]
    ErrorInvalidVersion = 0x0100
    ErrorUnsupportedKEM = 0x0101
    ErrorUnsupportedSignature = 0x0102
    ErrorUnsupportedAEAD = 0x0103
    ErrorInvalidClientHello = 0x0104
    ErrorInvalidServerHello = 0x0105
    ErrorSignatureVerifyFailed = 0x0106
    ErrorCertificateInvalid = 0x0107
    ErrorKEMDecapFailed = 0x0108
    # Handshake [profile]
    ErrorInvalidClientFinished = 0x0109
    ErrorHandshakeTimeout = 0x010A
    ErrorUnsupportedExtension = 0x010B
    # Session [spec]
    ErrorSessionNotFound = 0x0200
    ErrorSessionExpired = 0x0201
    ErrorSessionLimitExceeded = 0x0202
    # Session [profile]
    ErrorIdleTimeout = 0x0203
    ErrorRekeyTimeout = 0x0204
    # Data plane [spec 0x0300, 0x0301, 0x0305; profile for the rest]
    ErrorAEADDecryptFailed = 0x0300
    ErrorInvalidEpoch = 0x0301
    ErrorSequenceReplay = 0x0302
    ErrorSequenceExhausted = 0x0303
    ErrorInvalidKeyPhase = 0x0304
    ErrorPacketTooLarge = 0x0305
    ErrorMalformedPacket = 0x0306
    # Resumption [profile]
    ErrorTicketInvalid = 0x0400
    ErrorTicketExpired = 0x0401
    ErrorTicketReplayed = 0x0402
    ErrorEarlyDataRejected = 0x0403
    # Migration [profile]
    ErrorMigrationNotAllowed = 0x0500
    ErrorPathValidationFailed = 0x0501
    # Control frames [profile]
    ErrorMalformedControlFrame = 0x0600
    ErrorProtocolViolation = 0x0601
    # Generic [profile]
    ErrorInternal = 0xFF00


def code_name(code: int) -> str:
    """Name of a code, or its hex form if it is not one we know."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:04x}"


class PalisadeError(Exception):
    """Base class of every exception palisade_c raises."""


# --- local misuse ---------------------------------------------------------------------------


class ConfigError(PalisadeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class StateError(PalisadeError, RuntimeError):
    """An operation was called in a state where it is not allowed."""


class EpochStateError(StateError):
    """An epoch operation was called out of order (for example arming twice)."""


class SequenceExhaustedError(PalisadeError):
    """The sender reached its hard sequence limit; a rekey must happen before it sends again."""

    code = ErrorCode.ErrorSequenceExhausted


class PacketTooLargeError(PalisadeError, ValueError):
    """A payload does not fit in one packet.

    ``max_payload`` is the largest payload that does fit on the current path (None where the
    limit is not a payload size, e.g. the record layer's own length field).
    """

    code = ErrorCode.ErrorPacketTooLarge

    def __init__(self, message: str, max_payload: int | None = None) -> None:
        super().__init__(message)
        self.max_payload = max_payload


class BackPressureError(PalisadeError):
    """Constant-rate shaping (Mode 2): the send queue is full. Nothing was queued; retry once
    a slot has gone out (``Connection.send_queue_room`` says how many packets fit)."""

    code = ErrorCode.ErrorInternal


# --- decoding (raised by codecs, caught by the core) ----------------------------------------


class DecodeError(PalisadeError, ValueError):
    """Bytes from the wire do not parse. ``code`` is the spec error code that applies."""

    code: ErrorCode = ErrorCode.ErrorMalformedPacket

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ControlFrameError(DecodeError):
    """A control frame is truncated or its payload does not match its type."""

    code = ErrorCode.ErrorMalformedControlFrame


# --- protocol outcomes (carry a code that goes on the wire or into a close event) -----------


class ProtocolError(PalisadeError):
    """The peer broke the protocol; the connection is closed with ``code``."""

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        # The message may quote the peer (an ErrorResponse's details): escaped in the text an
        # exception prints, kept as sent in ``detail``.
        super().__init__(f"{code.name} (0x{int(code):04x})"
                         f"{': ' + printable(message) if message else ''}")
        self.code = code
        self.detail = message


class HandshakeError(ProtocolError):
    """The handshake failed (locally detected or reported by the peer)."""


class ConnectionClosedError(PalisadeError):
    """The tunnel is closed; raised by the asyncio shell on send/recv after close."""

    def __init__(self, code: int = 0, reason: str = "") -> None:
        super().__init__(f"connection closed: {code_name(code)}"
                         f"{' ' + printable(reason) if reason else ''}")
        self.code = code
        self.reason = reason
