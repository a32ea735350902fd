"""Logging of the ``palisade`` command (issue 14): levels without third-party floods,
journald, rate-limited session lines, and the JSON event log (wall-clock time, ``-`` for
stdout, aggregated drop classes including the endpoint's, and the gateway's events)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from simlink import free_udp_port
from test_cli import CMD_TIMEOUT, cli_env
from test_forward import Procs, procs  # noqa: F401  (fixture)

from palisade_c import Config, Identity, ServerEndpoint
from palisade_c.logsetup import DropReporter, RateLimitFilter, setup_logging
from palisade_c.transport.pty import PtyLink

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
NODE = "0a0b0c0d0e0f1011"


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("log-keys")
    for name in ("server", "client", "stranger"):
        ident = Identity.generate()
        ident.save(d / f"{name}.key")
        ident.save_public(d / f"{name}.key.pub")
    return d


def _serve(procs: Procs, keydir: Path, *extra: str) -> int:  # noqa: F811
    port = free_udp_port()
    procs.palisade("serve", "serve", f"udp://127.0.0.1:{port}", "--key",
                   str(keydir / "server.key"), "--trust", str(keydir / "client.key.pub"),
                   "--echo", "--control", "none", *extra, ready="palisade: listening on")
    return port


def _connect(keydir: Path, port: int, key: str, *extra: str, cwd: Path
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "palisade_c", "connect", f"udp://127.0.0.1:{port}", "--key",
         str(keydir / f"{key}.key"), "--trust", str(keydir / "server.key.pub"), "--timeout",
         "5", *extra], cwd=cwd, env=cli_env(), input="hello\n", capture_output=True, text=True,
        timeout=CMD_TIMEOUT, check=False)


def test_verbose_keeps_third_party_loggers_quiet(keydir: Path, procs: Procs) -> None:  # noqa: F811
    _serve(procs, keydir, "-v")
    log = procs.log("serve")
    # asyncio logs its selector choice at DEBUG when the loop starts: not ours to show.
    assert "DEBUG palisade_c" in log
    assert not [ln for ln in log.splitlines() if " DEBUG " in ln
                and not re.search(r" DEBUG (palisade_c|firmware_bridge)", ln)], log


def test_setup_logging_levels() -> None:
    setup_logging("info", False, stream=sys.stderr)
    assert logging.getLogger("palisade_c").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("asyncio").getEffectiveLevel() == logging.WARNING
    setup_logging(None, True, stream=sys.stderr)
    assert logging.getLogger("firmware_bridge.gateway").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("serial").getEffectiveLevel() == logging.WARNING
    setup_logging(None, False, stream=sys.stderr)
    assert logging.getLogger("palisade_c").getEffectiveLevel() == logging.WARNING


def test_rate_limit_filter_counts_what_it_holds_back() -> None:
    now = [0.0]
    limit = RateLimitFilter(rate=2, per=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("palisade_c.sessions", logging.INFO, __file__, 1, msg, None,
                                 None)

    assert [limit.filter(record(f"m{i}")) for i in range(5)] == [True, True, False, False,
                                                                 False]
    now[0] = 10.0
    passed = record("next")
    assert limit.filter(passed) and "3 session lines suppressed" in passed.getMessage()


def test_session_lines_at_info_and_journald_format(keydir: Path, procs: Procs) -> None:  # noqa: F811
    err = procs.workdir / "journal.err"
    with err.open("wb") as f:
        st = os.fstat(f.fileno())
        env = cli_env()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        port = free_udp_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "palisade_c", "serve", f"udp://127.0.0.1:{port}", "--key",
             str(keydir / "server.key"), "--trust", str(keydir / "client.key.pub"), "--echo",
             "--control", "none", "--log-level", "info"],
            cwd=procs.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=f)
    procs.procs.append(proc)
    deadline = time.monotonic() + CMD_TIMEOUT
    while "listening on" not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    ok = _connect(keydir, port, "client", cwd=procs.workdir)
    assert ok.returncode == 0, ok.stderr
    refused = _connect(keydir, port, "stranger", cwd=procs.workdir)
    assert refused.returncode == 3
    while "handshake refused" not in err.read_text() or "closed server-1" not in err.read_text():
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.05)
    lines = err.read_text().splitlines()
    logged = [ln for ln in lines if not ln.startswith("palisade: ")]
    assert logged and all(ln.startswith("<") for ln in logged), lines  # syslog priorities
    assert not any(re.match(r"<\d>\d{4}-", ln) for ln in logged)  # no timestamps of our own
    opened = [ln for ln in logged if "session opened from ('127.0.0.1'" in ln]
    assert opened and opened[0].startswith("<6>palisade_c.sessions:")
    refusal = [ln for ln in logged if "handshake refused from ('127.0.0.1'," in ln]
    assert refusal and "ErrorCertificateInvalid" in refusal[0]
    closed = [ln for ln in logged if "closed server-1" in ln]
    assert "by=peer code=ErrorNone" in closed[0]


def test_log_json_to_stdout_has_wall_clock_time(keydir: Path, procs: Procs) -> None:  # noqa: F811
    port = _serve(procs, keydir)
    result = _connect(keydir, port, "client", "--log-json", "-", cwd=procs.workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "hello" in lines
    events = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert events and all(RFC3339.fullmatch(e["time"]) for e in events)
    assert all(isinstance(e["t"], float) for e in events)
    assert {"established", "closed"} <= {e["kind"] for e in events}


def test_drop_classes_are_logged_aggregated_with_endpoint_drops(
        keydir: Path, procs: Procs) -> None:  # noqa: F811
    events_path = procs.workdir / "events.jsonl"
    port = _serve(procs, keydir, "--log-json", str(events_path), "--log-interval", "0.3")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(4):
            s.sendto(b"GET / HTTP/1.1\r\n" + bytes(60), ("127.0.0.1", port))
        s.sendto(b"\x51", ("127.0.0.1", port))
        s.sendto(b"\x51\x50" + bytes(80), ("127.0.0.1", port))
    deadline = time.monotonic() + CMD_TIMEOUT
    totals: dict[str, int] = {}
    while totals != {"bad-magic": 4, "truncated": 1, "unknown-rid": 1}:
        assert time.monotonic() < deadline, totals
        time.sleep(0.1)
        totals = {}
        for line in events_path.read_text().splitlines():
            event = json.loads(line)
            if event["kind"] == "drops" and event["source"] == "endpoint":
                assert event["interval"] == 0.3 and RFC3339.fullmatch(event["time"])
                for k, v in event["drops"].items():
                    totals[k] = totals.get(k, 0) + v


def test_endpoint_counts_non_palisade_datagrams_as_bad_magic() -> None:
    ep = ServerEndpoint(Config(identity=Identity.generate()))
    ep.receive_datagram(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40), ("127.0.0.1", 1), 0.0)
    ep.receive_datagram(b"\x51\x50" + bytes(80), ("127.0.0.1", 1), 0.0)
    assert ep.drop_counts == {"bad-magic": 1, "unknown-rid": 1}


def test_drop_reporter_reports_deltas_and_closed_sources() -> None:
    live = {"endpoint": {"truncated": 1}, "server-1": {"bad-tag": 2}}
    out: list[dict[str, object]] = []
    reporter = DropReporter(lambda: {k: dict(v) for k, v in live.items()}, out.append,
                            interval=5.0)
    reporter.report(1.0)
    assert [(e["source"], e["drops"]) for e in out] == [("endpoint", {"truncated": 1}),
                                                        ("server-1", {"bad-tag": 2})]
    out.clear()
    live["server-1"]["bad-tag"] = 5
    reporter.track()
    del live["server-1"]  # the session closed after its last count was read
    reporter.report(2.0)
    assert [(e["source"], e["drops"]) for e in out] == [("server-1", {"bad-tag": 3})]
    out.clear()
    reporter.report(3.0)
    assert out == []


def test_gateway_log_json(keydir: Path, procs: Procs) -> None:  # noqa: F811
    events_path = procs.workdir / "gateway.jsonl"
    port = free_udp_port()
    with PtyLink(1_000_000) as line:
        procs.palisade("device", "serve", line.url("a"), "--node-id", NODE, "--echo",
                       "--key", str(keydir / "server.key"), "--trust",
                       str(keydir / "client.key.pub"), "--control", "none",
                       ready="palisade: listening on serial://")
        procs.palisade("gateway", "gateway", "--listen", f"udp://127.0.0.1:{port}", "--serial",
                       line.url("b", node=NODE), "--log-json", str(events_path),
                       "--log-interval", "0.3", ready="palisade: gateway listening on")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"not palisade at all", ("127.0.0.1", port))
        deadline = time.monotonic() + CMD_TIMEOUT
        while True:
            events = [json.loads(ln) for ln in events_path.read_text().splitlines()]
            kinds = {(e["kind"], e.get("state")) for e in events}
            drops = [e for e in events if e["kind"] == "drops" and e["source"] == "gateway"]
            if ("link", "up") in kinds and drops:
                break
            assert time.monotonic() < deadline, events
            time.sleep(0.1)
        assert drops[0]["drops"] == {"not-palisade": 1}
        assert all(RFC3339.fullmatch(e["time"]) for e in events)
        procs.stop()


def test_connect_log_json_ends_with_its_session_drops(keydir: Path, tmp_path: Path) -> None:
    """The server (in this process) sends the client a packet for no session before it
    echoes; ``connect --log-json -`` reports that drop in a final ``drops`` event."""
    import asyncio

    from aiohelpers import run_bounded, served

    from palisade_c.aio import Tunnel

    config = Config(identity=Identity.load(keydir / "server.key"),
                    trusted_peers=[keydir / "client.key.pub"])

    async def body() -> subprocess.CompletedProcess[str]:
        async def handler(tunnel: Tunnel) -> None:
            async for data in tunnel:
                # straight onto the wire, past the tunnel: a packet for no session
                server._engine.transport.send(b"\x51\x50" + bytes(80), tunnel.peer_address)
                await asyncio.sleep(0.1)
                tunnel.send(data)

        async with served("udp://127.0.0.1:0", config, handler) as server:
            port = server.address[1]
            return await asyncio.to_thread(_connect, keydir, port, "client", "--log-json", "-",
                                           cwd=tmp_path)

    result = run_bounded(body(), 30)
    assert result.returncode == 0, result.stderr
    events = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    drops = [e for e in events if e["kind"] == "drops"]
    assert len(drops) == 1 and drops[0]["source"] == "client", events
    assert sum(drops[0]["drops"].values()) == 1


def test_a_half_open_session_dropped_at_shutdown_is_not_a_refused_handshake(
        caplog: pytest.LogCaptureFixture) -> None:
    """Only a handshake that failed (an error code, or the client gave up) is 'refused'. A
    server stopping with half-open sessions refused nobody: each was logged as a refusal with
    ErrorNone, one INFO line per stray ClientHello fragment."""
    import asyncio

    from aiohelpers import run_bounded

    from palisade_c.aio import serve
    from palisade_c.connection import Connection

    server_id, client_id = Identity.generate(), Identity.generate()

    async def main() -> None:
        config = Config(identity=server_id, trusted_peers=[client_id.fingerprint])
        server = await serve("udp://127.0.0.1:0", config, lambda tunnel: asyncio.sleep(0))
        host, port = server.address
        client = Connection(Config(identity=client_id, trusted_peers=[server_id.fingerprint]),
                            True)
        client.connect((host, port), 0.0)
        first = client.datagrams_to_send()[0][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(first, (host, port))  # one fragment: a half-open session, never finished
            for _ in range(100):
                await asyncio.sleep(0.01)
                if server.endpoint.half_open:
                    break
        assert server.endpoint.half_open == 1
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.DEBUG, logger="palisade_c.sessions"):
        run_bounded(main(), 30)
    lines = [r for r in caplog.records if r.name == "palisade_c.sessions"]
    assert not [r for r in lines if "refused" in r.getMessage()]
    assert [r for r in lines if r.levelno == logging.DEBUG and "abandoned" in r.getMessage()]
