"""The control socket of a running ``serve`` or ``gateway``, and ``palisade show``.

A running process listens on a Unix stream socket (mode 0600: only its user may ask). The
protocol is one request line, ``show``, answered with one JSON document and a newline; the
connection then closes. Nothing secret is in the answer: names, addresses, states, counters
and key fingerprints.

Where the socket lives (``--control PATH`` overrides):

* ``serve``: ``$XDG_RUNTIME_DIR/palisade/KEYNAME.sock`` when ``XDG_RUNTIME_DIR`` is set (as
  under systemd or a desktop session), otherwise beside the key file, ``KEYFILE.sock``;
* ``gateway``: ``$XDG_RUNTIME_DIR/palisade/gateway.sock``, otherwise none unless
  ``--control`` names one.

``palisade show`` finds the same path from ``--key`` (or takes ``--control``); with neither,
it asks every socket in ``$XDG_RUNTIME_DIR/palisade/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from palisade_c.errors import ConfigError

__all__ = [
    "ActivityTracker",
    "ControlServer",
    "default_path",
    "format_show",
    "gateway_snapshot",
    "query",
    "server_snapshot",
]

log = logging.getLogger("palisade_c.control")

Snapshot = Callable[[], dict[str, Any]]
#: Largest request line accepted (a request is one word).
MAX_REQUEST = 256
#: Seconds between samples of each session's packet counter (the last-packet age's precision).
SAMPLE_INTERVAL = 1.0


def runtime_dir() -> Path | None:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "palisade" if base else None


def default_path(key: str | None, *, gateway: bool = False) -> Path | None:
    """The default control socket path (see the module docstring); None for none."""
    base = runtime_dir()
    if gateway:
        return base / "gateway.sock" if base else None
    if key is None:
        return None
    if base is not None:
        return base / (Path(key).name + ".sock")
    return Path(f"{key}.sock")


def _addr(addr: Any) -> str | None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return None if addr is None else str(addr)


class ActivityTracker:
    """Ages of the last packet received per session, from sampling the packet counters
    (the core keeps its receive time internal); accurate to :data:`SAMPLE_INTERVAL`."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def observe(self, name: str, packets_in: int, now: float) -> float:
        """Record ``packets_in`` for session ``name``; returns the age of its last packet."""
        previous = self._seen.get(name)
        if previous is None or previous[0] != packets_in:
            self._seen[name] = (packets_in, now)
            return 0.0
        return now - previous[1]

    def sample(self, conns: Iterable[Any], now: float) -> None:
        """Look at every session's packet counter (called every SAMPLE_INTERVAL)."""
        names = []
        for conn in conns:
            names.append(conn.name)
            self.observe(conn.name, conn.packets_in, now)
        self.forget_except(names)

    async def run(self, conns: Callable[[], Iterable[Any]]) -> None:
        """Sample ``conns()`` until cancelled."""
        while True:
            self.sample(conns(), time.monotonic())
            await asyncio.sleep(SAMPLE_INTERVAL)

    def forget_except(self, names: Iterable[str]) -> None:
        keep = set(names)
        for name in [n for n in self._seen if n not in keep]:
            del self._seen[name]


def _session(conn: Any, tracker: ActivityTracker, now: float) -> dict[str, Any]:
    counters = conn.counters
    return {
        "name": conn.name,
        "peer_fingerprint": conn.peer_fingerprint,
        "address": _addr(conn.peer_addr),
        "state": counters.get("state", conn.state),
        "epoch": counters.get("epoch", 0),
        "packets_in": counters.get("packets_in", 0),
        "packets_out": counters.get("packets_out", 0),
        "bytes_in": counters.get("bytes_in", 0),
        "bytes_out": counters.get("bytes_out", 0),
        "last_packet_age": round(tracker.observe(conn.name, counters.get("packets_in", 0),
                                                 now), 3),
        "drops": dict(counters.get("drops", {})),
    }


