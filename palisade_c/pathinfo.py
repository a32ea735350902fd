"""Gateway notices: what a client learns about its path from the gateway in front of a device.

A client that reaches a serial device through ``palisade gateway`` talks UDP, with UDP's
1200-byte datagrams and no idea of the 115200-baud (or 9600-baud) line behind the gateway.
The gateway knows both numbers, and whether the device just rebooted. It tells the client in
a small cleartext datagram, a *gateway notice* (docs/protocol.md, "Gateway notices"
[profile]). Nobody signs a notice (the gateway holds no keys, by design), so what a client
does with one is limited to what an off- or on-path attacker could cause anyway:

* **PATH** (kind 1): the path's largest datagram and the slowest hop's speed. A client only
  ever *narrows* its configuration with it: the datagram size may go down, never up and never
  below :data:`PATH_FLOOR` (the smallest size PALISADE runs on); the speed may go down, never
  up and never below :data:`SPEED_FLOOR`. The worst a forged notice does is make the handshake
  use smaller fragments and more patient timers, a cost bounded by those floors; dropping
  packets, which anyone on the path can do, costs more.
* **REBOOT** (kind 2): the device behind the gateway restarted (its link boot counter
  changed). A client only treats it as a reason to check its session at once (an
  authenticated probe, see ``Connection``); the session ends only if the probe goes unanswered,
  never on the notice's word.

A client accepts a notice only from the address it sends to, and only when the notice names
the RID of its own handshake or session: an off-path attacker would have to guess 16 random
bytes. Layout (big-endian, like the PALISADE headers it mirrors; the RID sits at offset 6 as
in every PALISADE datagram, so a relay finds it in the same place)::

    0  magic 0x51 0x4E ("QN")   2  version u8 (1)   3  kind u8   4  reserved u16 (0)
    6  rid (24 bytes)
    30 PATH: max_datagram u16, link_bps u32 (0: unknown)     -> 36 bytes
       REBOOT: boot_counter u32                               -> 34 bytes

Receivers ignore bytes after the fields they know and drop notices of other versions or kinds.
"""

from __future__ import annotations

import copy
import struct
from typing import TYPE_CHECKING, NamedTuple

from palisade_c.errors import DecodeError
from palisade_c.transport.base import MIN_DATAGRAM_SIZE

if TYPE_CHECKING:
    from palisade_c.config import Config

__all__ = [
    "KIND_PATH",
    "KIND_REBOOT",
    "NOTICE_MAGIC",
    "PATH_FLOOR",
    "SPEED_FLOOR",
    "PathNotice",
    "RebootNotice",
    "encode_path_notice",
    "encode_reboot_notice",
    "is_notice",
    "narrow_config",
    "parse_notice",
]

NOTICE_MAGIC = b"QN"
NOTICE_VERSION = 1
KIND_PATH = 1
KIND_REBOOT = 2
#: No notice shrinks the datagram size below this: the smallest PALISADE runs on.
PATH_FLOOR = MIN_DATAGRAM_SIZE
#: No notice slows the assumed link below this (bit/s): bounds how far a forged notice can
#: stretch the handshake timers (at 9600 bit/s the handshake budget grows by about 35 s).
SPEED_FLOOR = 9600.0

_HEAD = struct.Struct(">2sBBH24s")
_PATH = struct.Struct(">HI")
_REBOOT = struct.Struct(">I")
_RID_LEN = 24


class PathNotice(NamedTuple):
    rid: bytes
    max_datagram: int
    #: Slowest hop in bit/s; None when the gateway does not know it.
    link_bps: int | None


class RebootNotice(NamedTuple):
    rid: bytes
    boot_counter: int


def is_notice(data: bytes) -> bool:
    return data[:2] == NOTICE_MAGIC


def _head(kind: int, rid: bytes) -> bytes:
    if len(rid) != _RID_LEN:
        raise ValueError("rid must be 24 bytes")
    return _HEAD.pack(NOTICE_MAGIC, NOTICE_VERSION, kind, 0, rid)


def encode_path_notice(rid: bytes, max_datagram: int, link_bps: int | None) -> bytes:
    """A PATH notice about the datagram that carried ``rid``."""
    if not 0 < max_datagram <= 0xFFFF:
        raise ValueError("max_datagram must be 1..65535")
    bps = min(int(link_bps or 0), 0xFFFFFFFF)
    return _head(KIND_PATH, rid) + _PATH.pack(max_datagram, bps)


def encode_reboot_notice(rid: bytes, boot_counter: int) -> bytes:
    """A REBOOT notice to the client of the session (or handshake) ``rid``."""
    return _head(KIND_REBOOT, rid) + _REBOOT.pack(boot_counter & 0xFFFFFFFF)


def parse_notice(data: bytes) -> PathNotice | RebootNotice:
    """Parse a notice; raises DecodeError for anything else (including other versions)."""
    if len(data) < _HEAD.size:
        raise DecodeError("gateway notice too short")
    magic, version, kind, _reserved, rid = _HEAD.unpack_from(data)
    if magic != NOTICE_MAGIC or version != NOTICE_VERSION:
        raise DecodeError("not a version 1 gateway notice")
    body = len(data) - _HEAD.size
    if kind == KIND_PATH and body >= _PATH.size:
        size, bps = _PATH.unpack_from(data, _HEAD.size)
        return PathNotice(rid, size, bps or None)
    if kind == KIND_REBOOT and body >= _REBOOT.size:
        return RebootNotice(rid, _REBOOT.unpack_from(data, _HEAD.size)[0])
    raise DecodeError(f"gateway notice of unknown kind {kind} or too short")


def narrow_config(config: Config, max_datagram: int, link_bps: int | None) -> Config:
    """``config`` narrowed by a PATH notice (module docstring): the datagram size lowered to
    ``max(max_datagram, PATH_FLOOR)`` if that is smaller, the speed lowered to
    ``max(link_bps, SPEED_FLOOR)`` if that is slower. ``config`` itself when nothing changes,
    otherwise a shallow copy (like ``transport.base.tune_for_link``)."""
    size = min(config.max_datagram_size, max(max_datagram, PATH_FLOOR))
    speed = config.link_bits_per_second
    if link_bps:
        hinted = max(float(link_bps), SPEED_FLOOR)
        if speed is None or hinted < speed:
            speed = hinted
    if size == config.max_datagram_size and speed == config.link_bits_per_second:
        return config
    narrowed = copy.copy(config)
    narrowed.max_datagram_size = size
    narrowed.link_bits_per_second = speed
    return narrowed
