"""Traffic shaping (spec §10; docs/protocol.md §17): modes, negotiation, and the per-session
shaper the connection consults on its send path.

Mode 0 sends every packet at once, unpadded. Mode 1 hides a uniformly drawn number of zero
bytes inside each packet's AEAD (the record's ``pad_len``). Mode 2 sends one packet of one
fixed size every ``1/pps`` seconds: queued payloads fill the slots, dummy packets (stream
0xFF) the rest. Shaping touches only padding and departure times, never the record format,
nonces, epochs or replay state (spec §10.1): every packet is sealed by the record layer as
any other, at the moment it leaves.

The mode is agreed in the handshake: a client offering PLUS bit 0x04 may ask for one in the
ignorable extension ``EXT_SHAPING``; the server answers with the mode the session uses (its
own policy wins when it imposes one). A side whose ``shaping_allowed`` lacks the agreed mode
refuses the handshake with ErrorUnsupportedExtension.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from palisade_c.errors import ConfigError, ErrorCode, HandshakeError
from palisade_c.reassembly import LINK_BITS_PER_BYTE
from palisade_c.wire import PLUS_SHAPING, Extension

if TYPE_CHECKING:
    from palisade_c.config import Config

__all__ = [
    "EXT_SHAPING", "MIN_RATE_SIZE", "MODE_OFF", "MODE_PAD", "MODE_RATE", "RECORD_OVERHEAD",
    "Shaper", "Shaping", "client_shaping", "server_shaping", "shaping_extensions",
]

MODE_OFF = 0
MODE_PAD = 1
MODE_RATE = 2

#: Handshake extension carrying ``mode u8 | a u16 | b u16`` [docs §17]. The 0x8000 bit
#: makes it ignorable, so a CORE peer that does not know it answers without it (Mode 0).
EXT_SHAPING = 0x8004
_EXT_LEN = 5

#: Bytes every encrypted packet adds to its payload: headers and tag (record.MIN_PACKET_LEN).
RECORD_OVERHEAD = 61
#: The smallest Mode 2 datagram: room for every control frame the session may need to send
#: (a NEW_TICKET is the largest, well under 200 bytes) [docs §17].
MIN_RATE_SIZE = 256
MAX_RATE_PPS = 10_000
_MAX_PAD = 0xFFFF
_DUMMY_STREAM = 0xFF


@dataclass(frozen=True, slots=True)
class Shaping:
    """One shaping mode and its parameters: Mode 1 ``a..b`` bytes of padding; Mode 2 ``a``
    packets per second of ``b`` bytes each (whole datagrams)."""

    mode: int = MODE_OFF
    a: int = 0
    b: int = 0

    def __post_init__(self) -> None:
        if self.mode == MODE_OFF:
            if self.a or self.b:
                raise ConfigError("shaping mode 0 takes no parameters")
        elif self.mode == MODE_PAD:
            if not 0 <= self.a <= self.b <= _MAX_PAD:
                raise ConfigError(f"padding range must be 0 <= MIN <= MAX <= {_MAX_PAD}")
        elif self.mode == MODE_RATE:
            if not 1 <= self.a <= MAX_RATE_PPS:
                raise ConfigError(f"constant rate must be 1..{MAX_RATE_PPS} packets/s")
            if not MIN_RATE_SIZE <= self.b <= _MAX_PAD:
                raise ConfigError(f"constant-rate size must be {MIN_RATE_SIZE}..{_MAX_PAD}")
        else:
            raise ConfigError(f"unknown shaping mode {self.mode}")

    @classmethod
    def pad(cls, low: int, high: int) -> Shaping:
        return cls(MODE_PAD, low, high)

    @classmethod
    def rate(cls, pps: int, size: int) -> Shaping:
        return cls(MODE_RATE, pps, size)

    @classmethod
    def parse(cls, text: str) -> Shaping:
        """``off``, ``pad:MIN-MAX`` or ``rate:PPS:SIZE`` (the CLI's ``--shaping``)."""
        try:
            if text == "off":
                return cls()
            kind, _, rest = text.partition(":")
            if kind == "pad":
                low, high = rest.split("-")
                return cls.pad(int(low), int(high))
            if kind == "rate":
                pps, size = rest.split(":")
                return cls.rate(int(pps), int(size))
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
        raise ConfigError(f"shaping must be off, pad:MIN-MAX or rate:PPS:SIZE, not {text!r}")

    def __str__(self) -> str:
        if self.mode == MODE_PAD:
            return f"pad:{self.a}-{self.b}"
        if self.mode == MODE_RATE:
            return f"rate:{self.a}:{self.b}"
        return "off"

    @property
    def link_bits_per_second(self) -> float:
        """Mode 2: the bits per second it occupies on a serial link (0 otherwise)."""
        return self.a * self.b * LINK_BITS_PER_BYTE if self.mode == MODE_RATE else 0.0

    def encode(self) -> bytes:
        return bytes((self.mode,)) + self.a.to_bytes(2, "big") + self.b.to_bytes(2, "big")

    @classmethod
    def decode(cls, data: bytes) -> Shaping:
        """Strict: exactly 5 bytes naming a known mode with valid parameters."""
        if len(data) != _EXT_LEN:
            raise ValueError("shaping extension must be 5 bytes")
        try:
            return cls(data[0], int.from_bytes(data[1:3], "big"), int.from_bytes(data[3:5], "big"))
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc


def check_link_share(shaping: Shaping, link_bps: float | None, share: float) -> str | None:
    """Why a constant rate cannot run on this serial link, or None when it fits."""
    if shaping.mode != MODE_RATE or not link_bps:
        return None
    need = shaping.link_bits_per_second
    if need > share * link_bps:
        return (f"constant rate {shaping} needs {need:.0f} bit/s, over {share:.0%} of the "
                f"link's {link_bps:.0f} bit/s")
    return None


def _refuse(detail: str) -> HandshakeError:
    return HandshakeError(ErrorCode.ErrorUnsupportedExtension, detail)


def _find(extensions: tuple[Extension, ...]) -> bytes | None:
    for e in extensions:
        if e.type == EXT_SHAPING:
            return bytes(e.data)
    return None


def _permitted(config: Config, chosen: Shaping, who: str) -> Shaping:
    if chosen.mode not in config.shaping_allowed:
        raise _refuse(f"shaping mode {chosen.mode} ({chosen}) is forbidden by {who} policy")
    problem = check_link_share(chosen, config.link_bits_per_second, config.shaping_link_share)
    if problem is not None:
        raise _refuse(problem)
    return chosen


def shaping_extensions(config: Config, plus: int, *, answer: Shaping | None = None
                       ) -> list[Extension]:
    """Client (``answer`` None): the request, when it asks for a mode. Server: the agreed mode,
    always sent once PLUS shaping is agreed, so that both sides name it."""
    if not plus & PLUS_SHAPING:
        return []
    if answer is not None:
        return [Extension(EXT_SHAPING, answer.encode())]
    if config.shaping.mode == MODE_OFF:
        return []
    return [Extension(EXT_SHAPING, config.shaping.encode())]


def server_shaping(config: Config, plus: int, extensions: tuple[Extension, ...]) -> Shaping:
    """Server: the mode this session uses. Its own non-off policy is imposed; otherwise the
    client's request is granted if the policy allows it. Raises HandshakeError
    (ErrorUnsupportedExtension) when the result is forbidden here."""
    if not plus & PLUS_SHAPING:
        return _permitted(config, Shaping(), "this server's")
    raw = _find(extensions)
    try:
        asked = Shaping.decode(raw) if raw is not None else Shaping()
    except ValueError as exc:
        raise HandshakeError(ErrorCode.ErrorInvalidClientHello, str(exc)) from exc
    chosen = config.shaping if config.shaping.mode != MODE_OFF else asked
    if chosen.mode == MODE_RATE and chosen.b > config.max_datagram_size:
        # The slot must fit the path: shrink it to our datagram size [docs §17].
        chosen = Shaping.rate(chosen.a, max(config.max_datagram_size, MIN_RATE_SIZE))
    return _permitted(config, chosen, "this server's")


def client_shaping(config: Config, plus: int, extensions: tuple[Extension, ...]) -> Shaping:
    """Client: the mode the server's hello names (Mode 0 when it did not agree PLUS shaping,
    e.g. a CORE peer). Raises HandshakeError when the local policy forbids it."""
    chosen = Shaping()
    if plus & PLUS_SHAPING:
        raw = _find(extensions)
        if raw is not None:
            try:
                chosen = Shaping.decode(raw)
            except ValueError as exc:
                raise HandshakeError(ErrorCode.ErrorInvalidServerHello, str(exc)) from exc
    if chosen.mode == MODE_RATE and chosen.b > config.max_datagram_size:
        raise _refuse(f"constant-rate size {chosen.b} exceeds this path's datagram size "
                      f"{config.max_datagram_size}")
    return _permitted(config, chosen, "the local")


class Shaper:
    """Per-session shaping state: the padding draw (Mode 1) or the slot clock and queues
    (Mode 2). Randomness comes from ``rng`` in blocks, so a seeded Config replays exactly."""

    __slots__ = (
        "_pads",
        "_rng",
        "bypass",
        "control",
        "data",
        "dummies",
        "interval",
        "limit",
        "mode",
        "next_slot",
        "pad_bytes",
        "refused",
        "shaping",
        "size",
        "slots",
    )

    def __init__(self, shaping: Shaping, rng: Any, now: float, queue_limit: int) -> None:
        self.shaping = shaping
        self.mode = shaping.mode
        self._rng = rng
        self._pads: list[int] = []
        self.interval = 1.0 / shaping.a if shaping.mode == MODE_RATE else 0.0
        self.next_slot = now
        self.size = shaping.b if shaping.mode == MODE_RATE else 0
        self.limit = queue_limit
        self.data: deque[tuple[bytes, int]] = deque()
        self.control: deque[bytes] = deque()
        self.bypass = False
        self.dummies = 0       # Mode 2: slots that carried no payload
        self.slots = 0         # Mode 2: slots sent
        self.pad_bytes = 0     # padding bytes added (both modes)
        self.refused = 0       # Mode 2: send_data calls refused for a full queue

    def _refill(self, n: int) -> None:
        """64 draws at a time from ``rng``: 32-bit values, those above the largest multiple of
        ``n`` rejected (no modulo bias), the rest reduced mod ``n``. Batching keeps the
        per-packet cost to a list pop (bench/shaping.py)."""
        limit = (1 << 32) - (1 << 32) % n
        while not self._pads:
            vals = struct.unpack(">64I", bytes(self._rng(256)))
            self._pads = [v % n for v in vals if v < limit]

    def pad_for(self, payload_len: int, datagram_size: int) -> int:
        """Mode 1: padding for one packet, uniform over the range, clamped to the datagram."""
        if not self._pads:
            self._refill(self.shaping.b - self.shaping.a + 1)
        pad = self.shaping.a + self._pads.pop()
        room = datagram_size - RECORD_OVERHEAD - payload_len
        if pad > room:
            pad = room if room > 0 else 0
        self.pad_bytes += pad
        return pad

    @property
    def room(self) -> int:
        """Mode 2: application packets the queue still accepts."""
        return self.limit - len(self.data)

    def next_item(self) -> tuple[bytes, int, bool]:
        """Mode 2: what the next slot carries: a control message first, then data, else a
        dummy."""
        self.slots += 1
        if self.control:
            return self.control.popleft(), 0, True
        if self.data:
            payload, stream = self.data.popleft()
            return payload, stream, False
        self.dummies += 1
        return b"", _DUMMY_STREAM, False

    def slot_pad(self, payload_len: int) -> int:
        pad = max(0, self.size - RECORD_OVERHEAD - payload_len)
        self.pad_bytes += pad
        return pad

    def advance(self, now: float) -> None:
        """Mode 2: after a slot at ``now``. Slots a late caller missed are skipped, never
        sent as a burst [docs §17], and the next one is always after ``now``."""
        self.next_slot += self.interval
        if self.next_slot <= now:
            self.next_slot = now + self.interval

    def stats(self) -> dict[str, int]:
        return {"slots": self.slots, "dummies": self.dummies, "pad_bytes": self.pad_bytes,
                "queued": len(self.data) + len(self.control), "refused": self.refused}

