"""The single-use ticket store for a fleet: Redis (``--ticket-store redis://host:port/db``).

A claim is one ``SET palisade:ticket:<id hex> 1 NX PX <ms until the ticket expires>``: Redis runs
it atomically, so of any number of workers or hosts claiming one ticket id exactly one sees it
set, and Redis forgets the id when the ticket could no longer be opened anyway (no purge).

The store fails closed. A claim that does not get Redis's answer within ``timeout`` seconds
(refused connection, timeout, any Redis error) raises
:class:`~palisade_c.tickets.TicketStoreUnavailable`; the server refuses that resumption and the
client falls back to a full handshake. A ticket is never accepted because the store could not
say it was used. The price is that resumption stops while Redis is down.

Replication (docs/protocol.md §12): Redis replicates asynchronously. A claim acknowledged by a
primary that fails before the replica received it is lost when the replica is promoted, so a
ticket redeemed in that window can be redeemed once more on the new primary (and 0-RTT data it
carries replayed once). Deployments that cannot accept that window run ``WAIT 1 <ms>``-style
synchronous acknowledgement or a single primary; see the documentation.

The ``redis`` package is an optional extra (``pip install 'palisade-c[redis]'``); it is
imported only when a Redis store is built.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

from palisade_c.errors import ConfigError
from palisade_c.tickets import TicketStore, TicketStoreUnavailable

log = logging.getLogger("palisade_c.tickets")

KEY_PREFIX = b"palisade:ticket:"
DEFAULT_TIMEOUT = 0.25
#: After a failure, claims fail at once for this long instead of each waiting for a timeout.
RETRY_AFTER = 1.0


class RedisTicketStore(TicketStore):
    """Used ticket ids in Redis, shared by every worker and host that names the same database."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 client: Any = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise ConfigError(f"bad ticket store URL {url!r}: expected redis://HOST:PORT/DB")
        try:
            db = int(parts.path.lstrip("/") or 0)
            _ = parts.port
        except ValueError:
            raise ConfigError(f"bad ticket store URL {url!r}: bad port or database") from None
        if client is None:
            try:
                import redis  # the optional extra
            except ImportError:
                raise ConfigError("--ticket-store redis:// needs the redis package: "
                                  "pip install 'palisade-c[redis]'") from None
            client = redis.Redis.from_url(url, db=db, socket_timeout=timeout,
                                          socket_connect_timeout=timeout, retry=None)
        self.url = url
        self._redis = client
        self._down_until = 0.0
        self.failures = 0

    def claim(self, ticket_id: bytes, expires_at: float, now: float) -> bool:
        mono = time.monotonic()
        if mono < self._down_until:
            self.failures += 1
            raise TicketStoreUnavailable("redis recently unreachable")
        ttl_ms = max(1, int((expires_at - now) * 1000) + 1)
        try:
            return bool(self._redis.set(KEY_PREFIX + ticket_id.hex().encode(), b"1",
                                        nx=True, px=ttl_ms))
        except Exception as exc:  # every failure of the client library means "no answer"
            self.failures += 1
            self._down_until = mono + RETRY_AFTER
            log.warning("ticket store %s unavailable (%s): resumption refused",
                        self.url, type(exc).__name__)
            raise TicketStoreUnavailable(str(exc)) from None

    def purge(self, now: float) -> int:
        return 0  # Redis expires each id itself (PX)

    def close(self) -> None:
        self._redis.close()
