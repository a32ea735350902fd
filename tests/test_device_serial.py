"""The C device peer on real ptys: served in process over a paced serial line, through
``palisade gateway`` from a UDP client, and as ``palisade serve serial://… --engine c``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from aiohelpers import run_bounded
from test_cli import cli_env, start_palisade, write_keys

import palisade_c
from palisade_c.aio import connect
from palisade_c.config import Config
from palisade_c.device_engine import echo, serve_device
from palisade_c.events import EpochChanged
from palisade_c.gateway import Gateway
from palisade_c.identity import Identity
from palisade_c.transport.base import tune_for_link
from palisade_c.transport.pty import PtyLink

FAST = 1_000_000
NODE = bytes.fromhex("00000000000000c1")
PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)


def test_python_client_and_c_device_over_a_pty() -> None:
    dev_id, client_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        with PtyLink(FAST) as line:
            server = await serve_device(
                line.url("a"),
                Config(identity=dev_id, trusted_peers=[client_id.public_key], node_id=NODE),
                echo)
            try:
                cfg = Config(identity=client_id, trusted_peers=[dev_id.public_key],
                             close_drain_time=0.2)
                tunnel = await connect(line.url("b"), cfg, timeout=20)
                assert tunnel.peer_fingerprint == dev_id.fingerprint
                for i in range(3):
                    tunnel.send(b"ping %d" % i)
                    assert await tunnel.recv() == b"ping %d" % i
                server.device.request_rekey()
                server._pump()
                for i in range(30):
                    tunnel.send(b"rekey %d" % i)
                    assert await tunnel.recv() == b"rekey %d" % i
                    if any(isinstance(e, EpochChanged) for e in server.events):
                        break
                assert server.device.epoch == 1
                await tunnel.close()
                for _ in range(100):
                    if server.device.closed:
                        break
                    await asyncio.sleep(0.02)
                assert server.device.closed
            finally:
                server.close()
                await server.wait_closed()

    run_bounded(main(), 40)


def test_udp_client_through_the_gateway_to_the_c_device() -> None:
    dev_id, client_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        with PtyLink(FAST) as line:
            server = await serve_device(
                line.url("a"),
                Config(identity=dev_id, trusted_peers=[client_id.public_key], node_id=NODE),
                echo)
            # Unpinned: the gateway learns the node id from the C engine's HELLO (v2).
            gw = await Gateway.start("udp://127.0.0.1:0", [line.url("b")])
            try:
                for d in gw.devices:
                    assert await d.transport.wait_ready(5)
                    assert d.transport.peer_node_id == NODE
                host, port = gw.address
                cfg = tune_for_link(Config(identity=client_id, trusted_peers=[dev_id.public_key],
                                           node_id=NODE, close_drain_time=0.2), 512, FAST)
                tunnel = await connect(f"udp://{host}:{port}", cfg, timeout=20)
                for i in range(3):
                    tunnel.send(b"gw %d" % i)
                    assert await tunnel.recv() == b"gw %d" % i
                await tunnel.close()
            finally:
                gw.close()
                await gw.wait_closed()
                server.close()
                await server.wait_closed()

    run_bounded(main(), 40)


def test_cli_serve_engine_c_through_the_gateway(tmp_path: Path) -> None:
    env = cli_env()
    write_keys(tmp_path, "device", "client")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = NODE.hex()

    def start(name: str, *args: str, ready: str) -> subprocess.Popen[bytes]:
        return start_palisade(tmp_path, name, *args, ready=ready)

    with PtyLink(FAST) as line:
        procs: list[subprocess.Popen[Any]] = []
        try:
            procs.append(start("device", "serve", line.url("a"), "--echo", "--engine", "c",
                               "--node-id", node, "--key", "device.key",
                               "--trust", "client.key.pub",
                               ready="with the C device engine"))
            procs.append(start("gateway", "gateway", "--listen", f"udp://127.0.0.1:{port}",
                               "--serial", line.url("b", node=node),
                               ready="palisade: gateway listening on udp://127.0.0.1"))
            result = subprocess.run(
                [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
                 "--node-id", node, "--mtu", "512", "--link-bps", str(FAST),
                 "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=env, input="alpha\nbeta\n", capture_output=True, text=True,
                timeout=30, check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.splitlines() == ["alpha", "beta"]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                assert proc.wait(timeout=10) == 0


def test_demo_with_the_c_engine(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "palisade_c", "demo", "--engine", "c", "--baud", str(FAST),
         "--messages", "3"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": PACKAGE_PARENT}, capture_output=True,
        text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "final epoch 1" in result.stdout


def test_engine_c_refuses_the_options_it_does_not_implement(tmp_path: Path) -> None:
    """The C peer has no forwarder, metrics or shaping: asking for them is a usage error that
    names them, not a device that silently ignores them."""
    from test_cli import palisade

    Identity.generate().save(tmp_path / "device.key")
    client = Identity.generate()
    client.save_public(tmp_path / "client.key.pub")
    result = palisade("serve", "serial:///dev/null", "--engine", "c", "--node-id", NODE.hex(),
                      "--key", "device.key", "--trust", "client.key.pub",
                      "--forward", "udp://127.0.0.1:9", "--shaping", "pad:0-16", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--engine c does not support --forward, --shaping" in result.stderr
