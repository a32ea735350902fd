"""``palisade demo``: a device, a gateway and a client on a virtual serial line, no hardware.

Theory of operation
-------------------
Everything runs in this process, on one event loop, through the same code a real deployment
uses:

1. Two ephemeral identities (device and client) are generated and saved as key files in a
   temporary directory, then loaded back and pinned from the ``.pub`` files, as the CLI does.
2. A :class:`~palisade_c.transport.pty.PtyLink` makes a virtual serial line: two pty pairs
   joined by a pump paced to ``baud`` (bytes leave at ``baud / 10`` per second each way).
3. The simulated device is :func:`palisade_c.aio.serve` on end ``a`` of the line (the serial
   transport in the device role) with an echo handler and the device's node id.
4. The gateway (:class:`~palisade_c.gateway.Gateway`) listens on UDP on the loopback and
   owns end ``b``, routing by the node id (the RID steering prefix) that the device announces
   in its link HELLO; it holds no keys.
5. The client connects over UDP to the gateway, targeting the node id and nothing else: the
   gateway's PATH notice tells it the serial hop's datagram size and speed, and its
   fragmentation and timers follow. Its handshake progress is printed on stderr; then it
   echoes ``messages`` messages, asks for a rekey, echoes once more under the new keys, and
   closes.

The summary (stdout, lines starting ``palisade demo:``) compares the handshake time (until
*both* sides hold keys) with the wire time that the handshake's bytes need at that baud
(``total bytes x 10 / baud``), the floor no implementation can beat, and gives the bytes per
direction, both as PALISADE datagrams and as framed bytes on the line, and the final epoch.
Every wait is bounded, and the whole run is cut off after :data:`DEMO_TIMEOUT` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from palisade_c.aio import Tunnel, connect, serve
from palisade_c.config import PLUS_SHAPING, Config
from palisade_c.connection import Connection
from palisade_c.errors import PalisadeError, code_name
from palisade_c.events import ConnectionClosed, DataReceived, EpochChanged, HandshakeCompleted
from palisade_c.gateway import Gateway
from palisade_c.identity import Identity
from palisade_c.progress import HandshakeProgress
from palisade_c.reassembly import LINK_BITS_PER_BYTE
from palisade_c.shaping import Shaping
from palisade_c.transport.pty import PtyLink

__all__ = ["DEMO_TIMEOUT", "DemoError", "DemoResult", "run", "run_demo", "summary_lines"]

log = logging.getLogger("palisade_c.demo")

#: The whole demo gives up after this many seconds.
DEMO_TIMEOUT = 55.0
#: Longest wait for one echo or one event once the tunnel is up.
STEP_TIMEOUT = 10.0


class DemoError(Exception):
    """A step of the demo did not do what it should."""


@dataclass
class DemoResult:
    """What the demo measured."""

    baud: int
    node_id: bytes
    gateway: str = ""
    #: Seconds from connect() until both sides had completed the handshake.
    handshake_time: float = 0.0
    #: Seconds until the client had completed it (it does not wait for its last message).
    client_handshake_time: float = 0.0
    handshake_bytes_out: int = 0
    handshake_bytes_in: int = 0
    messages: int = 0
    echoed: int = 0
    round_trips: list[float] = field(default_factory=list)
    rekey_time: float = 0.0
    epoch_before: int = 0
    final_epoch: int = 0
    bytes_client_to_device: int = 0
    bytes_device_to_client: int = 0
    line_a_to_b: int = 0
    line_b_to_a: int = 0
    close_code: int = -1
    close_reason: str = ""
    total_time: float = 0.0
    #: Traffic shaping: what the client asked for, what the session agreed, and the client's
    #: shaping counters, application payload bytes and encrypted bytes sent.
    shaping_asked: Shaping = field(default_factory=Shaping)
    shaping: Shaping = field(default_factory=Shaping)
    shaping_stats: dict[str, int] = field(default_factory=dict)
    app_bytes_out: int = 0
    packets_out: int = 0
    bytes_out: int = 0

    @property
    def handshake_bytes(self) -> int:
        return self.handshake_bytes_out + self.handshake_bytes_in

    @property
    def wire_time(self) -> float:
        """Seconds the handshake's bytes need on the line: bytes x 10 / baud."""
        return self.handshake_bytes * LINK_BITS_PER_BYTE / self.baud

    @property
    def ratio(self) -> float:
        return self.handshake_time / self.wire_time if self.wire_time else 0.0


async def _recv_event(tunnel: Tunnel) -> object:
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await tunnel.recv_event()
    except TimeoutError:
        raise DemoError(f"nothing came back within {STEP_TIMEOUT:g} s") from None


