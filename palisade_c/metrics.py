"""``--metrics HOST:PORT``: a Prometheus endpoint, through the ``prometheus_client`` package.

Optional: ``pip install 'palisade-c[metrics]'``. The metrics are built from the same snapshot
that ``palisade show`` prints (:mod:`palisade_c.control`), taken on the event loop thread when
Prometheus scrapes, so they never read state while the loop changes it. Names follow the
Prometheus conventions: a ``palisade_`` prefix, base units (bytes, seconds), ``_total`` on
counters, and labels for what varies (direction, reason, session, port).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Iterator
from typing import Any

from palisade_c.errors import ConfigError

__all__ = ["MetricsServer", "parse_listen", "snapshot_metrics"]

log = logging.getLogger("palisade_c.metrics")

#: Seconds a scrape waits for the event loop to produce the snapshot.
SCRAPE_TIMEOUT = 5.0


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) for --metrics."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics wants HOST:PORT, e.g. 127.0.0.1:9109, not {text!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def snapshot_metrics(snap: dict[str, Any]) -> Iterator[Any]:
    """Prometheus metric families for one ``show`` snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    info = GaugeMetricFamily("palisade_info", "palisade-c process (always 1)",
                             labels=["version", "kind"])
    info.add_metric([str(snap.get("version")), str(snap.get("kind"))], 1)
    yield info
    if snap.get("kind") == "gateway":
        yield from _gateway_metrics(snap, CounterMetricFamily, GaugeMetricFamily)
        return
    sessions = snap.get("sessions", [])
    states = GaugeMetricFamily("palisade_sessions", "Sessions by state", labels=["state"])
    by_state: dict[str, int] = {}
    for s in sessions:
        by_state[s["state"]] = by_state.get(s["state"], 0) + 1
    for state, n in sorted(by_state.items()):
        states.add_metric([state], n)
    yield states
    labels = ["session", "peer"]
    packets = CounterMetricFamily("palisade_session_packets", "Packets per session",
                                  labels=[*labels, "direction"])
    nbytes = CounterMetricFamily("palisade_session_bytes", "Bytes per session",
                                 labels=[*labels, "direction"])
    drops = CounterMetricFamily("palisade_session_drops", "Packets a session dropped",
                                labels=[*labels, "reason"])
    epoch = GaugeMetricFamily("palisade_session_epoch", "Current key epoch", labels=labels)
    age = GaugeMetricFamily("palisade_session_last_packet_age_seconds",
                            "Seconds since the session last received a packet", labels=labels)
    for s in sessions:
        key = [s["name"], (s.get("peer_fingerprint") or "")[:16]]
        for d in ("in", "out"):
            packets.add_metric([*key, d], s[f"packets_{d}"])
            nbytes.add_metric([*key, d], s[f"bytes_{d}"])
        for reason, n in sorted(s.get("drops", {}).items()):
            drops.add_metric([*key, reason], n)
        epoch.add_metric(key, s["epoch"])
        age.add_metric(key, s["last_packet_age"])
    yield from (packets, nbytes, drops, epoch, age)
    endpoint = snap.get("endpoint", {})
    half_open = GaugeMetricFamily("palisade_handshakes_in_progress",
                                  "Handshakes not yet complete")
    half_open.add_metric([], endpoint.get("half_open", 0))
    yield half_open
    ep_drops = CounterMetricFamily("palisade_endpoint_drops",
                                   "Datagrams the server endpoint dropped before any session",
                                   labels=["reason"])
    for reason, n in sorted(endpoint.get("drops", {}).items()):
        ep_drops.add_metric([reason], n)
    yield ep_drops
    forward = snap.get("forward")
    if forward:
        counters = forward.get("counters", {})
        dgrams = CounterMetricFamily("palisade_forward_datagrams", "Forwarded datagrams",
                                     labels=["direction"])
        fbytes = CounterMetricFamily("palisade_forward_bytes", "Forwarded bytes",
                                     labels=["direction"])
        for d in ("to-tunnel", "to-local"):
            dgrams.add_metric([d], counters.get(d, 0))
            fbytes.add_metric([d], counters.get(f"{d}-bytes", 0))
        refused = CounterMetricFamily("palisade_forward_refused",
                                      "Datagrams forwarding refused", labels=["reason"])
        for reason in ("oversize", "flows-refused", "no-flow", "tunnel-closed"):
            refused.add_metric([reason], counters.get(reason, 0))
        flows = GaugeMetricFamily("palisade_forward_flows", "Live forwarding flows")
        flows.add_metric([], forward.get("flows", 0))
        yield from (dgrams, fbytes, refused, flows)


def _gateway_metrics(snap: dict[str, Any], counter: Any, gauge: Any) -> Iterator[Any]:
    udp = counter("palisade_gateway_udp_datagrams", "UDP datagrams", labels=["direction"])
    udp.add_metric(["in"], snap.get("udp_in", 0))
    udp.add_metric(["out"], snap.get("udp_out", 0))
    drops = counter("palisade_gateway_drops", "Datagrams the gateway dropped",
                    labels=["reason"])
    for reason, n in sorted(snap.get("drops", {}).items()):
        drops.add_metric([reason], n)
    labels = ["port", "node"]
    up = gauge("palisade_gateway_link_up", "1 while the serial link is up", labels=labels)
    mtu = gauge("palisade_gateway_link_mtu_bytes", "Negotiated link MTU", labels=labels)
    frames = counter("palisade_gateway_frames", "Serial link frames",
                     labels=[*labels, "direction"])
    errors = counter("palisade_gateway_frame_errors", "Serial frames rejected by the decoder",
                     labels=[*labels, "kind"])
    link_drops = counter("palisade_gateway_link_drops", "Datagrams a serial link dropped",
                         labels=[*labels, "reason"])
    resets = counter("palisade_gateway_device_resets", "Device reboots seen", labels=labels)
    for d in snap.get("devices", []):
        key = [d["port"], d.get("node") or ""]
        up.add_metric(key, 1 if d["link"] == "up" else 0)
        mtu.add_metric(key, d.get("mtu") or 0)
        frames.add_metric([*key, "in"], d.get("frames_in", 0))
        frames.add_metric([*key, "out"], d.get("frames_out", 0))
        for kind, n in sorted(d.get("frame_errors", {}).items()):
            if isinstance(n, int):
                errors.add_metric([*key, kind], n)
        for reason, n in sorted(d.get("drops", {}).items()):
            link_drops.add_metric([*key, reason], n)
        resets.add_metric(key, d.get("peer_resets", 0))
    yield from (udp, drops, up, mtu, frames, errors, link_drops, resets)


class _Collector:
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self._loop = loop
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        # Called on the HTTP server's thread: take the snapshot on the loop's thread.
        async def take() -> dict[str, Any]:
            return self._snapshot()

        future = asyncio.run_coroutine_threadsafe(take(), self._loop)
        try:
            snap = future.result(timeout=SCRAPE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            future.cancel()
            return
        yield from snapshot_metrics(snap)


class MetricsServer:
    """The HTTP endpoint (a thread of prometheus_client's) for one process."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError("--metrics needs the prometheus_client package: "
                              "pip install 'palisade-c[metrics]'") from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(asyncio.get_running_loop(), snapshot))
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        bound = self._httpd.server_address
        self.address = (str(bound[0]), int(bound[1]))

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
