"""Timer liveness (issue 10, item 0): every deadline a core reports is one it services.

The invariant under test: after ``handle_timer(now)``, ``get_timer()`` is None or later than
``now``, for a ``Connection`` in every state and for a ``ServerEndpoint``. A deadline that does
not move would make a shell (or the endpoint's own heap loop) call the core again at once,
forever. ``ServerEndpoint.handle_timer`` must in addition survive a session that breaks the
invariant anyway: it closes and counts it instead of polling it again.

The endpoint-level reproductions run in a child process with a time limit: before the fix the
endpoint spun inside one C call that no signal or thread switch could interrupt.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simlink import CLIENT_ADDR, SERVER_ADDR, make_pair, seeded_rng

import palisade_c
from palisade_c import frames as F
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.errors import BackPressureError, StateError
from palisade_c.identity import Identity
from palisade_c.shaping import Shaping

# The child runs where the imported package lives (the checkout when built in place, else the
# installed tree): started in the checkout, it would import the uncompiled sources instead.
ROOT = Path(palisade_c.__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


@functools.cache
def _ids() -> tuple[Identity, Identity]:
    return Identity.generate(), Identity.generate()


def _configs(seed: int = 1, **kw: object) -> tuple[Config, Config]:
    client_id, server_id = _ids()
    client = Config(identity=client_id, trusted_peers=[server_id.public_key],
                    rng=seeded_rng(seed), **kw)  # type: ignore[arg-type]
    server = Config(identity=server_id, trusted_peers=[client_id.public_key],
                    rng=seeded_rng(seed + 7919), **kw)  # type: ignore[arg-type]
    return client, server


def _drive(conn: Connection, limit: int = 200) -> None:
    """Fire ``conn``'s timers alone (its peer hears nothing) until none is left, checking that
    each ``handle_timer`` moves the deadline forward."""
    for _ in range(limit):
        t = conn.get_timer()
        if t is None:
            return
        conn.handle_timer(t)
        after = conn.get_timer()
        assert after is None or after > t, (conn.state, t, after)
    raise AssertionError(f"{conn.name} still has timers after {limit} firings ({conn.state})")


def _established(**kw: object):  # type: ignore[no-untyped-def]
    pair = make_pair(*_configs(**kw))
    session = pair.handshake()
    pair.run(duration=0.1)
    return pair, session


def _deliver(src: Connection, dst: Connection | ServerEndpoint, addr: object, now: float) -> None:
    for data, _ in src.datagrams_to_send(now):
        dst.receive_datagram(data, addr, now)


# --- the three ways in of the issue, on the Connection ------------------------------------------


def test_rekey_request_and_soft_close_in_one_packet() -> None:
    """A client sends CTRL_REKEY(request) and CTRL_CLOSE(soft) in one packet: the server
    session announces a rekey and starts draining in the same breath."""
    pair, session = _established()
    now = pair.link.now
    client = pair.client
    client._send_control(F.encode_rekey(client.epoch + 1, F.REKEY_REQUEST),
                         F.encode_close(0, False, "bye"))
    _deliver(client, pair.server, CLIENT_ADDR, now)
    assert session.state == "S_CLOSING"
    _drive(session)
    assert session.closed
    assert "timer-stalled" not in session.drop_counts


def test_request_rekey_then_close_with_the_ack_lost() -> None:
    pair, _ = _established()
    client = pair.client
    client.request_rekey()
    client.close(0, "bye")  # nothing reaches the server from here on
    client.datagrams_to_send()
    assert client.state == "C_CLOSING"
    _drive(client)
    assert client.closed
    assert "timer-stalled" not in client.drop_counts


def test_server_announces_to_a_silent_client_then_shuts_down() -> None:
    pair, session = _established()
    session.request_rekey()
    pair.server.close()
    pair.server.datagrams_to_send()
    assert session.state == "S_CLOSING"
    _drive(session)
    assert session.closed
    assert "timer-stalled" not in session.drop_counts


# --- the same through the endpoint, in a child process with a time limit ------------------------

_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_timer_progress as t
    from palisade_c import frames as F
    from simlink import CLIENT_ADDR

    for way in ("request+close", "announce+shutdown"):
        pair, session = t._established()
        if way == "request+close":
            c = pair.client
            c._send_control(F.encode_rekey(c.epoch + 1, F.REKEY_REQUEST),
                            F.encode_close(0, False, "bye"))
            t._deliver(c, pair.server, CLIENT_ADDR, pair.link.now)
        else:
            session.request_rekey()
            pair.server.close()
        ep = pair.server
        ep.datagrams_to_send()
        for _ in range(100):
            when = ep.get_timer()
            if when is None:
                break
            ep.handle_timer(when)
            ep.datagrams_to_send()
            after = ep.get_timer()
            assert after is None or after > when, (way, when, after)
        assert session.closed and ep.connections == [], way
        assert "timer-stalled" not in ep.drop_counts, way
    print("ok")
""")


