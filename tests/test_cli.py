"""The ``palisade`` command line, run as real subprocesses over UDP on the loopback interface.

Each command runs as ``python -m palisade_c`` with a temporary working directory, so the
package is imported from where it is installed (site-packages in CI), never picked up by
accident from the current directory. ``PYTHONPATH`` names the directory this test process
imported ``palisade_c`` from: in CI that is the installed copy anyway, and in a developer's
in-place build it is the source tree, which is not installed at all.

The echo server runs for the whole module and is always terminated by its fixture finalizer,
whatever the tests do. Its stderr goes to a file rather than a pipe: a pipe nobody drains
would eventually block a verbose server.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from simlink import free_udp_port

import palisade_c
from palisade_c.identity import Identity, fingerprint, load_public_key

PACKAGE_PARENT = str(Path(palisade_c.__file__).resolve().parent.parent)
CMD_TIMEOUT = 20.0  # seconds; a hung command fails its test instead of hanging the suite


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def write_keys(directory: Path, *names: str) -> None:
    """A fresh identity per name: ``NAME.key`` (0600) and ``NAME.key.pub`` in ``directory``."""
    for name in names:
        ident = Identity.generate()
        ident.save(directory / f"{name}.key")
        ident.save_public(directory / f"{name}.key.pub")


def start_palisade(cwd: Path, name: str, *args: str, ready: str,
                   timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """``palisade ARGS`` as a background process in ``cwd``, its stderr in ``NAME.err``;
    returns once ``ready`` appears there (fails with that log if it exits or times out)."""
    err = cwd / f"{name}.err"
    with err.open("wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "palisade_c", *args], cwd=cwd,
                                env=cli_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.monotonic() + timeout
    while ready not in err.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(err.read_text(errors="replace"))
        time.sleep(0.05)
    return proc


def palisade(
    *args: str, cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade_c", *args],
        cwd=cwd, env=cli_env(), input=stdin if stdin is not None else "",
        capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False,
    )


@dataclass
class Keys:
    dir: Path
    stdout: dict[str, str]  # what keygen printed, per key name

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def pub(self, name: str) -> str:
        return str(self.dir / f"{name}.key.pub")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("cli-keys")
    printed = {}
    for name in ("server", "client", "stranger"):
        result = palisade("keygen", "-o", f"{name}.key", cwd=d)
        assert result.returncode == 0, result.stderr
        printed[name] = result.stdout
    return Keys(d, printed)


@dataclass
class EchoServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _start_server(keys: Keys, workdir: Path, *extra: str) -> EchoServer:
    """Start ``serve --echo`` on a free port; retry with another port if that one is taken."""
    for attempt in range(5):
        port = free_udp_port()
        log = workdir / f"serve-{attempt}.log"
        with log.open("wb") as err:
            process = subprocess.Popen(
                [sys.executable, "-m", "palisade_c", "serve", f"udp://127.0.0.1:{port}",
                 "--key", keys.key("server"), "--trust", keys.pub("client"), "--echo", "-v",
                 *extra],
                cwd=workdir, env=cli_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err,
            )
        server = EchoServer(f"udp://127.0.0.1:{port}", process, log)
        deadline = time.monotonic() + CMD_TIMEOUT
        while time.monotonic() < deadline:
            if "palisade: listening on" in server.log_text():
                return server
            if process.poll() is not None:
                break  # it exited: most likely the port was taken meanwhile; try another
            time.sleep(0.05)
        else:
            process.kill()
            process.wait()
            pytest.fail(f"server did not start in time:\n{server.log_text()}")
    pytest.fail(f"server could not bind after 5 attempts:\n{server.log_text()}")


@pytest.fixture(scope="module")
def echo_server(keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoServer]:
    server = _start_server(keys, tmp_path_factory.mktemp("cli-serve"))
    try:
        yield server
    finally:
        # Always stop it: SIGTERM first (a clean shutdown), then SIGKILL if it lingers.
        server.process.terminate()
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# -- keygen ---------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_a_public_key_and_prints_the_fingerprint(keys: Keys) -> None:
    for name in ("server", "client"):
        private = Path(keys.key(name))
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        printed = keys.stdout[name].strip()
        assert re.fullmatch(r"[0-9a-f]{64}", printed), keys.stdout[name]
        assert keys.stdout[name] == printed + "\n"  # the fingerprint and nothing else
        assert Identity.load(private).fingerprint == printed
        assert fingerprint(load_public_key(keys.pub(name))) == printed
    assert keys.stdout["server"] != keys.stdout["client"]


def test_keygen_refuses_to_overwrite(keys: Keys, workdir: Path) -> None:
    first = palisade("keygen", "-o", "k.key", cwd=workdir)
    assert first.returncode == 0
    again = palisade("keygen", "-o", "k.key", cwd=workdir)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert Identity.load(workdir / "k.key").fingerprint == first.stdout.strip()


# -- connect through the echo server ---------------------------------------------------------------


def test_connect_echoes_stdin_lines(keys: Keys, echo_server: EchoServer, workdir: Path) -> None:
    lines = "first line\nsecond line\nthird line\n"
    result = palisade("connect", echo_server.url, "--key", keys.key("client"),
                      "--trust", keys.pub("server"), "--timeout", "5", cwd=workdir, stdin=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout == lines
    assert result.stderr == ""


def test_connect_reports_every_line_too_long_for_the_path_and_exits_non_zero(
    keys: Keys, echo_server: EchoServer, workdir: Path
) -> None:
    # --mtu 512 on plain UDP: 451 bytes of payload fit one datagram; 452 and 2000 do not.
    lines = ["a" * 451, "b" * 2000, "short", "c" * 452]
    result = palisade("connect", echo_server.url, "--key", keys.key("client"), "--mtu", "512",
                      "--trust", keys.pub("server"), "--timeout", "5", cwd=workdir,
                      stdin="\n".join(lines) + "\n")
    assert result.returncode == 5, result.stderr  # data not delivered (docs/cli.md)
    assert result.stdout.splitlines() == [lines[0], "short"]
    errors = result.stderr.splitlines()
    assert errors[0] == ("palisade: line 2 skipped: 2000 bytes, more than the 451 bytes one "
                         "datagram of this path carries")
    assert errors[1].startswith("palisade: line 4 skipped: 452 bytes")
    assert errors[2:] == ["palisade: 2 line(s) not sent: longer than the path's maximum payload"]


def test_verbose_server_logs_a_one_line_summary_on_close(
    keys: Keys, echo_server: EchoServer, workdir: Path
) -> None:
    result = palisade("connect", echo_server.url, "--key", keys.key("client"),
                      "--trust", keys.pub("server"), cwd=workdir, stdin="summary please\n")
    assert result.returncode == 0, result.stderr
    # The server finishes its close after its drain time (1 s by default).
    deadline = time.monotonic() + 5
    summaries: list[str] = []
    while time.monotonic() < deadline and not summaries:
        summaries = [line for line in echo_server.log_text().splitlines()
                     if "closed server-" in line and "counters=" in line]
        time.sleep(0.1)
    assert summaries, echo_server.log_text()
    assert '"packets_in":' in summaries[-1] and '"state":"S_CLOSED"' in summaries[-1]


def test_untrusted_client_key_fails_with_one_line(
    keys: Keys, echo_server: EchoServer, workdir: Path
) -> None:
    result = palisade("connect", echo_server.url, "--key", keys.key("stranger"),
                      "--trust", keys.pub("server"), "--timeout", "5", cwd=workdir,
                      stdin="never sent\n")
    assert result.returncode == 3  # EXIT_HANDSHAKE: refused
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "ErrorCertificateInvalid" in result.stderr


def test_unpinned_server_key_fails_with_one_line(
    keys: Keys, echo_server: EchoServer, workdir: Path
) -> None:
    result = palisade("connect", echo_server.url, "--key", keys.key("client"),
                      "--trust", keys.pub("stranger"), "--timeout", "5", cwd=workdir)
    assert result.returncode == 3  # EXIT_HANDSHAKE: refused
    assert result.stderr.count("\n") == 1, result.stderr
    assert "ErrorCertificateInvalid" in result.stderr


def test_handshake_timeout_fails_with_one_line(keys: Keys, workdir: Path) -> None:
    started = time.monotonic()
    result = palisade("connect", f"udp://127.0.0.1:{free_udp_port()}", "--key",
                      keys.key("client"), "--trust", keys.pub("server"), "--timeout", "1",
                      cwd=workdir, stdin="x\n")
    assert result.returncode == 4  # EXIT_TIMEOUT
    assert result.stderr.count("\n") == 1, result.stderr
    assert "handshake timed out" in result.stderr
    assert time.monotonic() - started < 10


def test_bad_url_fails_with_one_line(keys: Keys, workdir: Path) -> None:
    result = palisade("connect", "udp://127.0.0.1", "--key", keys.key("client"),
                      "--trust", keys.pub("server"), cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "bad URL" in result.stderr


def test_bad_node_id_is_a_usage_error(keys: Keys, workdir: Path) -> None:
    result = palisade("connect", "udp://127.0.0.1:1", "--key", keys.key("client"),
                      "--trust", keys.pub("server"), "--node-id", "0102", cwd=workdir)
    assert result.returncode == 2
    assert "node id must be 8 bytes" in result.stderr


# -- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["keygen"], ["serve"], ["connect"]])
def test_help(command: list[str], workdir: Path) -> None:
    result = palisade(*command, "--help", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: palisade")
    for option in {"keygen": ["-o"], "serve": ["--key", "--trust", "--echo", "--node-id", "-v"],
                   "connect": ["--key", "--trust", "--timeout", "--node-id"]}.get(
                       command[0] if command else "", ["keygen", "serve", "connect"]):
        assert option in result.stdout


def test_node_id_reaches_the_config(keys: Keys, echo_server: EchoServer, workdir: Path) -> None:
    from palisade_c.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "udp://127.0.0.1:1", "--key", "k", "--trust", "t", "--node-id",
         "0102030405060708", "-v"])
    assert args.node_id == bytes.fromhex("0102030405060708") and args.verbose
    # A client that names a node id still reaches a server that has none (the server keeps
    # the client's steering prefix).
    result = palisade("connect", echo_server.url, "--key", keys.key("client"),
                      "--trust", keys.pub("server"), "--node-id", "0102030405060708",
                      cwd=workdir, stdin="routed\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "routed\n"


def test_separate_runs_resume_with_a_ticket_file_and_early_data(
        keys: Keys, tmp_path: Path) -> None:
    """Run 1 does a full handshake and saves its ticket; run 2, a new process, resumes from
    the file and sends --early-data as 0-RTT. The server keeps used tickets in SQLite and
    writes a JSON-lines event log, in which the resumption shows."""
    events = tmp_path / "server-events.jsonl"
    server = _start_server(keys, tmp_path, "--ticket-db", str(tmp_path / "used.sqlite"),
                           "--log-json", str(events))
    tickets = str(tmp_path / "tickets.json")
    common = ("connect", server.url, "--key", keys.key("client"), "--trust", keys.pub("server"),
              "--timeout", "5", "--ticket-file", tickets)
    try:
        first = palisade(*common, cwd=tmp_path, stdin="full\n")
        assert first.returncode == 0, first.stderr
        assert first.stdout == "full\n"
        assert stat.S_IMODE(os.stat(tickets).st_mode) == 0o600
        second = palisade(*common, "--early-data", "zero", cwd=tmp_path, stdin="one\n")
        assert second.returncode == 0, second.stderr
        assert sorted(second.stdout.splitlines()) == ["one", "zero"]
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)
    logged = [json.loads(line) for line in events.read_text().splitlines()]
    established = [e for e in logged if e["kind"] == "established"]
    assert [e["resumed"] for e in established] == [False, True]
