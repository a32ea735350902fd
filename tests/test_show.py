"""``palisade show`` over the control socket, and ``--metrics`` (issue 14).

A real ``serve`` (and a real ``gateway`` in front of a pty device) run as subprocesses; a
session is held open from this process while ``palisade show`` asks. The Prometheus text is
checked with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from aiohelpers import run_bounded
from simlink import free_udp_port
from test_cli import CMD_TIMEOUT, cli_env
from test_forward import Procs, procs  # noqa: F401  (fixture)

from firmware_bridge.pty_link import PtyLink
from palisade_c.aio import connect
from palisade_c.config import Config
from palisade_c.control import ControlServer, format_show, query
from palisade_c.errors import ConfigError
from palisade_c.identity import Identity

NODE = "0a0b0c0d0e0f1011"
FAST = 1_000_000
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("show-keys")
    for name in ("server", "client"):
        ident = Identity.generate()
        ident.save(d / f"{name}.key")
        ident.save_public(d / f"{name}.key.pub")
    return d


def show(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "palisade_c", "show", *args], cwd=cwd,
                          env=cli_env(), capture_output=True, text=True, timeout=CMD_TIMEOUT,
                          check=False)


def scrape(log: str) -> list[object]:
    parser = pytest.importorskip("prometheus_client.parser")
    match = re.search(r"metrics on (http://\S+)", log)
    assert match, log
    with urllib.request.urlopen(match.group(1), timeout=10) as response:
        text = response.read().decode()
    families = list(parser.text_string_to_metric_families(text))
    for family in families:
        assert NAME.fullmatch(family.name) and family.name.startswith("palisade_")
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
    return families


def test_show_lists_live_sessions_and_metrics_parse(keydir: Path, procs: Procs) -> None:  # noqa: F811
    pytest.importorskip("prometheus_client")
    port = free_udp_port()
    control = procs.workdir / "run" / "server.sock"
    procs.palisade("serve", "serve", f"udp://127.0.0.1:{port}", "--key",
                   str(keydir / "server.key"), "--trust", str(keydir / "client.key.pub"),
                   "--echo", "--control", str(control), "--metrics", "127.0.0.1:0",
                   ready="palisade: listening on")
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    client = Identity.load(keydir / "client.key")

    async def body() -> None:
        config = Config(identity=client, trusted_peers=[keydir / "server.key.pub"])
        async with connect(f"udp://127.0.0.1:{port}", config) as tunnel:
            for i in range(3):
                tunnel.send(b"x%d" % i)
                await tunnel.recv()
            text = await asyncio.to_thread(show, "--control", str(control), cwd=procs.workdir)
            assert text.returncode == 0, text.stderr
            assert client.fingerprint[:16] in text.stdout
            assert "S_ESTABLISHED" in text.stdout and "last packet" in text.stdout
            as_json = await asyncio.to_thread(show, "--control", str(control), "--json",
                                              cwd=procs.workdir)
            snap = json.loads(as_json.stdout)
            (session,) = snap["sessions"]
            assert session["peer_fingerprint"] == client.fingerprint
            assert session["state"] == "S_ESTABLISHED" and session["epoch"] == 0
            assert session["packets_in"] >= 3 and session["bytes_out"] > 0
            assert session["address"].startswith("127.0.0.1:")
            assert isinstance(session["drops"], dict) and session["last_packet_age"] >= 0
            assert snap["endpoint"]["half_open"] == 0
            families = {f.name: f for f in await asyncio.to_thread(
                scrape, procs.log("serve"))}  # type: ignore[attr-defined]
            packets = families["palisade_session_packets"]
            inbound = [s for s in packets.samples  # type: ignore[attr-defined]
                       if s.name == "palisade_session_packets_total"
                       and s.labels["direction"] == "in"]
            assert inbound and inbound[0].labels["peer"] == client.fingerprint[:16]
            assert inbound[0].value >= 3
            assert "palisade_endpoint_drops" in families and "palisade_info" in families

    run_bounded(body(), 60)


def test_show_lists_gateway_devices(keydir: Path, procs: Procs) -> None:  # noqa: F811
    gateway_port = free_udp_port()
    control = procs.workdir / "gateway.sock"
    with PtyLink(FAST) as line:
        procs.palisade("device", "serve", line.url("a"), "--node-id", NODE, "--echo",
                       "--key", str(keydir / "server.key"), "--trust",
                       str(keydir / "client.key.pub"), "--control", "none",
                       ready="palisade: listening on serial://")
        args = ["gateway", "--listen", f"udp://127.0.0.1:{gateway_port}", "--serial",
                line.url("b", node=NODE), "--control", str(control)]
        if _have_prometheus():
            args += ["--metrics", "127.0.0.1:0"]
        procs.palisade("gateway", *args, ready="palisade: gateway listening on")
        snap = _wait_for_link(control)
        (device,) = snap["devices"]
        assert device["node"] == NODE and device["link"] == "up"
        assert device["mtu"] >= 256 and device["baud"] == FAST
        assert isinstance(device["boot_counter"], int)
        assert isinstance(device["frame_errors"], dict)
        text = show("--control", str(control), cwd=procs.workdir)
        assert text.returncode == 0, text.stderr
        assert f"node {NODE}" in text.stdout and "link up" in text.stdout
        if _have_prometheus():
            names = {f.name for f in scrape(procs.log("gateway"))}  # type: ignore[attr-defined]
            assert {"palisade_gateway_link_up", "palisade_gateway_frame_errors"} <= names
        procs.stop()


def _have_prometheus() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _wait_for_link(control: Path) -> dict[str, object]:
    import time

    deadline = time.monotonic() + CMD_TIMEOUT
    while True:
        snap = query(control)
        devices = snap["devices"]
        assert isinstance(devices, list)
        if devices[0]["link"] == "up" and devices[0]["boot_counter"] is not None:
            return snap
        assert time.monotonic() < deadline, snap
        time.sleep(0.1)


def test_show_without_a_socket_is_a_usage_error(tmp_path: Path) -> None:
    env = cli_env()
    env.pop("XDG_RUNTIME_DIR", None)
    result = subprocess.run([sys.executable, "-m", "palisade_c", "show"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=CMD_TIMEOUT,
                            check=False)
    assert result.returncode == 2 and "control socket" in result.stderr
    missing = show("--control", str(tmp_path / "nope.sock"), cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1


def test_control_socket_replaces_a_stale_file_but_not_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"

    async def body() -> None:
        first = ControlServer(path, lambda: {"kind": "serve", "n": 1})
        await first.start()
        assert (await asyncio.to_thread(query, path))["n"] == 1
        second = ControlServer(path, lambda: {"n": 2})
        with pytest.raises(OSError, match="in use"):
            await second.start()
        assert (await asyncio.to_thread(query, path, "bogus"))["error"].startswith("unknown")
        await first.close()
        assert not path.exists()
        # A socket file left by a crashed process: replaced.
        import socket

        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()
        await second.start()
        assert (await asyncio.to_thread(query, path))["n"] == 2
        await second.close()

    run_bounded(body(), 20)
    with pytest.raises(ConfigError):
        query(path)


def test_format_show_for_an_idle_server() -> None:
    text = format_show({"kind": "serve", "listen": "udp://h:1", "pid": 1, "fingerprint": "ab",
                        "sessions": [], "endpoint": {"half_open": 2, "drops": {"x": 1}}})
    assert "no sessions" in text and "x=1" in text and "in progress 2" in text
