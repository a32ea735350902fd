"""Helpers for the scale-out tests: a ``palisade serve --workers`` process, its keys, and a
real ``redis-server`` on a free loopback port (skipped, saying why, where none is installed;
CI installs it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from simlink import free_udp_port

import palisade_c
from palisade_c.aio import Tunnel
from palisade_c.config import PLUS_MIGRATION, PLUS_RESUMPTION, Config
from palisade_c.identity import Identity

PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)
START_TIMEOUT = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Fleet:
    """A ``palisade serve --workers N --echo`` process and its log."""

    def __init__(self, tmp: Path, server_key: Path, client_pub: Path, *extra: str,
                 workers: int = 2) -> None:
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        for _attempt in range(5):
            self.port = free_udp_port()
            with self.log.open("wb") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "palisade_c", "serve",
                     f"udp://127.0.0.1:{self.port}", "--key", str(server_key),
                     "--trust", str(client_pub), "--echo", "--plus", "-v",
                     "--workers", str(workers), *extra],
                    cwd=tmp, env=_env(), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if "palisade: listening on" in self.text():
                    return
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            else:
                self.stop()
                pytest.fail(f"server did not start:\n{self.text()}")
        pytest.fail(f"server could not start:\n{self.text()}")

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def tunnels_per_worker(self) -> Counter[str]:
        return Counter(line.split("]")[0] + "]" for line in self.text().splitlines()
                       if line.startswith("[worker") and ": session opened from" in line)


@pytest.fixture(scope="module", name="keyfiles")
def keyfiles_fixture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Identity]:
    d = tmp_path_factory.mktemp("worker-keys")
    server, client = Identity.generate(), Identity.generate()
    server.save(d / "server.key")
    server.save_public(d / "server.key.pub")
    client.save(d / "client.key")
    client.save_public(d / "client.key.pub")
    return d / "server.key", d / "client.key.pub", client


@pytest.fixture(name="fleet")
def fleet_fixture(tmp_path: Path, keyfiles: tuple[Path, Path, Identity]) -> Iterator[Fleet]:
    f = Fleet(tmp_path, keyfiles[0], keyfiles[1])
    try:
        yield f
    finally:
        f.stop()
        assert not [p for p in _children(f.proc.pid)], "a worker outlived its supervisor"


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _client_config(keyfiles: tuple[Path, Path, Identity], **kw: Any) -> Config:
    server_pub = keyfiles[0].with_name("server.key.pub")
    return Config(identity=keyfiles[2], trusted_peers=[str(server_pub)],
                  plus_features=PLUS_RESUMPTION | PLUS_MIGRATION, initial_rto=1.0,
                  handshake_timeout=45.0, **kw)


async def _round_trip(tunnel: Tunnel, data: bytes) -> None:
    """Send until the echo comes back: tunnel datagrams are unreliable, like UDP, and a burst
    of 200 handshakes can overflow a socket buffer."""
    for _ in range(20):
        tunnel.send(data)
        try:
            async with asyncio.timeout(1.5):
                while await tunnel.recv() != data:
                    pass
            return
        except TimeoutError:
            continue
    raise AssertionError(f"no echo of {data!r}")


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A throwaway ``redis-server`` (no persistence) that a test can stop and start again."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (CI installs it: .ci/run)")
        self.exe = exe
        self.dir = workdir
        self.port = free_tcp_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                pytest.fail("redis-server exited at start")
            time.sleep(0.05)
        self.stop()
        pytest.fail("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    pytest.importorskip("redis", reason="the redis client is the 'redis' extra")
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()
