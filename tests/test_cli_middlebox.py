"""The real ``palisade`` processes through a seeded lossy UDP middlebox (tests/middlebox.py).

Issue 10, item 2: before the fix a client that held part of the server's flight went silent
once its acks were lost, the server sat at its amplification budget, and ``connect`` gave up
after the whole handshake timeout saying "no answer". Here the handshake crosses a path that
loses, duplicates and reorders handshake records, and the echo must come back.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from middlebox import Middlebox
from test_cli import CMD_TIMEOUT, EchoServer, Keys, _start_server, cli_env, palisade

from palisade_c.cli import EXIT_TIMEOUT


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("middlebox-keys")
    for name in ("server", "client"):
        result = palisade("keygen", "-o", f"{name}.key", cwd=d)
        assert result.returncode == 0, result.stderr
    return Keys(d, {})


@pytest.fixture(scope="module")
def server(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    started = _start_server(keys, tmp_path_factory.mktemp("middlebox-serve"))
    try:
        yield started
    finally:
        started.process.terminate()
        try:
            started.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            started.process.kill()
            started.process.wait()


def target_of(server: EchoServer) -> tuple[str, int]:
    return ("127.0.0.1", int(server.url.rsplit(":", 1)[1]))


def connect(keys: Keys, url: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade_c", "connect", url, "--key", keys.key("client"),
         "--trust", keys.pub("server"), *extra],
        cwd=cwd, env=cli_env(), input="hi\n", capture_output=True, text=True,
        timeout=CMD_TIMEOUT, check=False,
    )


@pytest.mark.parametrize("seed", [23, 24, 25])
def test_echo_arrives_through_a_lossy_middlebox(keys: Keys, server: EchoServer, tmp_path: Path,
                                                 seed: int) -> None:
    with Middlebox(target_of(server), seed=seed, loss=0.25, duplicate=0.1, reorder=0.2,
                   only_prefix=b"QH") as box:
        result = connect(keys, box.url, tmp_path)
    assert result.returncode == 0, (result.stderr, dict(box.counters))
    assert result.stdout == "hi\n"


def test_a_partial_reply_whose_acks_are_lost_still_completes(
        keys: Keys, server: EchoServer, tmp_path: Path) -> None:
    """The reproduction's schedule, forced: only the first datagram of the server's flight
    (and none of its first resends) reaches the client, and the client's first two acks are
    lost (its hello takes the first three datagrams up). Before the fix the client then went
    silent and the server stopped at its amplification budget: a deadlock until the timeout."""
    with Middlebox(target_of(server), only_prefix=b"QH", drop_up=frozenset({4, 5}),
                   drop_down=frozenset(range(2, 10))) as box:
        result = connect(keys, box.url, tmp_path, "--timeout", "6")
    assert result.returncode == 0, (result.stderr, dict(box.counters))
    assert result.stdout == "hi\n"
    assert box.counters["up-dropped"] == 2


def test_silence_is_reported_as_no_answer(keys: Keys, server: EchoServer,
                                          tmp_path: Path) -> None:
    with Middlebox(target_of(server), pass_down=0) as box:
        result = connect(keys, box.url, tmp_path, "--timeout", "1")
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert f"(no answer from {box.url})" in result.stderr, result.stderr


def test_a_stalled_reply_is_not_called_silence(keys: Keys, server: EchoServer,
                                               tmp_path: Path) -> None:
    """Two datagrams of the server's reply get through, then the path dies: the error says
    how much arrived instead of 'no answer'."""
    with Middlebox(target_of(server), pass_down=2) as box:
        result = connect(keys, box.url, tmp_path, "--timeout", "1.5")
    assert result.returncode == EXIT_TIMEOUT, result.stderr
    assert "then stalled" in result.stderr and "no answer" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
