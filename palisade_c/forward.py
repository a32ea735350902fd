"""UDP port forwarding through a tunnel, both directions.

* :class:`ListenForwarder` (``palisade connect --listen udp://127.0.0.1:PORT``): local
  applications send datagrams to a local port; each crosses the tunnel, and the replies come
  back to the application that sent.
* :class:`ServiceForwarder` (``palisade serve --forward udp://HOST:PORT``): datagrams that
  arrive through a tunnel go to a local service, and its replies go back through the tunnel.

Flows and streams [profile, docs/protocol.md "UDP forwarding"]: a *flow* is one local
application address (host, port) on the listening side. Each flow is carried on its own
application stream id, so that several applications share one tunnel and replies find their
sender. The listening side assigns stream ids round-robin over 0..253, skipping ids in use,
and frees an id after the flow has been idle for ``flow_idle`` seconds; the serving side keeps
one UDP socket towards the service per (tunnel, stream id), so the service sees one source
port per flow, and closes it after the same idle time. At most 254 flows are live per
tunnel; a datagram from a further application is refused (counted ``flows-refused``).

Datagram semantics stay honest: a payload too large for one tunnel packet (the path's
maximum, from the tunnel's datagram size) is refused, counted under ``oversize`` and logged
(rate-limited), never truncated or split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from palisade_c.errors import (
    BackPressureError,
    ConfigError,
    ConnectionClosedError,
    PacketTooLargeError,
)
from palisade_c.events import ConnectionClosed, DataReceived
from palisade_c.transport.base import parse_url

__all__ = [
    "DEFAULT_FLOW_IDLE",
    "MAX_FLOWS",
    "ListenForwarder",
    "ServiceForwarder",
    "max_payload",
    "parse_udp_target",
]

log = logging.getLogger("palisade_c.forward")

#: Seconds of silence after which a flow's stream id (and the service socket) is released.
DEFAULT_FLOW_IDLE = 60.0
#: Application stream ids are 0..253 [spec]: one flow per stream id.
MAX_FLOWS = 254
#: At most one "refused" log line per this many seconds, per forwarder and kind.
LOG_INTERVAL = 5.0
#: Bytes an application packet adds to its payload (headers and tag; record.pxd
#: MIN_PACKET_LEN, which Python cannot import): the path's datagram size minus this is the
#: largest datagram one tunnel packet carries.
PACKET_OVERHEAD = 61

Addr = tuple[Any, ...]


def parse_udp_target(url: str) -> tuple[str, int]:
    """``(host, port)`` from ``udp://HOST:PORT``; ConfigError for anything else."""
    scheme, host, port, params = parse_url(url)
    if scheme != "udp" or params:
        raise ConfigError(f"bad forwarding address {url!r}: expected udp://HOST:PORT")
    if port == 0:
        raise ConfigError(f"bad forwarding address {url!r}: the port cannot be 0")
    return host, port


