"""A device behind ``palisade gateway`` as a new user runs it: three processes, no node id on
the gateway, no ``--mtu`` or ``--link-bps`` on the client.

The serial line is a pty pair made by socat (the way one bridges a bench device by hand); the
device end runs ``palisade serve serial://... --node-id X --echo``. The gateway learns the node
id from the device's link HELLO, and the client learns the path's datagram size and speed from
the gateway's PATH notice.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import write_keys

import palisade_c

PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)
NODE = "00112233445566a7"
MTU = 512
MAX_PAYLOAD = MTU - 61

pytestmark = pytest.mark.skipif(shutil.which("socat") is None,
                                reason="socat not installed (Debian package socat)")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, e.get("PYTHONPATH")) if p)
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: object, what: str, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            detail = log.read_text(errors="replace") if log is not None else ""
            raise AssertionError(f"{what}: {detail}")
        time.sleep(0.02)


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """Two linked ptys from socat: ``(device end, gateway end)``."""
    dev, gw = tmp_path / "dev", tmp_path / "gw"
    proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={dev}",
                             f"pty,raw,echo=0,link={gw}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: dev.exists() and gw.exists(), "socat made no ptys", proc)
        yield dev, gw
    finally:
        proc.terminate()
        proc.wait(timeout=5)


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, ready: str) -> subprocess.Popen[bytes]:
        err = self.workdir / f"{name}.err"
        with err.open("wb") as err_file:
            proc = subprocess.Popen([sys.executable, "-m", "palisade_c", *args],
                                    cwd=self.workdir, env=env(), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err_file)
        self.procs.append(proc)
        wait_for(lambda: ready in err.read_text(errors="replace"), f"{name} not ready", proc,
                 err)
        return proc

    def stop(self) -> list[int]:
        for proc in self.procs:
            proc.terminate()
        return [proc.wait(timeout=10) for proc in self.procs]


def test_connect_through_a_gateway_with_nothing_but_the_node_id(
    tmp_path: Path, pty_pair: tuple[Path, Path]
) -> None:
    dev, gw = pty_pair
    write_keys(tmp_path, "device", "client")
    port = free_udp_port()
    procs = Procs(tmp_path)
    try:
        procs.start("device", "serve", f"serial://{dev}", "--node-id", NODE, "--echo",
                    "--key", "device.key", "--trust", "client.key.pub",
                    ready="palisade: listening on serial://")
        procs.start("gateway", "gateway", "--listen", f"udp://127.0.0.1:{port}",
                    "--serial", f"serial://{gw}",
                    ready="palisade: gateway listening on udp://127.0.0.1")
        lines = ["short", "m" * MAX_PAYLOAD, "x" * (MAX_PAYLOAD + 1), "last"]
        result = subprocess.run(
            [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
             "--node-id", NODE, "--key", "client.key", "--trust", "device.key.pub"],
            cwd=tmp_path, env=env(), input="\n".join(lines) + "\n", capture_output=True,
            text=True, timeout=30, check=False,
        )
    finally:
        codes = procs.stop()
    assert result.stdout.splitlines() == [lines[0], lines[1], lines[3]], result.stderr
    assert result.returncode == 5  # data not delivered (docs/cli.md)
    # Handshake progress lines may come first: the path behind a gateway is a slow one.
    errors = [ln for ln in result.stderr.splitlines() if not ln.startswith("palisade: handshake")]
    assert errors[0] == (
        f"palisade: line 3 skipped: {MAX_PAYLOAD + 1} bytes, more than the {MAX_PAYLOAD} "
        "bytes one datagram of this path carries")
    assert codes == [0, 0]


def test_connect_carries_on_after_the_device_restarts_behind_the_gateway(
    tmp_path: Path, pty_pair: tuple[Path, Path]
) -> None:
    """The device process dies and starts again (a new boot counter): the gateway's REBOOT
    notice makes the client probe its session, the probe fails within seconds, and connect
    handshakes again and carries on, with nothing lost."""
    dev, gw = pty_pair
    write_keys(tmp_path, "device", "client")
    port = free_udp_port()
    procs = Procs(tmp_path)
    device_args = ("serve", f"serial://{dev}", "--node-id", NODE, "--echo",
                   "--key", "device.key", "--trust", "client.key.pub")
    client_err = tmp_path / "client.err"
    client: subprocess.Popen[bytes] | None = None
    try:
        device = procs.start("device", *device_args, ready="palisade: listening on serial://")
        procs.start("gateway", "gateway", "--listen", f"udp://127.0.0.1:{port}",
                    "--serial", f"serial://{gw}",
                    ready="palisade: gateway listening on udp://127.0.0.1")
        with client_err.open("wb") as err_file:
            client = subprocess.Popen(
                [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}",
                 "--node-id", NODE, "--key", "client.key", "--trust", "device.key.pub"],
                cwd=tmp_path, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err_file)
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"before\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"before\n"
        device.kill()  # power loss: not a word to anyone
        device.wait(timeout=5)
        procs.procs.remove(device)
        procs.start("device2", *device_args, ready="palisade: listening on serial://")
        # Seconds, not the 60 s idle timeout: the REBOOT notice and the failed probe.
        wait_for(lambda: "connecting again" in client_err.read_text(errors="replace"),
                 "the client never noticed the restart", client, client_err, timeout=15)
        client.stdin.write(b"after\n")
        client.stdin.close()
        assert client.stdout.readline() == b"after\n"
        assert client.wait(timeout=20) == 0, client_err.read_text(errors="replace")
        assert "restarted" in client_err.read_text(errors="replace")
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        procs.stop()
