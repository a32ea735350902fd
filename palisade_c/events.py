"""Events a connection reports to the application (``Connection.next_event()``).

Plain frozen dataclasses: cheap to create, easy to match on, safe to log (none of them holds
key material; ``DataReceived.data`` is application plaintext and is never logged by us).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from palisade_c.shaping import Shaping

if TYPE_CHECKING:
    from palisade_c.tickets import ClientTicket


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every connection event."""


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(Event):
    """Keys are installed; data can flow. ``peer_fingerprint`` is the peer's key fingerprint."""

    peer_fingerprint: str
    resumed: bool = False
    plus_features: int = 0
    #: Resumption with 0-RTT: whether the server accepted the early data.
    early_data_accepted: bool = False
    #: The traffic shaping both sides agreed (spec §10): Mode 0 unless negotiated.
    shaping: Shaping = field(default_factory=Shaping)


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Application data on ``stream_id``. ``early`` marks replayable 0-RTT data."""

    stream_id: int
    data: bytes
    early: bool = False


@dataclass(frozen=True, slots=True)
class EpochChanged(Event):
    """Both directions now use ``epoch`` (the receiver committed the transition)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The connection reached CLOSED. ``by_peer`` tells who closed it."""

    error_code: int
    reason: str = ""
    by_peer: bool = False


@dataclass(frozen=True, slots=True)
class NewTicket(Event):
    """Client: the server issued a resumption ticket (single use; store it to resume)."""

    ticket: ClientTicket


@dataclass(frozen=True, slots=True)
class PathMigrated(Event):
    """Server: the session's primary path moved to ``address`` after validation."""

    address: Any
