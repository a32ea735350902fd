"""Connection configuration: identity, trust, limits and timers, with validated defaults.

One ``Config`` serves clients and servers alike. Every number has a default that suits a UDP
tunnel; serial links scale the handshake timers from ``link_bits_per_second``. Randomness comes
from ``rng`` (``os.urandom`` unless a test injects a seeded source); the KEM and signature
primitives inside ``cryptography`` draw their own randomness from the OS.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from palisade_c.errors import ConfigError
from palisade_c.identity import Identity, TrustEntry, TrustStore
from palisade_c.reassembly import LINK_BITS_PER_BYTE
from palisade_c.ridlayout import RidLayout
from palisade_c.shaping import Shaping, check_link_share
from palisade_c.tickets import TicketService
from palisade_c.transport.base import MAX_DATAGRAM_SIZE, MIN_DATAGRAM_SIZE
from palisade_c.wire import PLUS_MIGRATION, PLUS_RESUMPTION, PLUS_SHAPING

# PALISADE-PLUS feature bits carried in the 0x0001 extension [profile §1] are defined by the
# codec (palisade_c.wire) and re-exported here, where configurations name them.
__all__ = ["PLUS_MIGRATION", "PLUS_RESUMPTION", "PLUS_SHAPING", "Config", "RandomSource"]

RandomSource = Callable[[int], bytes]


@dataclass
class Config:
    """Settings of one endpoint. ``identity`` is this side's long-term ML-DSA key."""

    identity: Identity
    #: Peers accepted: raw public keys, hex fingerprints, or paths to ``.pub`` files.
    trusted_peers: Iterable[TrustEntry] = ()
    #: Server: its node id (the RID steering prefix). Client: the node id it wants to reach.
    node_id: bytes | None = None
    #: Largest datagram the transport carries (UDP 1200 by default; a serial link's MTU).
    max_datagram_size: int = 1200
    #: Link speed, for serial links: handshake timers scale with serialization time.
    link_bits_per_second: float | None = None
    #: UDP: receive and send buffer size asked of the kernel (None: its defaults, often
    #: ~200 KiB, which a burst of clients overflows). Linux caps it at net.core.rmem_max.
    socket_buffer_bytes: int | None = 4 << 20

    # record layer
    replay_window: int = 1024
    commit_threshold: int = 16
    max_transition_time: float = 2.0

    # handshake
    handshake_timeout: float = 15.0
    initial_rto: float = 0.3
    max_rto: float = 8.0
    max_half_open: int = 1024
    #: Server: sessions held at once, half-open and established; a hello beyond it (or beyond
    #: ``max_half_open``) is answered with ErrorSessionLimitExceeded (0x0202), rate-limited.
    max_sessions: int = 16384
    #: Half-open handshakes above which the server demands a stateless cookie retry.
    cookie_threshold: int = 256
    #: Amplification factor before the client's address is proven [profile §8].
    amplification_factor: int = 3
    #: Server: bytes of encrypted packets that all half-open sessions together may hold until
    #: their keys exist (each session also holds at most 16 datagrams).
    max_early_buffer_bytes: int = 4 << 20

    # session lifecycle
    idle_timeout: float = 60.0
    keepalive_interval: float = 15.0
    close_drain_time: float = 1.0
    rekey_after_seconds: float = 120.0
    rekey_after_bytes: int = 1 << 34
    rekey_retransmit: float = 0.5

    # PALISADE-PLUS: feature bits offered (client) or allowed (server); 0 = CORE.
    plus_features: int = 0
    #: Server: issues and redeems resumption tickets (built by the endpoint when
    #: PLUS_RESUMPTION is allowed and none is given; pass one with a SqliteTicketStore to keep
    #: used tickets across restarts).
    tickets: TicketService | None = None
    #: Server: application streams allowed in 0-RTT early data (keepalives always are).
    early_data_streams: frozenset[int] = frozenset({0})
    #: Wall clock for ticket lifetimes (tickets outlive processes, so not the monotonic now).
    ticket_clock: Callable[[], float] = field(default=time.time, repr=False)
    #: Migration: promote a candidate path after this many authenticated packets within
    #: ``migration_window`` seconds, or on a PATH_RESPONSE.
    migration_packets: int = 3
    migration_window: float = 5.0
    #: Traffic shaping (spec §10, docs/protocol.md §17). Client: the mode it asks for (a mode
    #: other than off implies PLUS_SHAPING). Server: off lets each client choose; any other
    #: mode is imposed on every client that negotiates PLUS shaping.
    shaping: Shaping = field(default_factory=Shaping)
    #: Modes this side accepts; a handshake agreeing any other fails with
    #: ErrorUnsupportedExtension. A client that must not run unshaped leaves 0 out.
    shaping_allowed: frozenset[int] = frozenset({0, 1, 2})
    #: Mode 2: application packets queued for slots before send_data refuses (back-pressure).
    shaping_queue_limit: int = 64
    #: Serial links: the largest share of ``link_bits_per_second`` a constant rate may take.
    shaping_link_share: float = 0.5

    # scale-out (docs/protocol.md §3.3): None keeps the 14 random bytes of a session RID.
    #: Server: routing fields (config, host and worker id) written into session RIDs.
    rid_layout: RidLayout | None = None
    #: Server: the Retry cookie key, shared by worker processes so that any of them can check
    #: a cookie another issued (None: a fresh random key per endpoint).
    cookie_secret: bytes | None = field(default=None, repr=False)

    rng: RandomSource = field(default=os.urandom, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.identity, Identity):
            raise ConfigError("identity must be a palisade_c.Identity")
        if self.node_id is not None and len(self.node_id) != 8:
            raise ConfigError("node_id must be 8 bytes (the RID steering prefix)")
        if not MIN_DATAGRAM_SIZE <= self.max_datagram_size <= MAX_DATAGRAM_SIZE:
            raise ConfigError(
                f"max_datagram_size must be {MIN_DATAGRAM_SIZE}..{MAX_DATAGRAM_SIZE}")
        if not 64 <= self.replay_window <= 4096:
            raise ConfigError("replay_window must be 64..4096")
        if self.commit_threshold < 1:
            raise ConfigError("commit_threshold must be at least 1")
        if not 0 < self.max_transition_time <= 3600:
            raise ConfigError("max_transition_time must be in (0, 3600] seconds")
        for name in ("handshake_timeout", "initial_rto", "max_rto", "idle_timeout",
                     "keepalive_interval", "close_drain_time", "rekey_after_seconds",
                     "rekey_retransmit"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.plus_features & ~(PLUS_RESUMPTION | PLUS_MIGRATION | PLUS_SHAPING):
            raise ConfigError("unknown PLUS feature bits")
        if self.socket_buffer_bytes is not None \
                and not 4096 <= self.socket_buffer_bytes <= 1 << 30:
            raise ConfigError("socket_buffer_bytes must be 4096 .. 1 GiB (or None)")
        if self.max_sessions < 1 or self.max_half_open < 1:
            raise ConfigError("max_sessions and max_half_open must be at least 1")
        if self.max_early_buffer_bytes < 0:
            raise ConfigError("max_early_buffer_bytes must not be negative")
        if self.cookie_secret is not None and len(self.cookie_secret) != 32:
            raise ConfigError("cookie_secret must be 32 bytes")
        if self.amplification_factor < 1:
            raise ConfigError("amplification_factor must be at least 1")
        if not isinstance(self.shaping, Shaping):
            raise ConfigError("shaping must be a palisade_c.shaping.Shaping")
        if self.shaping.mode:
            self.plus_features |= PLUS_SHAPING
        if not self.shaping_allowed or not set(self.shaping_allowed) <= {0, 1, 2}:
            raise ConfigError("shaping_allowed must name some of the modes 0, 1, 2")
        if self.shaping.mode not in self.shaping_allowed:
            raise ConfigError(f"shaping mode {self.shaping.mode} is not in shaping_allowed")
        if not 1 <= self.shaping_queue_limit <= 1 << 16:
            raise ConfigError("shaping_queue_limit must be 1..65536")
        if not 0 < self.shaping_link_share <= 1:
            raise ConfigError("shaping_link_share must be in (0, 1]")
        if self.shaping.mode == 2 and self.shaping.b > self.max_datagram_size:
            raise ConfigError(f"constant-rate size {self.shaping.b} exceeds max_datagram_size "
                              f"{self.max_datagram_size}")
        problem = check_link_share(self.shaping, self.link_bits_per_second,
                                   self.shaping_link_share)
        if problem is not None:
            raise ConfigError(problem)
        self.trust = TrustStore(self.trusted_peers)
        # Retransmission jitter needs spread, not secrecy: one PRNG per Config, seeded from
        # ``rng`` so a seeded rng still makes every timer reproducible, and no system call
        # each time a timer is armed.
        self.jitter = random.Random(int.from_bytes(self.rng(16), "big"))

    def link_time(self, nbytes: int) -> float:
        """Seconds to serialize ``nbytes`` on the link (0 when the speed is unknown)."""
        if not self.link_bits_per_second:
            return 0.0
        return nbytes * LINK_BITS_PER_BYTE / self.link_bits_per_second