class _Limiter:
    """Rate-limits a log line per key: the first at once, then a summary per interval."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def log(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.interval:
            self._suppressed[key] += 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        suffix = f" (and {more} more since the last report)" if more else ""
        log.warning(message + suffix, *args)


@dataclass
class _Counters:
    values: Counter[str] = field(default_factory=Counter)

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] += n


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any, on_error: Any) -> None:
        self.on_datagram = on_datagram
        self.on_error = on_error

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.on_error(exc)


def max_payload(tunnel: Any) -> int:
    """The largest datagram one packet of ``tunnel`` carries on its path: the configured
    datagram size (a serial link's or ``--mtu``) less the packet overhead."""
    known = getattr(tunnel, "max_payload", None)  # when the Tunnel itself knows it
    if isinstance(known, int):
        return known
    return int(tunnel.connection.config.max_datagram_size) - PACKET_OVERHEAD


def _send_through(tunnel: Any, data: bytes, stream: int, counters: _Counters,
                  limiter: _Limiter, where: str) -> bool:
    """Send one datagram into the tunnel; refuse (count, log) what does not fit: a larger
    packet would be dropped silently by a hop with a smaller MTU (a gateway's serial link)."""
    try:
        if len(data) > max_payload(tunnel):
            raise PacketTooLargeError(f"{len(data)} bytes")
        tunnel.send(data, stream)
    except PacketTooLargeError:
        counters.add("oversize")
        limiter.log("oversize", "forward: refused a %d-byte datagram %s: larger than the "
                    "%d bytes one tunnel packet carries on this path (counted as oversize)",
                    len(data), where, max_payload(tunnel))
        return False
    except ConnectionClosedError:
        counters.add("tunnel-closed")
        return False
    except BackPressureError:
        # Constant-rate shaping: the slots are full. UDP is best effort: drop and count.
        counters.add("back-pressure")
        return False
    counters.add("to-tunnel")
    counters.add("to-tunnel-bytes", len(data))
    return True


# -- connect --listen -------------------------------------------------------------------------


@dataclass
class _Flow:
    addr: Addr
    stream: int
    last: float


class ListenForwarder:
    """Carries datagrams from local applications on ``host:port`` through ``tunnel``."""

    def __init__(self, tunnel: Any, *, flow_idle: float = DEFAULT_FLOW_IDLE) -> None:
        self.tunnel = tunnel
        self.flow_idle = flow_idle
        self.counters = _Counters()
        self._limiter = _Limiter()
        self._by_addr: dict[Addr, _Flow] = {}
        self._by_stream: dict[int, _Flow] = {}
        self._next_stream = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()

    async def bind(self, host: str, port: int) -> tuple[str, int]:
        """Start listening; returns the bound address."""
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Datagrams(self._from_app, self._on_error), local_addr=(host, port))
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    @property
    def flows(self) -> dict[int, Addr]:
        """Live flows: stream id -> local application address."""
        return {s: f.addr for s, f in self._by_stream.items()}

    def _on_error(self, exc: Exception) -> None:
        self.counters.add("socket-errors")
        log.debug("forward: listening socket error: %s", exc)

    def _allocate(self, addr: Addr, now: float) -> _Flow | None:
        self._expire(now)
        if len(self._by_stream) >= MAX_FLOWS:
            return None
        while self._next_stream in self._by_stream:
            self._next_stream = (self._next_stream + 1) % MAX_FLOWS
        flow = _Flow(addr, self._next_stream, now)
        self._next_stream = (self._next_stream + 1) % MAX_FLOWS
        self._by_addr[addr] = flow
        self._by_stream[flow.stream] = flow
        self.counters.add("flows-opened")
        log.info("forward: new flow from %s on stream %d", addr, flow.stream)
        return flow

    def _expire(self, now: float) -> None:
        for flow in [f for f in self._by_stream.values() if now - f.last >= self.flow_idle]:
            del self._by_stream[flow.stream]
            del self._by_addr[flow.addr]
            self.counters.add("flows-expired")

    def _from_app(self, data: bytes, addr: Addr) -> None:
        now = time.monotonic()
        flow = self._by_addr.get(addr)
        if flow is None:
            flow = self._allocate(addr, now)
            if flow is None:
                self.counters.add("flows-refused")
                self._limiter.log("flows", "forward: refused a datagram from %s: all %d "
                                  "streams carry live flows", addr, MAX_FLOWS)
                return
        flow.last = now
        _send_through(self.tunnel, data, flow.stream, self.counters, self._limiter,
                      f"from {addr[0]}:{addr[1]}")

    def from_tunnel(self, stream: int, data: bytes) -> None:
        """A datagram that came through the tunnel: back to the flow's application."""
        flow = self._by_stream.get(stream)
        if flow is None or self._transport is None:
            self.counters.add("no-flow")
            return
        flow.last = time.monotonic()
        self._transport.sendto(data, flow.addr)
        self.counters.add("to-local")
        self.counters.add("to-local-bytes", len(data))

    async def run(self) -> ConnectionClosed:
        """Pump tunnel events until the tunnel closes; returns the close event."""
        while True:
            event = await self.tunnel.recv_event()
            if isinstance(event, ConnectionClosed):
                return event
            if isinstance(event, DataReceived):
                self.from_tunnel(event.stream_id, event.data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def snapshot(self) -> dict[str, Any]:
        return {"counters": dict(self.counters.values), "flows": len(self._by_stream)}


# -- serve --forward --------------------------------------------------------------------------


class _ServiceFlow:
    def __init__(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.last = time.monotonic()


class ServiceForwarder:
    """Serves tunnels by forwarding their datagrams to the UDP service at ``target``.

    One instance serves every tunnel of a server: use :meth:`handle` as the ``serve`` handler.
    """

    def __init__(self, target: tuple[str, int], *,
                 flow_idle: float = DEFAULT_FLOW_IDLE) -> None:
        self.target = target
        self.flow_idle = flow_idle
        self.counters = _Counters()
        self._limiter = _Limiter()
        self.live_flows = 0

    async def handle(self, tunnel: Any) -> None:
        loop = asyncio.get_running_loop()
        flows: dict[int, _ServiceFlow] = {}

        def on_reply(stream: int) -> Any:
            def reply(data: bytes, _addr: Addr) -> None:
                flow = flows.get(stream)
                if flow is not None:
                    flow.last = time.monotonic()
                _send_through(tunnel, data, stream, self.counters, self._limiter,
                              f"from the service {self.target[0]}:{self.target[1]}")
            return reply

        def on_error(exc: Exception) -> None:
            # ICMP port unreachable and the like: the service is not there (yet).
            self.counters.add("service-errors")
            self._limiter.log("service", "forward: service %s:%d: %s", self.target[0],
                              self.target[1], exc)

        async def open_flow(stream: int) -> _ServiceFlow:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(on_reply(stream), on_error), remote_addr=self.target)
            self.live_flows += 1
            self.counters.add("flows-opened")
            return _ServiceFlow(transport)

        def close_flow(stream: int) -> None:
            flow = flows.pop(stream)
            flow.transport.close()
            self.live_flows -= 1

        async def sweep() -> None:
            while True:
                await asyncio.sleep(max(self.flow_idle / 4, 0.05))
                now = time.monotonic()
                for stream in [s for s, f in flows.items() if now - f.last >= self.flow_idle]:
                    close_flow(stream)
                    self.counters.add("flows-expired")

        sweeper = loop.create_task(sweep())
        try:
            while True:
                event = await tunnel.recv_event()
                if isinstance(event, ConnectionClosed):
                    return
                if not isinstance(event, DataReceived):
                    continue
                flow = flows.get(event.stream_id)
                if flow is None:
                    try:
                        flow = flows[event.stream_id] = await open_flow(event.stream_id)
                    except OSError as exc:
                        on_error(exc)
                        continue
                flow.last = time.monotonic()
                flow.transport.sendto(event.data)
                self.counters.add("to-local")
                self.counters.add("to-local-bytes", len(event.data))
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            for stream in list(flows):
                close_flow(stream)

    def snapshot(self) -> dict[str, Any]:
        return {"counters": dict(self.counters.values), "flows": self.live_flows,
                "target": f"{self.target[0]}:{self.target[1]}"}