def server_snapshot(server: Any, *, listen: str, fingerprint: str,
                    tracker: ActivityTracker,
                    extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ``show`` reports for a :class:`~palisade_c.aio.Server`."""
    from palisade_c import __version__

    now = time.monotonic()
    endpoint = server.endpoint
    conns = list(endpoint.connections)
    tracker.forget_except(c.name for c in conns)
    snap: dict[str, Any] = {
        "kind": "serve",
        "version": __version__,
        "pid": os.getpid(),
        "listen": listen,
        "fingerprint": fingerprint,
        "sessions": [_session(c, tracker, now) for c in conns],
        "endpoint": {"half_open": endpoint.half_open, "drops": dict(endpoint.drop_counts)},
    }
    if extra is not None:
        snap.update(extra())
    return snap


def gateway_snapshot(gateway: Any, *, listen: str) -> dict[str, Any]:
    """What ``show`` reports for a :class:`~firmware_bridge.gateway.Gateway`."""
    from palisade_c import __version__

    devices = []
    for device in gateway.devices:
        transport = device.transport
        link = transport.counters
        spec = getattr(transport, "spec", None)
        boot = getattr(transport, "_peer_boot", None)
        devices.append({
            "port": device.name,
            "node": (device.node or getattr(transport, "node_id", None) or b"").hex() or None,
            "learned": [p.hex() for p in device.learned],
            "link": "up" if link.get("connected") else "down",
            "ready": bool(link.get("ready")),
            "mtu": link.get("mtu"),
            "baud": getattr(spec, "baud", None),
            "boot_counter": boot,
            "datagrams_in": device.datagrams_in,
            "datagrams_out": device.datagrams_out,
            "frames_in": link.get("frames_in", 0),
            "frames_out": link.get("frames_out", 0),
            "frame_errors": dict(link.get("decoder", {})),
            "drops": dict(link.get("drops", {})),
            "peer_resets": link.get("peer_resets", 0),
        })
    counters = gateway.counters
    return {
        "kind": "gateway",
        "version": __version__,
        "pid": os.getpid(),
        "listen": listen,
        "udp_in": counters.get("udp_in", 0),
        "udp_out": counters.get("udp_out", 0),
        "drops": dict(counters.get("drops", {})),
        "devices": devices,
    }


class ControlServer:
    """Serves :func:`query` requests on a Unix socket from the event loop."""

    def __init__(self, path: Path, snapshot: Snapshot) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self.requests = 0

    async def start(self) -> None:
        """Bind the socket (mode 0600). A stale socket file is replaced; a live one (another
        process answers on it) raises OSError rather than stealing it."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            if _is_live(self.path):
                raise OSError(f"{self.path} is in use by another process")
            self.path.unlink()
        old = os.umask(0o177)  # the socket is created 0600: only this user may connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=5)
            except (TimeoutError, ValueError, ConnectionError):
                return
            request = line[:MAX_REQUEST].decode("ascii", "replace").strip()
            self.requests += 1
            if request == "show":
                reply: dict[str, Any] = self.snapshot()
            else:
                reply = {"error": f"unknown request {request[:40]!r}; try 'show'"}
            writer.write(json.dumps(reply, sort_keys=True, default=str).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        except Exception:
            log.exception("control request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def query(path: str | os.PathLike[str], request: str = "show",
          timeout: float = 5.0) -> dict[str, Any]:
    """Ask the process on the control socket ``path``; its JSON answer as a dict."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(path))
            s.sendall(request.encode("ascii") + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise ConfigError(f"no palisade process answers on {os.fspath(path)}: "
                              f"{exc.strerror or exc}") from None
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise ConfigError(f"{os.fspath(path)} answered something that is not JSON") from None
    if not isinstance(reply, dict):
        raise ConfigError(f"{os.fspath(path)} answered something unexpected")
    return reply


# -- text output -------------------------------------------------------------------------------


def _drops(drops: dict[str, int]) -> str:
    items = [f"{k}={v}" for k, v in sorted(drops.items()) if v]
    return " ".join(items) if items else "none"


def format_show(snap: dict[str, Any]) -> str:
    """``palisade show``'s human-readable text for one process's snapshot."""
    lines = []
    if snap.get("kind") == "gateway":
        lines.append(f"gateway {snap['listen']}  pid {snap['pid']}  udp in {snap['udp_in']} "
                     f"out {snap['udp_out']}  drops: {_drops(snap.get('drops', {}))}")
        for d in snap.get("devices", []):
            boot = d.get("boot_counter")
            lines.append(
                f"  port {d['port']}  node {d.get('node') or '-'}  link {d['link']}"
                f"{'' if d.get('ready') or d['link'] == 'down' else ' (no hello yet)'}"
                f"  mtu {d.get('mtu')}  baud {d.get('baud')}  boot "
                f"{'-' if boot is None else f'{boot:#x}'}")
            lines.append(f"    frames in {d['frames_in']} out {d['frames_out']}  "
                         f"datagrams in {d['datagrams_in']} out {d['datagrams_out']}  "
                         f"frame errors: {_drops(d.get('frame_errors', {}))}  "
                         f"drops: {_drops(d.get('drops', {}))}")
        return "\n".join(lines)
    lines.append(f"serve {snap.get('listen')}  pid {snap.get('pid')}  fingerprint "
                 f"{snap.get('fingerprint')}")
    endpoint = snap.get("endpoint", {})
    lines.append(f"  handshakes in progress {endpoint.get('half_open', 0)}  endpoint drops: "
                 f"{_drops(endpoint.get('drops', {}))}")
    sessions = snap.get("sessions", [])
    if not sessions:
        lines.append("  no sessions")
    for s in sessions:
        peer = (s.get("peer_fingerprint") or "-")[:16]
        lines.append(f"  session {s['name']}  peer {peer}  address {s.get('address')}  "
                     f"state {s['state']}  epoch {s['epoch']}")
        lines.append(f"    in {s['packets_in']} packets {s['bytes_in']} B  out "
                     f"{s['packets_out']} packets {s['bytes_out']} B  last packet "
                     f"{s['last_packet_age']:.1f} s ago  drops: {_drops(s.get('drops', {}))}")
    forward = snap.get("forward")
    if forward:
        lines.append(f"  forward to {forward.get('target')}  flows {forward.get('flows')}  "
                     f"{_drops(forward.get('counters', {}))}")
    return "\n".join(lines)