async def _echo_once(tunnel: Tunnel, payload: bytes, on_epoch: list[int]) -> float:
    """Send ``payload`` and wait for its echo; returns the round trip in seconds."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    tunnel.send(payload)
    while True:
        event = await _recv_event(tunnel)
        if isinstance(event, DataReceived):
            if event.data != payload:
                raise DemoError("the echo does not match what was sent")
            return loop.time() - started
        if isinstance(event, EpochChanged):
            on_epoch.append(event.epoch)
        elif isinstance(event, ConnectionClosed):
            raise DemoError(f"tunnel closed: {code_name(event.error_code)} {event.reason}")


async def run_demo(
    baud: int = 115200,
    messages: int = 10,
    *,
    progress: TextIO | None = None,
    engine: str = "python",
    shaping: Shaping | None = None,
) -> DemoResult:
    """Run the demo (module docstring); ``progress`` receives the handshake status lines
    (stderr by default). ``engine="c"`` plays the device with the C peer firmware uses
    (firmware_bridge/DEVICE.md). Raises :class:`DemoError` when a step fails."""
    loop = asyncio.get_running_loop()
    begin = loop.time()
    node = os.urandom(8)
    result = DemoResult(baud=baud, node_id=node, messages=messages,
                        shaping_asked=shaping or Shaping())
    with tempfile.TemporaryDirectory(prefix="palisade-demo-") as tmp:
        work = Path(tmp)
        for name in ("device", "client"):
            ident = Identity.generate()
            ident.save(work / f"{name}.key")
            ident.save_public(work / f"{name}.key.pub")
        device_cfg = Config(identity=Identity.load(work / "device.key"),
                            trusted_peers=[str(work / "client.key.pub")], node_id=node,
                            plus_features=PLUS_SHAPING if shaping is not None and engine != "c"
                            else 0)
        client_cfg = Config(identity=Identity.load(work / "client.key"),
                            trusted_peers=[str(work / "device.key.pub")], node_id=node,
                            shaping=shaping or Shaping())

        with PtyLink(baud, directory=work / "line") as line:
            # When the device has keys, and the handshake bytes it received and sent: what
            # crossed the serial line (the client's first, too large flight never did: the
            # gateway dropped it and told the client the path's datagram size).
            established: asyncio.Future[tuple[float, int, int]] = loop.create_future()

            async def device(tunnel: Tunnel) -> None:
                if not established.done():
                    conn = tunnel.connection
                    established.set_result((loop.time(), conn.hs_bytes_in, conn.hs_bytes_out))
                async for data in tunnel:
                    tunnel.send(data)

            server: Any
            if engine == "c":
                server = await _serve_c_device(line.url("a"), device_cfg, established)
            else:
                server = await serve(line.url("a"), device_cfg, device)
            gateway: Gateway | None = None
            try:
                gateway = await Gateway.start("udp://127.0.0.1:0", [line.url("b")])
                host, port = gateway.address
                result.gateway = f"udp://{host}:{port}"
                link = gateway.devices[0].transport
                if not await link.wait_ready(STEP_TIMEOUT):
                    raise DemoError("the gateway got no HELLO from the device")
                # No --mtu, no --link-bps: the gateway tells the client the serial hop's MTU and
                # speed (a PATH notice), which are the narrowest and slowest of the path.
                await _client(result, client_cfg, established, progress)
                # What crossed the serial hop, counted by the gateway's end of it.
                result.bytes_client_to_device = link.datagram_bytes_out
                result.bytes_device_to_client = link.datagram_bytes_in
            finally:
                if gateway is not None:
                    gateway.close()
                    await gateway.wait_closed()
                server.close()
                await server.wait_closed()
            counters = line.counters
            result.line_a_to_b = counters["a_to_b"]
            result.line_b_to_a = counters["b_to_a"]
    result.total_time = loop.time() - begin
    return result


async def _serve_c_device(url: str, config: Config,
                          established: asyncio.Future[tuple[float, int, int]]) -> Any:
    """The device played by the C peer: echo, and note when it holds keys and the bytes its
    link carried until then (all of them handshake records: the device had no keys)."""
    from palisade_c.device_engine import echo, serve_device

    loop = asyncio.get_running_loop()
    server = await serve_device(url, config, echo)
    link = server.transport

    def on_event(event: object) -> None:
        if isinstance(event, HandshakeCompleted) and not established.done():
            established.set_result((loop.time(), link.datagram_bytes_in,
                                    link.datagram_bytes_out))

    server.on_event = on_event
    return server


async def _client(
    result: DemoResult,
    config: Config,
    established: asyncio.Future[tuple[float, int, int]],
    stream: TextIO | None,
) -> None:
    loop = asyncio.get_running_loop()
    watcher: HandshakeProgress | None = None

    def watch(conn: Connection) -> None:
        nonlocal watcher
        watcher = HandshakeProgress(conn, stream=stream, prefix="palisade demo: ").start()

    started = loop.time()
    try:
        tunnel = await connect(result.gateway, config, on_connection=watch)
    finally:
        if watcher is not None:
            watcher.stop()
    result.client_handshake_time = loop.time() - started
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            both, device_in, device_out = await asyncio.shield(established)
    except TimeoutError:
        raise DemoError("the device never completed its side of the handshake") from None
    result.handshake_time = max(both, started + result.client_handshake_time) - started
    conn = tunnel.connection
    result.shaping = conn.shaping
    result.handshake_bytes_out = device_in
    result.handshake_bytes_in = device_out
    try:
        epochs: list[int] = []
        for i in range(result.messages):
            payload = f"message {i + 1} of {result.messages} through the gateway".encode()
            result.app_bytes_out += len(payload)
            result.round_trips.append(await _echo_once(tunnel, payload, epochs))
            result.echoed += 1
        # Rekey: the client asks, the device announces new keys, both commit epoch 1.
        result.epoch_before = conn.epoch
        rekey_started = loop.time()
        tunnel.request_rekey()  # through the tunnel, so the request goes out now
        result.app_bytes_out += 37
        await _echo_once(tunnel, b"first message after the rekey request", epochs)
        while not epochs:
            event = await _recv_event(tunnel)
            if isinstance(event, EpochChanged):
                epochs.append(event.epoch)
            elif isinstance(event, ConnectionClosed):
                raise DemoError(f"tunnel closed during the rekey: {event.reason}")
        result.rekey_time = loop.time() - rekey_started
        result.app_bytes_out += 26
        await _echo_once(tunnel, b"an echo under the new keys", epochs)
        result.final_epoch = conn.epoch
    finally:
        event = await tunnel.close()
        result.shaping_stats = conn.shaping_stats or {}
        result.packets_out, result.bytes_out = conn.packets_out, conn.bytes_out
    result.close_code, result.close_reason = event.error_code, event.reason


def summary_lines(r: DemoResult) -> list[str]:
    """The summary the demo prints (each line starts with ``palisade demo:``)."""
    rtt = sum(r.round_trips) / len(r.round_trips) * 1e3 if r.round_trips else 0.0
    closed = ("closed cleanly" if r.close_code == 0
              else f"closed with {code_name(r.close_code)} {r.close_reason}".rstrip())
    lines = [
        f"palisade demo: virtual serial line at {r.baud} baud (pty pair, paced), device node "
        f"{r.node_id.hex()}, gateway {r.gateway}",
        f"palisade demo: handshake {r.handshake_time:.2f} s until both sides had keys "
        f"(client {r.client_handshake_time:.2f} s); wire time {r.wire_time:.2f} s = "
        f"{r.handshake_bytes} bytes x 10 / {r.baud} baud; ratio {r.ratio:.2f}",
        f"palisade demo: bytes client->device {r.bytes_client_to_device}, device->client "
        f"{r.bytes_device_to_client} (datagrams); on the line gateway->device "
        f"{r.line_b_to_a}, device->gateway {r.line_a_to_b} (framing included)",
        f"palisade demo: {r.echoed} of {r.messages} messages echoed, round trip "
        f"{rtt:.1f} ms on average",
        f"palisade demo: rekey epoch {r.epoch_before} -> {r.final_epoch} committed after "
        f"{r.rekey_time:.2f} s, then an echo under the new keys",
        f"palisade demo: {closed}; final epoch {r.final_epoch}; total {r.total_time:.1f} s",
    ]
    if r.shaping_asked.mode or r.shaping.mode:
        lines.insert(-1, shaping_line(r))
    return lines


def shaping_line(r: DemoResult) -> str:
    """The shaping overhead: the client's encrypted bytes against the payload they carried."""
    agreed = str(r.shaping) if r.shaping == r.shaping_asked else (
        f"{r.shaping} (asked {r.shaping_asked}; the peer did not agree it)")
    st = r.shaping_stats
    ratio = r.bytes_out / r.app_bytes_out if r.app_bytes_out else 0.0
    return (f"palisade demo: shaping {agreed}: client sent {r.packets_out} packets, "
            f"{r.bytes_out} bytes for {r.app_bytes_out} bytes of messages (x{ratio:.1f}); "
            f"{st.get('pad_bytes', 0)} padding bytes, {st.get('dummies', 0)} dummy packets")


def run(baud: int = 115200, messages: int = 10, verbose: bool = False,
        out: TextIO | None = None, engine: str = "python",
        shaping: Shaping | None = None) -> int:
    """Run the demo and print its summary; the exit status (0 when every step worked)."""
    stdout = out if out is not None else sys.stdout

    async def bounded() -> DemoResult:
        async with asyncio.timeout(DEMO_TIMEOUT):
            return await run_demo(baud, messages, engine=engine, shaping=shaping)

    started = time.monotonic()
    try:
        result = asyncio.run(bounded())
    except TimeoutError:
        print(f"palisade: demo did not finish within {DEMO_TIMEOUT:g} s", file=sys.stderr)
        return 1
    except (DemoError, PalisadeError, OSError) as exc:
        print(f"palisade: demo failed after {time.monotonic() - started:.1f} s: {exc}",
              file=sys.stderr)
        if verbose:
            log.exception("demo failure")
        return 1
    for line in summary_lines(result):
        print(line, file=stdout, flush=True)
    if result.close_code != 0 or result.echoed != messages or result.final_epoch < 1:
        print("palisade: demo finished, but not every step succeeded", file=sys.stderr)
        return 1
    return 0