def _run_child(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_endpoint_timer_loop_ends_for_both_ways_in() -> None:
    _run_child(_CHILD.format(tests=str(TESTS)))


_CHILD_STUCK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_timer_progress as t

    pair, session = t._established()
    ep = pair.server
    now = pair.link.now
    # A session whose deadline never moves, whatever handle_timer does (a core bug).
    session.get_timer = lambda: now
    session.handle_timer = lambda when: None
    # Any datagram for the session makes the endpoint read its (now stuck) deadline.
    pair.client.send_data(b"x")
    t._deliver(pair.client, ep, t.CLIENT_ADDR, now)
    ep.handle_timer(now + 1.0)  # must return
    assert session.closed, session.state
    assert ep.drop_counts.get("timer-stalled") == 1, ep.drop_counts
    assert ep.connections == []
    assert ep.get_timer() is None
    print("ok")
""")


def test_endpoint_closes_and_counts_a_session_whose_deadline_does_not_advance() -> None:
    _run_child(_CHILD_STUCK.format(tests=str(TESTS)))


# --- property: random activity, a close during any of it ----------------------------------------

OPS = ("c2s", "s2c", "drop_c2s", "drop_s2c", "timer", "timer", "c_data", "s_data",
       "c_rekey", "s_rekey", "c_close", "s_close", "ep_close", "wait")


def _check_after_timer(obj: object, now: float) -> None:
    after = obj.get_timer()  # type: ignore[attr-defined]
    assert after is None or after > now, (getattr(obj, "state", "endpoint"), now, after)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(OPS), min_size=1, max_size=40),
       st.floats(min_value=0.0, max_value=3.0),
       st.sampled_from(["off", "pad:0-64", "rate:20:300"]))
def test_get_timer_always_advances_after_handle_timer(ops: list[str], wait: float,
                                                      shaping: str) -> None:
    # Traffic shaping (issue 15) adds the constant-rate slot clock: it must obey the same
    # invariant in every state, closing and rekeying included.
    client_cfg, server_cfg = _configs(close_drain_time=0.6, rekey_retransmit=0.2,
                                      max_transition_time=0.5, commit_threshold=2,
                                      keepalive_interval=1.0, idle_timeout=4.0,
                                      shaping=Shaping.parse(shaping))
    pair = make_pair(client_cfg, server_cfg)
    session = pair.handshake()
    client, ep = pair.client, pair.server
    now = pair.link.now
    c2s: deque[bytes] = deque()
    s2c: deque[bytes] = deque()

    def collect() -> None:
        c2s.extend(d for d, _ in client.datagrams_to_send(now))
        s2c.extend(d for d, _ in ep.datagrams_to_send(now))
        while client.next_event() is not None or ep.next_event() is not None:
            pass

    for op in ops:
        collect()
        try:
            if op == "c2s" and c2s:
                ep.receive_datagram(c2s.popleft(), CLIENT_ADDR, now)
            elif op == "s2c" and s2c:
                client.receive_datagram(s2c.popleft(), SERVER_ADDR, now)
            elif op == "drop_c2s" and c2s:
                c2s.popleft()
            elif op == "drop_s2c" and s2c:
                s2c.popleft()
            elif op == "timer":
                times = [t for t in (client.get_timer(), ep.get_timer()) if t is not None]
                if times:
                    now = max(now, min(times))
                    for conn in (client, session):
                        # Checked on the session itself first: before the fix, the endpoint
                        # would spin on it and never return.
                        t = conn.get_timer()
                        if t is not None and t <= now:
                            conn.handle_timer(now)
                            _check_after_timer(conn, now)
                    ep.handle_timer(now)
                    _check_after_timer(ep, now)
            elif op == "wait":
                now += wait
            elif op == "c_data":
                client.send_data(b"c")
            elif op == "s_data":
                session.send_data(b"s")
            elif op == "c_rekey":
                client.request_rekey()
            elif op == "s_rekey":
                session.request_rekey()
            elif op == "c_close":
                client.close(0, "c")
            elif op == "s_close":
                session.close(0, "s")
            elif op == "ep_close":
                ep.close()
        except (StateError, BackPressureError):
            pass  # local misuse in that state (or a full Mode 2 queue): refused, no change
    # Whatever happened, every timer runs out: both ends reach CLOSED or stay live, and the
    # endpoint never counted a stalled session.
    for _ in range(400):
        collect()
        times = [t for t in (client.get_timer(), ep.get_timer()) if t is not None]
        if not times:
            break
        now = max(now, min(times))
        for conn in (client, session):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
                _check_after_timer(conn, now)
        ep.handle_timer(now)
        _check_after_timer(ep, now)
        if client.closed and session.closed:
            break
    assert "timer-stalled" not in ep.drop_counts
    assert "timer-stalled" not in client.drop_counts
    assert "timer-stalled" not in session.drop_counts
