"""UDP-to-serial gateway: relays PALISADE datagrams by RID steering prefix, holding no keys.

Theory of operation
-------------------
Every PALISADE datagram, handshake record or encrypted packet, carries its 24-byte RID in
cleartext at offset 6, and the first 8 bytes of a session RID are the server's node id, the
*steering prefix* (PROFILE §4). A client that targets a node id puts that prefix in its first
flight already. So the gateway routes on bytes 6..14 alone and never needs a session key:
security stays end to end between the UDP client and the device.

* **UDP to serial**, by prefix. Each device has a node id, which it *announces* in its link
  HELLO (LINK.md §6.1, version 2): the gateway routes to it from that first HELLO on. A URL
  may *pin* the id (``serial:///dev/ttyUSB0?node=0011223344556677``): a device announcing
  another one is refused (``node-mismatch``), and so is a second device announcing an id that
  another port already has (``duplicate-node``); both are logged as errors, since either means
  a miswired bench. A version 1 device, which announces nothing, is reached by its pin or by
  the prefix *learned* from the datagrams it sends. A datagram whose prefix matches no device
  is dropped and counted (``unknown-prefix``).
* **Serial to UDP**, by full RID. The gateway remembers which UDP address last sent each RID
  (a bounded LRU map whose entries expire after ``rid_ttl`` seconds of silence), and sends the
  device's datagrams for that RID there.
* **The ServerHello problem.** A device answers a ClientHello under a *new* RID (the session RID
  it just chose), which no client has sent yet. So the gateway lets one handshake at a time open
  per device: the first ClientHello (or its resumption form) takes the device's *handshake slot*
  for its UDP address, and the first handshake record from the device under an unknown RID is
  bound to that address. A ServerHello releases the slot. Other clients' ClientHellos are dropped
  (``handshake-busy``) while the slot is held, and they simply retransmit: on a serial line,
  handshakes queue behind each other anyway. A slot whose device never answers expires.
* **Resets.** When a device reboots (its link HELLO carries a new boot counter) its sessions are
  gone: the gateway sends a cleartext *REBOOT notice* to the client of every session it routed
  for that device, then forgets their RIDs and the slot. Holding no keys, it cannot speak for
  the device, so a client takes the notice only as a reason to probe its session at once
  (an authenticated round trip) and ends it only when the probe goes unanswered; a reboot
  reaches clients in seconds instead of at their idle timeout.

* **Path notices.** A UDP client starts with 1200-byte datagrams and no idea of the serial
  line behind us. So the gateway tells it, in a cleartext *PATH notice*
  (:mod:`palisade_c.pathinfo`), the device's link MTU and baud rate: once per handshake (the
  first record of each ClientHello RID) and whenever it drops a datagram too large for the
  link (``too-large``). The client narrows its datagram size and stretches its timers from
  it, never the other way (docs/protocol.md, "Gateway notices"); nobody types ``--mtu``.

Memory is bounded: at most ``max_rids`` remembered RIDs, one slot and at most
:data:`MAX_LEARNED_PREFIXES` learned prefixes per device, and :data:`MAX_NOTICED` RIDs
remembered as already told.

Like every relay, the gateway trusts the source address of the last datagram for a RID: a host
that can send to the gateway can divert a session's replies (not read or forge them).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from palisade_c import hsrecord as hs
from palisade_c import pathinfo
from palisade_c.errors import ConfigError
from palisade_c.transport.base import Addr, estimate_handshake_bytes, parse_url
from palisade_c.transport.serial import SerialSpec, SerialTransport, airtime
from palisade_c.transport.udp import DEFAULT_SOCKET_BUFFER_BYTES, UdpTransport

__all__ = [
    "DEFAULT_MAX_RIDS",
    "DEFAULT_RID_TTL",
    "MAX_LEARNED_PREFIXES",
    "Device",
    "Gateway",
]

log = logging.getLogger("palisade_c.gateway")

#: RIDs remembered (serial-to-UDP routes) before the least recently used is forgotten.
DEFAULT_MAX_RIDS = 4096
#: Seconds a RID route lives without traffic (longer than the tunnel's idle timeout).
DEFAULT_RID_TTL = 300.0
#: Prefixes learned per device beyond its configured node id.
MAX_LEARNED_PREFIXES = 8
#: Floor of the handshake slot's lifetime; slow links get the handshake's airtime on top.
SLOT_TIMEOUT = 3.0
#: Hello RIDs remembered as already sent a PATH notice (oldest forgotten first).
MAX_NOTICED = 1024
#: At most one PATH notice per client address in this many seconds for too-large drops.
NOTICE_INTERVAL = 0.1

# Both headers are 30 bytes with the RID at the same offset (PROFILE §4); its first 8 bytes
# are the steering prefix.
_RID = slice(hs.RID_OFFSET, hs.RID_OFFSET + hs.RID_LEN)
_PREFIX = slice(hs.RID_OFFSET, hs.RID_OFFSET + 8)
_MIN_LEN = hs.HS_HEADER_LEN
_MAGIC_QH = 0x48
_MAGIC_QP = 0x50
_HELLO_TYPES = (hs.MSG_CLIENT_HELLO, hs.MSG_CLIENT_HELLO_RESUME)
_SERVER_HELLO_TYPES = (hs.MSG_SERVER_HELLO, hs.MSG_SERVER_HELLO_RESUME)


@dataclass
class Device:
    """One serial-attached device and its routing state."""

    transport: SerialTransport
    #: The configured node id (``?node=``), or None.
    node: bytes | None
    #: The node id the device announced in its HELLO, once routed to.
    announced: bytes | None = None
    #: Why the gateway refuses to route to this device (a node id conflict), or None.
    refused: str | None = None
    learned: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    #: (UDP address, expiry) of the client whose handshake is in progress.
    slot: tuple[Addr, float] | None = None
    datagrams_in: int = 0
    datagrams_out: int = 0

    @property
    def name(self) -> str:
        return self.transport.name


def _packet_kind(data: bytes) -> int | None:
    """0x48 for a handshake record, 0x50 for an encrypted packet, None for anything else."""
    if len(data) < _MIN_LEN or data[0] != 0x51 or data[1] not in (_MAGIC_QH, _MAGIC_QP):
        return None
    return data[1]


class Gateway:
    """Relays between one UDP socket and any number of serial devices (module docstring)."""

    def __init__(
        self,
        udp: UdpTransport,
        devices: Sequence[SerialTransport],
        *,
        max_rids: int = DEFAULT_MAX_RIDS,
        rid_ttl: float = DEFAULT_RID_TTL,
    ) -> None:
        if max_rids < 1 or rid_ttl <= 0:
            raise ConfigError("max_rids must be at least 1 and rid_ttl positive")
        self._loop = asyncio.get_running_loop()
        self.udp = udp
        self.max_rids = max_rids
        self.rid_ttl = rid_ttl
        self.devices: list[Device] = []
        self._by_prefix: dict[bytes, Device] = {}
        #: Full RID -> (UDP address, device, last use), least recently used first.
        self._rids: OrderedDict[bytes, tuple[Addr, Device, float]] = OrderedDict()
        self._drops: dict[str, int] = {}
        self._noticed: OrderedDict[bytes, None] = OrderedDict()
        self._notice_times: OrderedDict[Addr, float] = OrderedDict()
        self.notices_sent = 0
        self.udp_in = 0
        self.udp_out = 0
        self._closing = False
        self._closed: asyncio.Future[None] = self._loop.create_future()
        for transport in devices:
            self.add_device(transport)
        udp.on_datagram = self._on_udp

    # -- set-up ---------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        listen: str,
        serial_urls: Sequence[str],
        *,
        max_rids: int = DEFAULT_MAX_RIDS,
        rid_ttl: float = DEFAULT_RID_TTL,
    ) -> Gateway:
        """Bind ``listen`` (``udp://HOST:PORT``) and open every serial URL.

        Devices that are not there yet are opened in the background (they may be plugged in
        later); a bad URL raises :class:`ConfigError`, a port that cannot be bound OSError.
        """
        scheme, host, port, _params = parse_url(listen)
        if scheme != "udp":
            raise ConfigError(f"bad URL {listen!r}: the gateway listens on udp://HOST:PORT")
        if not serial_urls:
            raise ConfigError("the gateway needs at least one --serial device")
        specs = [SerialSpec.parse(u, role="host") for u in serial_urls]
        nodes = [s.node for s in specs if s.node is not None]
        if len(set(nodes)) != len(nodes):
            raise ConfigError("two serial devices have the same node id")
        largest = max(s.mtu for s in specs)
        # One socket for every client: buffers sized like a server's (see udp.py).
        udp = await UdpTransport.bind(host, port, max_datagram_size=max(largest, 1200),
                                      buffer_bytes=DEFAULT_SOCKET_BUFFER_BYTES)
        opened: list[SerialTransport] = []
        try:
            for spec in specs:
                transport = await SerialTransport.open(spec, require=False, hello_timeout=0)
                opened.append(transport)
                if not transport.connected:
                    log.warning("%s: cannot open it yet (%s); will keep trying", transport.name,
                                transport.open_error)
        except BaseException:
            for t in opened:
                t.close()
            udp.close()
            raise
        return cls(udp, opened, max_rids=max_rids, rid_ttl=rid_ttl)

    def add_device(self, transport: SerialTransport) -> Device:
        device = Device(transport, transport.node_id)
        if device.node is not None:
            if device.node in self._by_prefix:
                raise ConfigError(f"node id {device.node.hex()} is used by two devices")
            self._by_prefix[device.node] = device
        self.devices.append(device)
        transport.on_datagram = lambda data, _addr, d=device: self._on_serial(d, data)
        transport.on_reset = lambda reason, d=device: self._on_device_reset(d, reason)
        if hasattr(transport, "on_hello"):
            transport.on_hello = lambda hello, d=device: self._on_device_hello(d, hello)
            # The HELLO may have arrived while the port was being opened, before we listened.
            if transport.peer_hello is not None:
                self._on_device_hello(device, transport.peer_hello)
        return device

    def _on_device_hello(self, device: Device, hello: Any) -> None:
        """Route to the node id a device announces (LINK.md §6.1), unless it conflicts."""
        node: bytes | None = hello.node_id
        if node is None or node == device.announced:
            return  # a version 1 device (pin or learned prefix), or a repeat
        if device.announced is not None and self._by_prefix.get(device.announced) is device \
                and device.announced != device.node:
            del self._by_prefix[device.announced]
        device.announced = None
        if device.node is not None and node != device.node:
            reason = (f"{device.name}: the device announces node id {node.hex()} but the URL "
                      f"pins node={device.node.hex()}; not routing to it")
            self._refuse(device, reason, "node-mismatch")
            return
        owner = self._by_prefix.get(node)
        if owner is not None and owner is not device and node not in owner.learned:
            reason = (f"{device.name}: node id {node.hex()} is already used by {owner.name}; "
                      "refusing the second device (give each device its own --node-id)")
            self._refuse(device, reason, "duplicate-node")
            return
        if owner is not None and owner is not device:
            # Only learned from traffic there: the announcement is authoritative.
            owner.learned.pop(node, None)
        device.learned.pop(node, None)
        device.refused = None
        device.announced = node
        self._by_prefix[node] = device
        log.info("%s: device announced node id %s; routing to it", device.name, node.hex())

    def _refuse(self, device: Device, reason: str, drop: str) -> None:
        device.refused = reason
        self._drop(drop)
        for prefix in [p for p, d in self._by_prefix.items() if d is device]:
            del self._by_prefix[prefix]
        device.learned.clear()
        log.error("%s", reason)

    # -- state ----------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.udp.local_address[:2]
        return str(host), int(port)

    @property
    def counters(self) -> dict[str, Any]:
        return {
            "udp_in": self.udp_in,
            "udp_out": self.udp_out,
            "rids": len(self._rids),
            "notices_sent": self.notices_sent,
            "drops": dict(self._drops),
            "devices": {
                d.name: {
                    "node": d.node.hex() if d.node else None,
                    "announced": d.announced.hex() if d.announced else None,
                    "refused": d.refused,
                    "learned": [p.hex() for p in d.learned],
                    "datagrams_in": d.datagrams_in,
                    "datagrams_out": d.datagrams_out,
                    "link": d.transport.counters,
                }
                for d in self.devices
            },
        }

    def route_for(self, rid: bytes) -> Addr | None:
        """The UDP address remembered for ``rid`` (None if unknown or expired)."""
        entry = self._rids.get(rid)
        if entry is None or self._loop.time() - entry[2] > self.rid_ttl:
            return None
        return entry[0]

    def _drop(self, reason: str) -> None:
        self._drops[reason] = self._drops.get(reason, 0) + 1

    def _remember(self, rid: bytes, addr: Addr, device: Device, now: float) -> None:
        self._rids[rid] = (addr, device, now)
        self._rids.move_to_end(rid)
        while len(self._rids) > self.max_rids:
            self._rids.popitem(last=False)
        # Expired routes sit at the old end: forget them as we go, so memory follows traffic.
        while self._rids:
            oldest = next(iter(self._rids.values()))
            if now - oldest[2] <= self.rid_ttl:
                break
            self._rids.popitem(last=False)

    def _slot_timeout(self, device: Device) -> float:
        # A handshake's airtime, twice over, on top of a floor: the device must receive the
        # ClientHello and answer before the slot may pass to someone else.
        wire_bytes = estimate_handshake_bytes(device.transport.mtu)
        return SLOT_TIMEOUT + 2 * airtime(wire_bytes, device.transport.spec.baud)

    # -- UDP -> serial --------------------------------------------------------------------------

    def _on_udp(self, data: bytes, addr: Addr) -> None:
        self.udp_in += 1
        kind = _packet_kind(data)
        if kind is None:
            self._drop("not-palisade")
            return
        device = self._by_prefix.get(bytes(data[_PREFIX]))
        if device is None:
            self._drop("unknown-prefix")
            return
        now = self._loop.time()
        if len(data) > device.transport.mtu:
            self._drop("too-large")
            last = self._notice_times.get(addr)
            if last is None or now - last >= NOTICE_INTERVAL:
                self._notice_times[addr] = now
                self._notice_times.move_to_end(addr)
                if len(self._notice_times) > MAX_NOTICED:
                    self._notice_times.popitem(last=False)
                self._send_path_notice(device, data, addr)
            return
        if kind == _MAGIC_QH and data[3] in _HELLO_TYPES:
            rid = bytes(data[_RID])
            if rid not in self._noticed:
                self._noticed[rid] = None
                if len(self._noticed) > MAX_NOTICED:
                    self._noticed.popitem(last=False)
                self._send_path_notice(device, data, addr)
            slot = device.slot
            if slot is not None and slot[0] != addr and now < slot[1]:
                self._drop("handshake-busy")
                return
            device.slot = (addr, now + self._slot_timeout(device))
        self._remember(bytes(data[_RID]), addr, device, now)
        device.datagrams_out += 1
        device.transport.send(data, device.transport.peer_address)

    def _send_path_notice(self, device: Device, data: bytes, addr: Addr) -> None:
        """Tell ``addr`` the path to ``device``: its link MTU and line speed (a hint the client
        may only narrow itself with; never larger than what it asked to send, so a forged
        source address gains an attacker no amplification)."""
        notice = pathinfo.encode_path_notice(bytes(data[_RID]), min(device.transport.mtu,
                                                                    0xFFFF),
                                             device.transport.spec.baud)
        if len(notice) <= len(data):
            self.notices_sent += 1
            self.udp.send(notice, addr)

    # -- serial -> UDP --------------------------------------------------------------------------

    def _on_serial(self, device: Device, data: bytes) -> None:
        device.datagrams_in += 1
        kind = _packet_kind(data)
        if kind is None:
            self._drop("not-palisade")
            return
        now = self._loop.time()
        rid = bytes(data[_RID])
        self._learn(device, rid[:8])
        entry = self._rids.get(rid)
        addr: Addr | None = None
        if entry is not None and entry[1] is device and now - entry[2] <= self.rid_ttl:
            addr = entry[0]
            self._rids.move_to_end(rid)
            self._rids[rid] = (addr, device, now)
        elif kind == _MAGIC_QH and device.slot is not None and now < device.slot[1]:
            # A handshake record under a RID nobody sent: the session RID the device chose
            # for the client holding the slot.
            addr = device.slot[0]
            self._remember(rid, addr, device, now)
            if data[3] in _SERVER_HELLO_TYPES:
                device.slot = None
        if addr is None:
            self._drop("no-route")
            return
        self.udp_out += 1
        self.udp.send(data, addr)

    def _learn(self, device: Device, prefix: bytes) -> None:
        owner = self._by_prefix.get(prefix)
        if owner is device or device.refused is not None:
            return
        if owner is not None:
            self._drop("prefix-conflict")  # another device owns it; routes by RID still work
            return
        if len(device.learned) >= MAX_LEARNED_PREFIXES:
            old, _ = device.learned.popitem(last=False)
            self._by_prefix.pop(old, None)
        device.learned[prefix] = None
        self._by_prefix[prefix] = device
        log.info("%s: learned node id %s", device.name, prefix.hex())

    def _on_device_reset(self, device: Device, reason: str) -> None:
        stale = [(rid, addr) for rid, (addr, d, _t) in self._rids.items() if d is device]
        hello = getattr(device.transport, "peer_hello", None)
        boot = hello.boot_counter if hello is not None else 0
        for rid, addr in stale:
            del self._rids[rid]
            # One small datagram per session the gateway routed: no amplification beyond the
            # sessions the client itself opened.
            self.notices_sent += 1
            self.udp.send(pathinfo.encode_reboot_notice(rid, boot), addr)
        device.slot = None
        log.warning("%s; told the clients of %d session route(s)", reason, len(stale))

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the socket and every port (idempotent); await :meth:`wait_closed`."""
        if self._closing:
            return
        self._closing = True
        self.udp.on_datagram = None
        self.udp.close()
        for d in self.devices:
            d.transport.on_datagram = None
            d.transport.close()
        self._loop.create_task(self._finish())

    async def _finish(self) -> None:
        try:
            await self.udp.wait_closed()
            for d in self.devices:
                await d.transport.wait_closed()
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        host, port = self.address
        return f"Gateway(udp://{host}:{port}, devices={len(self.devices)})"
