from typing import Final, NamedTuple, final

from palisade_c.config import Config
from palisade_c.connection import Addr, Connection, EventLog
from palisade_c.events import Event
from palisade_c.tickets import TicketService
from palisade_c.wire import PLUS_RESUMPTION as PLUS_RESUMPTION

COOKIE_LIFETIME: Final[float]
LIMIT_REPLY_RATE: Final[float]
LIMIT_REPLY_BURST: Final[float]
PURGE_BACKLOG_DELAY: Final[float]
PURGE_BATCH: Final[int]
PURGE_INTERVAL: Final[float]

def _cookie_addr(addr: Addr) -> tuple[object, ...]: ...

class EndpointEvent(NamedTuple):
    connection: Connection
    event: Event

@final
class ServerEndpoint:
    @property
    def config(self) -> Config: ...
    retries_sent: int
    limit_replies_sent: int
    tickets: TicketService | None
    def __init__(self, config: Config, *, event_log: EventLog | None = None) -> None: ...
    @property
    def connections(self) -> list[Connection]: ...
    @property
    def half_open(self) -> int: ...
    @property
    def drop_counts(self) -> dict[str, int]: ...
    @property
    def early_buffered_bytes(self) -> int: ...
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None: ...
    def datagrams_to_send(self, now: float | None = None) -> list[tuple[bytes, Addr]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> EndpointEvent | None: ...
    def close(
        self, error_code: int = 0, reason: str = "server shutting down", now: float | None = None
    ) -> None: ...
