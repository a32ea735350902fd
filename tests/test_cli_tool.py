"""CLI conventions (issue 14): --version, pubkey/fingerprint, exit codes, SIGTERM, trust
directories reloaded on SIGHUP, config file and environment precedence, and the library's
``async with connect(...)`` and Transport objects.

Commands run as real subprocesses on the loopback, as in test_cli.py (whose helpers are
reused).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohelpers import run_bounded, served
from simlink import free_udp_port
from test_cli import CMD_TIMEOUT, Keys, _start_server, cli_env, palisade

import palisade_c
from palisade_c import cli, settings
from palisade_c.aio import Tunnel, connect
from palisade_c.config import Config
from palisade_c.errors import ConfigError
from palisade_c.identity import Identity, fingerprint, load_public_key
from palisade_c.transport.udp import UdpTransport


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("tool-keys")
    printed = {}
    for name in ("server", "client", "stranger"):
        ident = Identity.generate()
        ident.save(d / f"{name}.key")
        ident.save_public(d / f"{name}.key.pub")
        printed[name] = ident.fingerprint + "\n"
    return Keys(d, printed)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for(predicate: object, what: str, bound: float = CMD_TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


# -- --version, pubkey, fingerprint ----------------------------------------------------------------


def test_version_is_the_package_version(tmp_path: Path) -> None:
    result = palisade("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"palisade {palisade_c.__version__}\n"


def test_pubkey_and_fingerprint_of_private_and_public_files(keys: Keys, tmp_path: Path) -> None:
    expected_fp = keys.stdout["client"].strip()
    for path in (keys.key("client"), keys.pub("client")):
        fp = palisade("fingerprint", path, cwd=tmp_path)
        assert fp.returncode == 0, fp.stderr
        assert fp.stdout == expected_fp + "\n"
        pub = palisade("pubkey", path, cwd=tmp_path)
        assert pub.returncode == 0, pub.stderr
        assert pub.stdout == Path(keys.pub("client")).read_text()
    # pubkey's output is a .pub file that pins the same key
    out = tmp_path / "again.pub"
    out.write_text(palisade("pubkey", keys.key("client"), cwd=tmp_path).stdout)
    assert fingerprint(load_public_key(out)) == expected_fp


def test_fingerprint_of_a_non_key_is_one_line_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    result = palisade("fingerprint", str(junk), cwd=tmp_path)
    assert result.returncode == cli.EXIT_ERROR
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("palisade:")


# -- exit codes ------------------------------------------------------------------------------------


def test_exit_codes_are_distinct() -> None:
    codes = [cli.EXIT_OK, cli.EXIT_ERROR, cli.EXIT_USAGE, cli.EXIT_HANDSHAKE, cli.EXIT_TIMEOUT,
             cli.EXIT_UNDELIVERED, cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED]
    assert len(set(codes)) == len(codes)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    for code in codes:
        assert f"| {code} |" in doc, f"exit code {code} is not documented in docs/cli.md"


def test_usage_error_and_undelivered_data_exit_codes(keys: Keys, tmp_path: Path) -> None:
    usage = palisade("connect", "udp://127.0.0.1:1", "--key", keys.key("client"), cwd=tmp_path)
    assert usage.returncode == cli.EXIT_USAGE, usage.stderr
    assert "--trust" in usage.stderr
    # A server that does not echo (datagrams go to its stdout): the replies never come.
    server = _start_server_plain(keys, tmp_path)
    try:
        result = palisade("connect", server[1], "--key", keys.key("client"), "--trust",
                          keys.pub("server"), "--wait", "0.3", cwd=tmp_path, stdin="a\nb\n")
    finally:
        _stop(server[0])
    assert result.returncode == cli.EXIT_UNDELIVERED, result.stderr
    assert "2 of 2 replies missing" in result.stderr


def _start_server_plain(keys: Keys, workdir: Path, *extra: str
                        ) -> tuple[subprocess.Popen[bytes], str]:
    """``serve`` with only the given options (no echo, no --trust unless in ``extra``)."""
    port = free_udp_port()
    log = workdir / "plain.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "palisade_c", "serve", f"udp://127.0.0.1:{port}", "--key",
             keys.key("server"), *(extra or ("--trust", keys.pub("client")))],
            cwd=workdir, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=err)
    _wait_for(lambda: "listening on" in log.read_text() or process.poll() is not None,
              "the server")
    assert process.poll() is None, log.read_text()
    return process, f"udp://127.0.0.1:{port}"


# -- SIGTERM on connect ----------------------------------------------------------------------------


def test_sigterm_on_connect_sends_a_close(keys: Keys, tmp_path: Path) -> None:
    server = _start_server(keys, tmp_path)
    client = subprocess.Popen(
        [sys.executable, "-m", "palisade_c", "connect", server.url, "--key", keys.key("client"),
         "--trust", keys.pub("server")],
        cwd=tmp_path, env=cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"ping\n")
        client.stdin.flush()
        assert client.stdout.readline() == b"ping\n"  # the tunnel is up
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=CMD_TIMEOUT) == cli.EXIT_TERMINATED
        # The server saw the client's close, not an idle timeout.
        _wait_for(lambda: "by=peer" in server.log_text(), "the close at the server")
        closed = [ln for ln in server.log_text().splitlines() if "by=peer" in ln]
        assert "code=ErrorNone" in closed[0], closed[0]
    finally:
        _stop(client)
        client.stdin.close() if client.stdin else None
        _stop(server.process)


# -- trust directory, SIGHUP -----------------------------------------------------------------------


def test_trust_dir_reloads_on_sighup_without_dropping_sessions(
        keys: Keys, tmp_path: Path) -> None:
    trust = tmp_path / "trusted"
    trust.mkdir()
    shutil.copy(keys.pub("client"), trust / "client.pub")
    process, url = _start_server_plain(keys, tmp_path, "--trust-dir", str(trust), "--echo")
    log = tmp_path / "plain.log"
    client_id = Identity.load(keys.key("client"))

    async def live_session() -> None:
        config = Config(identity=client_id, trusted_peers=[keys.pub("server")])
        async with connect(url, config) as tunnel:
            tunnel.send(b"before")
            assert await tunnel.recv() == b"before"
            # Re-pin: the client's key goes, the stranger's comes; then SIGHUP.
            (trust / "client.pub").unlink()
            (trust / "pins.fp").write_text(
                f"# stranger\n{keys.stdout['stranger'].strip()} stranger's laptop\n")
            process.send_signal(signal.SIGHUP)
            await asyncio.to_thread(_wait_for, lambda: "trust reloaded" in log.read_text(),
                                    "the reload")
            assert process.poll() is None
            tunnel.send(b"after")  # the live session survived the reload
            assert await tunnel.recv() == b"after"
            stranger = await asyncio.to_thread(
                palisade, "connect", url, "--key", keys.key("stranger"), "--trust",
                keys.pub("server"), "--timeout", "5", cwd=tmp_path, stdin="hi\n")
            assert stranger.returncode == 0, stranger.stderr
            assert stranger.stdout == "hi\n"
            again = await asyncio.to_thread(
                palisade, "connect", url, "--key", keys.key("client"), "--trust",
                keys.pub("server"), "--timeout", "5", cwd=tmp_path, stdin="hi\n")
            assert again.returncode == cli.EXIT_HANDSHAKE, again.stderr

    try:
        run_bounded(live_session(), 60)
    finally:
        _stop(process)


def test_trust_list_file_entries(keys: Keys, tmp_path: Path) -> None:
    from palisade_c.trustdir import read_trust_source

    shutil.copy(keys.pub("server"), tmp_path / "s.pub")
    listing = tmp_path / "trusted"
    listing.write_text(f"# comment\n\n{keys.stdout['client'].strip().upper()}\ns.pub\n")
    assert read_trust_source(listing) == [keys.stdout["client"].strip(),
                                          str(tmp_path / "s.pub")]
    with pytest.raises(ConfigError):
        read_trust_source(tmp_path / "missing")


# -- config file and environment -------------------------------------------------------------------


def _parse(argv: list[str], env: dict[str, str]) -> object:
    parser = cli.build_parser()
    settings.apply_sources(parser, argv, env)
    args = parser.parse_args(argv)
    settings.finish(args)
    return args


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    conf = tmp_path / "palisade.toml"
    conf.write_text('key = "top.key"\n[connect]\nkey = "file.key"\ntrust = ["f1", "f2"]\n'
                    'timeout = 7\nplus = true\n')
    base = ["--config", str(conf), "connect", "udp://h:1"]
    args = _parse(base, {})
    assert (args.key, args.trust, args.timeout, args.plus) == (  # type: ignore[attr-defined]
        "file.key", ["f1", "f2"], 7.0, True)
    env = {"PALISADE_KEY": "env.key", "PALISADE_TRUST": "e1,e2", "PALISADE_PLUS": "0"}
    args = _parse(base, env)
    assert (args.key, args.trust, args.plus) == (  # type: ignore[attr-defined]
        "env.key", ["e1", "e2"], False)
    args = _parse([*base, "--key", "flag.key", "--trust", "t1"], env)
    assert (args.key, args.trust) == ("flag.key", ["t1"])  # type: ignore[attr-defined]
    # the file named by the environment, the URL from the environment
    args = _parse(["connect"], {"PALISADE_CONFIG": str(conf), "PALISADE_URL": "udp://e:2"})
    assert (args.url, args.key) == ("udp://e:2", "file.key")  # type: ignore[attr-defined]


def test_bad_environment_value_is_a_usage_error(tmp_path: Path) -> None:
    env = cli_env()
    env["PALISADE_TIMEOUT"] = "soon"
    result = subprocess.run(
        [sys.executable, "-m", "palisade_c", "connect", "udp://127.0.0.1:1", "--key", "k",
         "--trust", "t"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=CMD_TIMEOUT, check=False)
    assert result.returncode == cli.EXIT_USAGE
    assert "PALISADE_TIMEOUT" in result.stderr and result.stderr.count("\n") == 1


def test_connect_configured_by_environment_only(keys: Keys, tmp_path: Path) -> None:
    server = _start_server(keys, tmp_path)
    try:
        env = cli_env()
        env.update(PALISADE_URL=server.url, PALISADE_KEY=keys.key("client"),
                   PALISADE_TRUST=keys.stdout["server"].strip())  # a fingerprint from keygen
        result = subprocess.run([sys.executable, "-m", "palisade_c", "connect"], cwd=tmp_path,
                                env=env, input="via env\n", capture_output=True, text=True,
                                timeout=CMD_TIMEOUT, check=False)
    finally:
        _stop(server.process)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "via env\n"


# -- library ---------------------------------------------------------------------------------------


def test_async_with_connect_and_transport_objects(keys: Keys) -> None:
    server_config = Config(identity=Identity.load(keys.key("server")),
                           trusted_peers=[keys.pub("client")])
    client_config = Config(identity=Identity.load(keys.key("client")),
                           trusted_peers=[keys.pub("server")])

    async def echo(tunnel: Tunnel) -> None:
        async for data in tunnel:
            tunnel.send(data)

    async def body() -> None:
        listening = await UdpTransport.bind("127.0.0.1", 0)
        async with served(listening, server_config, echo) as server:
            sock, peer = await UdpTransport.for_peer(*server.address)
            async with palisade_c.connect(sock, client_config, peer=peer) as tunnel:
                tunnel.send(b"over a transport object")
                assert await tunnel.recv() == b"over a transport object"
            assert tunnel.is_closed and sock.is_closing
            # plain await and create_task still work
            host, port = server.address
            task = asyncio.create_task(connect(f"udp://{host}:{port}", client_config))
            second = await task
            await second.close()
            lone = await UdpTransport.bind("127.0.0.1", 0)
            with pytest.raises(ConfigError, match="peer"):
                await connect(lone, client_config)
            lone.close()

    run_bounded(body(), 30)


def test_importing_the_package_does_not_import_asyncio(tmp_path: Path) -> None:
    code = "import sys, palisade_c; sys.exit('asyncio' in sys.modules)"
    # Not from the checkout's directory: '-c' puts the working directory first on sys.path.
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(), cwd=tmp_path,
                            check=False)
    assert result.returncode == 0, "the palisade_c docstring promises no asyncio for the core"
    assert "does not import asyncio" in (palisade_c.__doc__ or "")


def test_every_long_option_of_every_command_has_an_environment_variable(tmp_path: Path) -> None:
    """Set each configurable option of each command through its PALISADE_* variable and see
    that the parse picks it up (a switch as true, anything else as a valid sample value)."""
    samples = {"url": "udp://127.0.0.1:9", "node_id": "0102030405060708", "mtu": "512",
               "link_bps": "115200", "baud": "9600", "messages": "3", "log_level": "info",
               "metrics": "127.0.0.1:0", "listen": "udp://127.0.0.1:9", "serial":
               "serial:///dev/null", "timeout": "3", "wait": "2", "flow_idle": "9",
               "log_interval": "4", "socket_buffer": "65536", "workers": "2",
               "host_id": "7", "engine": "c", "shaping": "pad:0-64"}
    parser = cli.build_parser()
    for command, sub in settings._subparsers(parser).items():
        actions = settings._configurable(sub)
        env = {settings.env_name(a.dest): "1" if a.nargs == 0 else samples.get(a.dest, "x")
               for a in actions}
        p = cli.build_parser()
        settings.apply_sources(p, [command], env)
        args = p.parse_args([command])  # nothing on the command line: all from the environment
        settings.finish(args)
        for action in actions:
            value = getattr(args, action.dest)
            assert value not in (None, False, []), (command, action.dest, value)


def test_cancelling_a_connect_task_is_clean(keys: Keys) -> None:
    """Task cancellation throws into the Connecting wrapper: it must use the one-argument
    throw() (the three-argument form is deprecated from Python 3.12)."""
    import warnings

    config = Config(identity=Identity.load(keys.key("client")),
                    trusted_peers=[keys.pub("server")])

    async def body() -> None:
        task = asyncio.create_task(connect(f"udp://127.0.0.1:{free_udp_port()}", config))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        run_bounded(body(), 10)


def test_hidden_worker_options_never_come_from_the_environment() -> None:
    """PALISADE_WORKER_FD in a service's environment must not turn `serve` into a worker."""
    parser = cli.build_parser()
    serve = settings._subparsers(parser)["serve"]
    dests = {a.dest for a in settings._configurable(serve)}
    assert "worker_fd" not in dests and "worker_index" not in dests
    assert "workers" in dests  # the public option still is configurable
