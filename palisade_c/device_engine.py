"""Serve the device role of a serial link with the C peer (``palisade serve … --engine c``).

The same loop a firmware runs, on the host: datagrams from the link go into the C device
(:class:`palisade_c.device.Device`, which compiles firmware_bridge/c/pal_device.c), what it
produces goes back out, one timer is kept at its next deadline, and events are handed to the
application (echo, or the data written to a sink). The link itself (pal_link framing, HELLO,
PING) is :class:`~palisade_c.transport.serial.SerialTransport`, exactly as for the Python
engine, so a host, the gateway or ``palisade connect`` cannot tell the engines apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from palisade_c.config import Config
from palisade_c.device import Device
from palisade_c.events import ConnectionClosed, DataReceived, Event, HandshakeCompleted
from palisade_c.transport.base import link_config

log = logging.getLogger("palisade_c.device")

#: What the application does with each delivered payload: (device, stream_id, data).
DataHandler = Callable[[Device, int, bytes], None]


def echo(device: Device, stream_id: int, data: bytes) -> None:
    """Send every payload back on its stream."""
    device.send_data(data, stream_id)


class DeviceServer:
    """One C device session at a time on one serial link (see the module docstring)."""

    def __init__(self, transport: Any, device: Device, on_data: DataHandler) -> None:
        self.transport = transport
        self.device = device
        self._on_data = on_data
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self.events: list[Event] = []
        #: Called with every event the device reports (after the built-in handling).
        self.on_event: Callable[[Event], None] | None = None
        transport.on_datagram = self._on_datagram

    def now(self) -> float:
        return self._loop.time() - self._t0

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        self.device.receive_datagram(data, addr, self.now())
        self._pump()

    def _on_timer(self) -> None:
        self._timer = None
        self.device.handle_timer(self.now())
        self._pump()

    def _pump(self) -> None:
        dev = self.device
        while True:
            while (ev := dev.next_event()) is not None:
                self._on_event(ev)
            out = dev.datagrams_to_send(self.now())
            if not out:
                break
            for data, addr in out:
                self.transport.send(data, addr)
        self._arm()

    def _on_event(self, ev: Event) -> None:
        self.events.append(ev)
        if isinstance(ev, HandshakeCompleted):
            log.info("device: tunnel up, peer %s", ev.peer_fingerprint[:16])
        elif isinstance(ev, ConnectionClosed):
            log.info("device: tunnel closed, code 0x%04x %s%s", ev.error_code, ev.reason,
                     " (by peer)" if ev.by_peer else "")
        elif isinstance(ev, DataReceived) and self.device.established:
            try:
                self._on_data(self.device, ev.stream_id, ev.data)
            except Exception:  # an application bug must not stop the device loop
                log.exception("device: data handler failed")
        if self.on_event is not None:
            self.on_event(ev)

    def _arm(self) -> None:
        deadline = self.device.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(self._t0 + deadline, self._on_timer)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.device.established:
            self.device.close(0, "device shutting down")
            self._pump()
        self.transport.on_datagram = None
        self.transport.close()

    async def wait_closed(self) -> None:
        await self.transport.wait_closed()


def make_device(config: Config, *, name: str = "device") -> Device:
    """A C device configured like a Python server with ``config`` (identity, pins by
    fingerprint, node id, link MTU and speed, timers)."""
    return Device(
        config.identity,
        sorted(config.trust.fingerprints),
        node_id=config.node_id,
        mtu=config.max_datagram_size,
        link_bps=config.link_bits_per_second,
        rng=config.rng,
        name=name,
        initial_rto=config.initial_rto,
        max_rto=config.max_rto,
        handshake_timeout=config.handshake_timeout,
        idle_timeout=config.idle_timeout,
        keepalive_interval=config.keepalive_interval,
        close_drain_time=config.close_drain_time,
        rekey_after_seconds=config.rekey_after_seconds,
        rekey_retransmit=config.rekey_retransmit,
        max_transition_time=config.max_transition_time,
        commit_threshold=config.commit_threshold,
        rekey_after_bytes=config.rekey_after_bytes,
    )


async def serve_device(url: str, config: Config, on_data: DataHandler) -> DeviceServer:
    """Open the serial link at ``url`` as its device end and serve it with the C peer."""
    from palisade_c.transport.serial import SerialTransport  # pyserial only when used

    # The link HELLO (v2) announces the node id, as the Python engine's does, so a gateway
    # with no ``node=`` pin routes to this device from its first HELLO (LINK.md §6.1).
    transport = await SerialTransport.open(url, role="device", node_id=config.node_id)
    try:
        config = link_config(config, transport)
        return DeviceServer(transport, make_device(config), on_data)
    except BaseException:
        transport.close()
        await transport.wait_closed()
        raise
