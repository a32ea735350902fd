"""The full handshake end to end: crafted peers, every failure code, tampering, RID steering.

Every test runs a real client ``Connection`` against a real ``ServerEndpoint`` over the seeded
in-memory link of ``simlink.py``; a man-in-the-middle hook rewrites whole handshake messages
where a test plays a hostile or broken peer. Transcripts and signatures are recomputed here
from PROFILE §3 (hashlib and the literal context strings), not through ``palisade_c.handshake``,
so a crafted peer is independent of the code it attacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from simlink import (
    CLIENT_ADDR,
    SERVER_ADDR,
    HandshakeMitm,
    Pair,
    SimLink,
    closed_events,
    hs_type,
    is_handshake,
    make_pair,
    seeded_rng,
)

from palisade_c import hsrecord as hs
from palisade_c import wire
from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.events import ConnectionClosed, DataReceived, HandshakeCompleted
from palisade_c.identity import Identity

SERVER_CONTEXT = b"PALISADE server"
CLIENT_CONTEXT = b"PALISADE client"
CH, SH, CF = hs.MSG_CLIENT_HELLO, hs.MSG_SERVER_HELLO, hs.MSG_CLIENT_FINISHED
HANDSHAKE_CODES = range(0x0100, 0x010C)


@dataclass(frozen=True)
class Ids:
    client: Identity
    server: Identity
    stranger: Identity


@pytest.fixture(scope="module")
def ids() -> Ids:
    return Ids(Identity.generate(), Identity.generate(), Identity.generate())


def configs(ids: Ids, seed: int = 1, *, client_trusts: Identity | None = None,
            server_trusts: Identity | None = None, **common: object) -> tuple[Config, Config]:
    client = Config(identity=ids.client,
                    trusted_peers=[(client_trusts or ids.server).public_key],
                    rng=seeded_rng(seed), **common)  # type: ignore[arg-type]
    server = Config(identity=ids.server,
                    trusted_peers=[(server_trusts or ids.client).public_key],
                    rng=seeded_rng(seed + 7919), **common)  # type: ignore[arg-type]
    return client, server


def sha3(data: bytes) -> bytes:
    return hashlib.sha3_256(data).digest()


def flip(data: bytes, index: int | None = None) -> bytes:
    """``data`` with the low bit of one byte (the middle one by default) inverted."""
    i = len(data) // 2 if index is None else index
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def build_client_hello(*, version: int, kems: tuple[int, ...], sigs: tuple[int, ...],
                       aeads: tuple[int, ...], nonce: bytes, k_c: bytes, cert: bytes) -> bytes:
    """A ClientHello assembled byte by byte from PROFILE §2 (empty signature, padding and
    extension list), independent of the wire codec."""

    def ids_(values: tuple[int, ...]) -> bytes:
        return struct.pack(f">H{len(values)}H", len(values), *values)

    def opaque(value: bytes) -> bytes:
        return struct.pack(">H", len(value)) + value

    return (bytes([version]) + ids_(kems) + ids_(sigs) + ids_(aeads) + nonce + opaque(k_c)
            + opaque(cert) + opaque(b"") + opaque(b"") + struct.pack(">H", 0))


# --- wire inspection ------------------------------------------------------------------------------


def wire_records(pair: Pair, src: object, msg_type: int) -> list[hs.HandshakeRecord]:
    out = []
    for entry in pair.link.emitted:
        if entry.src == src and is_handshake(entry.data):
            rec = hs.decode(entry.data)
            if rec.msg_type == msg_type:
                out.append(rec)
    return out


def error_responses(pair: Pair, src: object) -> list[tuple[bytes, int]]:
    """(rid, error_code) of every ErrorResponse ``src`` put on the wire."""
    return [(rec.rid, wire.ErrorResponse.decode(rec.fragment).error_code)
            for rec in wire_records(pair, src, hs.MSG_ERROR_RESPONSE)]


def assert_aborted(pair: Pair, conn: Connection, code: int, *, by_peer: bool) -> None:
    """Ended in *_CLOSED by way of *_ABORT, one ConnectionClosed(code), no live keys."""
    assert conn.state.endswith("_CLOSED"), conn.state
    assert any(new.endswith("_ABORT") and ev == "fatal"
               for _, ev, new in pair.transitions(conn.name)), pair.transitions(conn.name)
    closes = closed_events(pair, conn)
    assert [(c.error_code, c.by_peer) for c in closes] == [(code, by_peer)], closes
    assert conn.record is None or conn.record.erased
    assert conn.get_timer() is None


def settled(pair: Pair) -> Callable[[], bool]:
    def done() -> bool:
        sessions = pair.sessions()
        if pair.client.closed:
            return all(s.closed for s in sessions)
        return pair.client.established and any(s.established for s in sessions)
    return done


# --- the honest baseline --------------------------------------------------------------------------


def test_hand_built_client_hello_matches_the_codec(ids: Ids) -> None:
    """The crafted-peer encoder agrees with the codec, so a version-only change is exactly that."""
    nonce, k_c = bytes(range(32)), bytes(1184)
    by_hand = build_client_hello(version=0x12, kems=(0x0011,), sigs=(0x0021,), aeads=(0x0001,),
                                 nonce=nonce, k_c=k_c, cert=ids.client.public_key)
    codec = wire.ClientHello(supported_kems=(0x0011,), supported_sigs=(0x0021,),
                             supported_aeads=(0x0001,), client_nonce=nonce, k_c=k_c,
                             client_certificate=ids.client.public_key).encode()
    assert by_hand == codec


def test_honest_handshake_installs_matching_keys(ids: Ids) -> None:
    pair = make_pair(*configs(ids))
    session = pair.handshake()
    assert pair.client.state == "C_ESTABLISHED" and session.state == "S_ESTABLISHED"
    assert pair.client.rid == session.rid and len(session.rid) == 24
    assert pair.client.peer_fingerprint == ids.server.fingerprint
    assert session.peer_fingerprint == ids.client.fingerprint
    completed = [e for e in pair.link.events if isinstance(e.event, HandshakeCompleted)]
    assert {e.node for e in completed} == {"client", "server"}
    pair.client.send_data(b"ping")
    session.send_data(b"pong")
    pair.run(duration=0.5)
    assert pair.link.data_received("server") == [b"ping"]
    assert pair.link.data_received("client") == [b"pong"]
    assert error_responses(pair, CLIENT_ADDR) == error_responses(pair, SERVER_ADDR) == []


@pytest.mark.parametrize(("client_plus", "server_plus"),
                         [(0, 0), (PLUS_RESUMPTION, 0), (0, PLUS_RESUMPTION),
                          (PLUS_RESUMPTION, PLUS_RESUMPTION)])
def test_resumption_secret_exists_only_when_tickets_can_use_it(
        ids: Ids, client_plus: int, server_plus: int) -> None:
    client_cfg, server_cfg = configs(ids)
    pair = make_pair(dataclasses.replace(client_cfg, plus_features=client_plus),
                     dataclasses.replace(server_cfg, plus_features=server_plus))
    session = pair.handshake()
    client_secret, server_secret = pair.client.resumption_secret, session.resumption_secret
    if client_plus and server_plus:  # negotiated: both sides hold the same secret
        assert client_secret is not None and len(client_secret) == 32
        assert client_secret == server_secret
    else:  # what one side offers alone decides nothing
        assert client_secret is None and server_secret is None


def test_seeded_rng_makes_retransmission_timers_reproducible(ids: Ids) -> None:
    def first_deadline(seed: int) -> float | None:
        client_cfg, _server_cfg = configs(ids, seed=seed)
        client = Connection(client_cfg, True)
        client.connect(SERVER_ADDR, 0.0)
        return client.get_timer()

    assert first_deadline(7) is not None and first_deadline(7) == first_deadline(7)
    # ...and the jitter really comes from the seed: another seed, another deadline.
    assert first_deadline(8) != first_deadline(7)


# --- every failure code from a crafted peer -------------------------------------------------------


Rewrite = Callable[[bytes, HandshakeMitm, Ids], bytes]


def _ch_version(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    ch = wire.ClientHello.decode(message)
    return build_client_hello(version=0x13, kems=ch.supported_kems, sigs=ch.supported_sigs,
                              aeads=ch.supported_aeads, nonce=ch.client_nonce, k_c=ch.k_c,
                              cert=ch.client_certificate)


def _ch_replace(**fields: object) -> Rewrite:
    def rewrite(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
        return wire.ClientHello.decode(message).replace(**fields).encode()
    return rewrite


def _ch_short_k_c(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    ch = wire.ClientHello.decode(message)
    return ch.replace(k_c=ch.k_c[:-1]).encode()


def _resigned_sh(message: bytes, mitm: HandshakeMitm, ids: Ids, **fields: object) -> bytes:
    """A ServerHello changed and then properly signed with the server's own key: what a
    buggy (not a forging) server would send."""
    ch = wire.ClientHello.decode(mitm.seen[CH])
    sh = wire.ServerHello.decode(message).replace(server_signature=b"", **fields)
    signed = sha3(ch.transcript_bytes() + sh.transcript_bytes())
    return sh.replace(server_signature=ids.server.sign(signed, SERVER_CONTEXT)).encode()


def _resigned_cf(message: bytes, mitm: HandshakeMitm, ids: Ids, **fields: object) -> bytes:
    """A ClientFinished changed and then properly signed by the client's key."""
    ch = wire.ClientHello.decode(mitm.seen[CH])
    sh = wire.ServerHello.decode(mitm.seen[SH])
    cf = wire.ClientFinished.decode(message).replace(client_signature=b"", **fields)
    th = sha3(ch.transcript_bytes() + sh.transcript_bytes() + cf.transcript_bytes())
    return cf.replace(client_signature=ids.client.sign(th, CLIENT_CONTEXT)).encode()


def _sh_short_ct_c(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    return _resigned_sh(message, mitm, ids, ct_c=wire.ServerHello.decode(message).ct_c[:-1])


def _sh_short_k_s(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    return _resigned_sh(message, mitm, ids, k_s=wire.ServerHello.decode(message).k_s[:-1])


def _sh_bad_signature(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    sh = wire.ServerHello.decode(message)
    return sh.replace(server_signature=flip(sh.server_signature)).encode()


def _sh_version(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    return bytes([0x11]) + message[1:]


def _cf_bad_signature(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    cf = wire.ClientFinished.decode(message)
    return cf.replace(client_signature=flip(cf.client_signature)).encode()


def _cf_long_ct_s(message: bytes, mitm: HandshakeMitm, ids: Ids) -> bytes:
    return _resigned_cf(message, mitm, ids,
                        ct_s=wire.ClientFinished.decode(message).ct_s + b"\x00")


@dataclass(frozen=True)
class Failure:
    name: str
    code: int
    detector: str  # "server" or "client"
    answers: int  # the message type whose RID the ErrorResponse echoes
    rewrites: dict[int, Rewrite]
    client_trusts_stranger: bool = False
    server_trusts_stranger: bool = False


FAILURES = [
    Failure("CH version 0x13", 0x0100, "server", CH, {CH: _ch_version}),
    Failure("CH only unknown KEMs", 0x0101, "server", CH,
            {CH: _ch_replace(supported_kems=(0x0999, 0x0013))}),
    Failure("CH only unsupported signatures", 0x0102, "server", CH,
            {CH: _ch_replace(supported_sigs=(wire.SIG_MLDSA87, 0x0999))}),
    Failure("CH only unknown AEADs", 0x0103, "server", CH,
            {CH: _ch_replace(supported_aeads=(0x0002, 0x0999))}),
    Failure("CH truncated", 0x0104, "server", CH, {CH: lambda m, mitm, ids: m[:-1]}),
    Failure("CH trailing byte", 0x0104, "server", CH, {CH: lambda m, mitm, ids: m + b"\x00"}),
    Failure("CH K_c of the wrong length", 0x0104, "server", CH, {CH: _ch_short_k_c}),
    Failure("CH unpinned client key", 0x0107, "server", CH, {}, server_trusts_stranger=True),
    Failure("CH non-ignorable unknown extension", 0x010B, "server", CH,
            {CH: _ch_replace(extensions=(wire.Extension(0x0042, b"x"),))}),
    Failure("SH version 0x11", 0x0100, "client", SH, {SH: _sh_version}),
    Failure("SH truncated", 0x0105, "client", SH, {SH: lambda m, mitm, ids: m[:-1]}),
    Failure("SH trailing byte", 0x0105, "client", SH, {SH: lambda m, mitm, ids: m + b"\x00"}),
    Failure("SH K_s of the wrong length (signed)", 0x0105, "client", SH, {SH: _sh_short_k_s}),
    Failure("SH bad server signature", 0x0106, "client", SH, {SH: _sh_bad_signature}),
    Failure("SH unpinned server key", 0x0107, "client", SH, {}, client_trusts_stranger=True),
    Failure("SH CT_c of the wrong length (signed)", 0x0108, "client", SH, {SH: _sh_short_ct_c}),
    Failure("CF bad client signature", 0x0106, "server", CF, {CF: _cf_bad_signature}),
    Failure("CF CT_s of the wrong length (signed)", 0x0108, "server", CF, {CF: _cf_long_ct_s}),
    Failure("CF trailing byte", 0x0109, "server", CF, {CF: lambda m, mitm, ids: m + b"\x00"}),
]


def _bind(rewrite: Rewrite, ids: Ids) -> Callable[[bytes, HandshakeMitm], bytes]:
    def bound(message: bytes, mitm: HandshakeMitm) -> bytes:
        return rewrite(message, mitm, ids)
    return bound


@pytest.mark.parametrize("case", FAILURES, ids=lambda c: f"{c.code:#06x} {c.name}")
def test_crafted_peer_gets_the_failure_code(ids: Ids, case: Failure) -> None:
    mitm = HandshakeMitm({t: _bind(f, ids) for t, f in case.rewrites.items()})
    client_cfg, server_cfg = configs(
        ids, client_trusts=ids.stranger if case.client_trusts_stranger else None,
        server_trusts=ids.stranger if case.server_trusts_stranger else None)
    pair = make_pair(client_cfg, server_cfg, mitm=mitm)
    pair.connect()
    pair.run(lambda: pair.client.closed and all(s.closed for s in pair.sessions()), duration=20)

    sessions = pair.sessions()
    assert len(sessions) == 1, [s.state for s in sessions]
    server, client = sessions[0], pair.client
    detector, peer = (server, client) if case.detector == "server" else (client, server)
    detector_addr = SERVER_ADDR if case.detector == "server" else CLIENT_ADDR
    answered_src = CLIENT_ADDR if case.answers in (CH, CF) else SERVER_ADDR

    # The detecting side aborts with the code and answers with an ErrorResponse carrying it,
    # echoing the RID of the message it refuses.
    assert_aborted(pair, detector, case.code, by_peer=False)
    expected_rid = wire_records(pair, answered_src, case.answers)[0].rid
    sent = error_responses(pair, detector_addr)
    assert sent and set(sent) == {(expected_rid, case.code)}, sent
    # The peer believes it and closes with the same code; it never answers an error.
    assert_aborted(pair, peer, case.code, by_peer=True)
    assert error_responses(pair, CLIENT_ADDR if detector_addr == SERVER_ADDR else SERVER_ADDR) \
        == []
    # No session keys anywhere: only a client past a good ServerHello may have had keys (the
    # CF failures), and they are erased.
    assert server.record is None
    if case.answers != CF:
        assert client.record is None
        assert not pair.link.events_of("client", HandshakeCompleted)
    assert not pair.link.events_of("server", HandshakeCompleted)
    assert not pair.link.events_of("server", DataReceived)


def test_hand_built_v13_hello_from_a_raw_peer_gets_invalid_version(ids: Ids) -> None:
    """No client at all: a peer that speaks another version and lays its hello out however it
    likes still gets ErrorInvalidVersion, echoing its own RID, and leaves no session behind."""
    _, server_cfg = configs(ids)
    server = ServerEndpoint(server_cfg)
    link = SimLink(3)
    link.add("server", SERVER_ADDR, server)
    rid = bytes(range(100, 124))
    hello = bytes([0x13]) + b"\xff" * 5000  # a v1.3 layout we know nothing about
    for frag in hs.fragment_message(CH, rid, 0, hello, 1200):
        link.inject(frag, CLIENT_ADDR, SERVER_ADDR)
    link.run(duration=5)
    answers = [hs.decode(e.data) for e in link.emitted if e.dst == CLIENT_ADDR]
    errors = [r for r in answers if r.msg_type == hs.MSG_ERROR_RESPONSE]
    assert len(errors) == 1 and errors[0].rid == rid
    assert wire.ErrorResponse.decode(errors[0].fragment).error_code == 0x0100
    assert server.connections == []
    closed = [e.event for e in link.events if isinstance(e.event, ConnectionClosed)]
    assert [c.error_code for c in closed] == [0x0100]


@pytest.mark.parametrize("message", [SH, CF])
def test_resigning_unchanged_messages_completes(ids: Ids, message: int) -> None:
    """Control for the 'signed' crafted cases: re-signing a message without changing it is
    accepted, so those cases fail for the reason they name, not for a bad signature."""
    resign: Rewrite = _resigned_sh if message == SH else _resigned_cf
    mitm = HandshakeMitm({message: _bind(resign, ids)})
    pair = make_pair(*configs(ids), mitm=mitm)
    pair.handshake()
    assert message in mitm.forwarded


# --- tampering with any field fails closed --------------------------------------------------------


def _edit(cls: Any, **fields: Callable[[Any], Any]) -> Callable[[bytes], bytes]:
    """Decode with ``cls``, pass the named fields through their functions, re-encode."""
    def rewrite(message: bytes) -> bytes:
        msg = cls.decode(message)
        return bytes(msg.replace(**{k: f(getattr(msg, k)) for k, f in fields.items()}).encode())
    return rewrite


def _flip_id(ids_: tuple[int, ...]) -> tuple[int, ...]:
    return (ids_[0] ^ 0x0001, *ids_[1:])


def _flip_ext_type(exts: tuple[wire.Extension, ...]) -> tuple[wire.Extension, ...]:
    return (wire.Extension(exts[0].type ^ 0x0001, exts[0].data), *exts[1:])


def _flip_ext_data(exts: tuple[wire.Extension, ...]) -> tuple[wire.Extension, ...]:
    return (wire.Extension(exts[0].type, flip(exts[0].data)), *exts[1:])


def _insert(data: bytes) -> bytes:
    # An empty field has no byte to flip; giving it one is the smallest change.
    return flip(data) if data else b"\x00" * 8


@dataclass(frozen=True)
class Tamper:
    msg_type: int
    field: str
    rewrite: Callable[[bytes], bytes]
    codes: frozenset[int]
    #: Only fields outside the signed transcript may still let the handshake complete.
    may_complete: bool = False


_CHc, _SHc, _CFc = wire.ClientHello, wire.ServerHello, wire.ClientFinished
TAMPERS = [
    Tamper(CH, "version", lambda m: flip(m, 0), frozenset({0x0100})),
    Tamper(CH, "supported_kems", _edit(_CHc, supported_kems=_flip_id), frozenset({0x0101})),
    Tamper(CH, "supported_sigs", _edit(_CHc, supported_sigs=_flip_id), frozenset({0x0102})),
    Tamper(CH, "supported_aeads", _edit(_CHc, supported_aeads=_flip_id), frozenset({0x0103})),
    Tamper(CH, "client_nonce", _edit(_CHc, client_nonce=flip), frozenset({0x0106})),
    Tamper(CH, "k_c", _edit(_CHc, k_c=flip), frozenset({0x0104, 0x0106})),
    Tamper(CH, "client_certificate", _edit(_CHc, client_certificate=flip), frozenset({0x0107})),
    Tamper(CH, "client_signature", _edit(_CHc, client_signature=_insert), frozenset({0x0104})),
    Tamper(CH, "padding", _edit(_CHc, padding=_insert), frozenset({0x0106})),
    Tamper(CH, "extensions.type", _edit(_CHc, extensions=_flip_ext_type), frozenset({0x010B})),
    Tamper(CH, "extensions.data", _edit(_CHc, extensions=_flip_ext_data), frozenset({0x0106})),
    Tamper(SH, "version", lambda m: flip(m, 0), frozenset({0x0100})),
    Tamper(SH, "kem_choice", _edit(_SHc, kem_choice=lambda v: v ^ 1), frozenset({0x0101})),
    Tamper(SH, "sig_choice", _edit(_SHc, sig_choice=lambda v: v ^ 1), frozenset({0x0102})),
    Tamper(SH, "aead_choice", _edit(_SHc, aead_choice=lambda v: v ^ 1), frozenset({0x0103})),
    Tamper(SH, "server_nonce", _edit(_SHc, server_nonce=flip), frozenset({0x0106})),
    Tamper(SH, "k_s", _edit(_SHc, k_s=flip), frozenset({0x0106})),
    Tamper(SH, "ct_c", _edit(_SHc, ct_c=flip), frozenset({0x0106})),
    Tamper(SH, "server_certificate", _edit(_SHc, server_certificate=flip), frozenset({0x0107})),
    Tamper(SH, "server_signature", _edit(_SHc, server_signature=flip), frozenset({0x0106})),
    Tamper(SH, "padding", _edit(_SHc, padding=_insert), frozenset({0x0106})),
    Tamper(SH, "extensions.type", _edit(_SHc, extensions=_flip_ext_type), frozenset({0x010B})),
    Tamper(SH, "extensions.data", _edit(_SHc, extensions=_flip_ext_data), frozenset({0x0106})),
    Tamper(CF, "ct_s", _edit(_CFc, ct_s=flip), frozenset({0x0106})),
    Tamper(CF, "client_signature", _edit(_CFc, client_signature=flip), frozenset({0x0106})),
    Tamper(CF, "padding", _edit(_CFc, padding=_insert), frozenset({0x0106})),
]
_NAMES = {CH: "CH", SH: "SH", CF: "CF"}


@pytest.mark.parametrize("case", TAMPERS, ids=lambda t: f"{_NAMES[t.msg_type]}.{t.field}")
def test_tampering_with_a_field_fails_closed(ids: Ids, case: Tamper) -> None:
    # PLUS offered and allowed, so both hellos carry an extension whose bytes can be flipped.
    def rewrite(message: bytes, _: HandshakeMitm) -> bytes:
        return case.rewrite(message)

    mitm = HandshakeMitm({case.msg_type: rewrite})
    pair = make_pair(*configs(ids, 11, plus_features=PLUS_RESUMPTION), mitm=mitm)
    pair.connect()
    pair.run(settled(pair), duration=20)
    assert case.msg_type in mitm.forwarded
    assert mitm.forwarded[case.msg_type] != mitm.seen[case.msg_type]
    sessions = pair.sessions()
    assert len(sessions) == 1
    client, server = pair.client, sessions[0]

    if client.established or server.established:
        # Completing is only acceptable outside the signed transcript, and then both sides
        # must hold the same keys: data has to open in both directions.
        assert case.may_complete, f"tampered {case.field} was accepted"
        assert client.established and server.established
        client.send_data(b"c2s")
        server.send_data(b"s2c")
        pair.run(duration=0.5)
        assert pair.link.data_received("server") == [b"c2s"]
        assert pair.link.data_received("client") == [b"s2c"]
        return

    codes = {c.error_code for conn in (client, server) for c in closed_events(pair, conn)}
    assert len(codes) == 1 and codes <= case.codes, (codes, case.codes)
    (code,) = codes
    for conn in (client, server):
        assert conn.state.endswith("_CLOSED")
        assert conn.record is None or conn.record.erased
        assert [c.error_code for c in closed_events(pair, conn)] == [code]
    assert not pair.link.events_of("server", HandshakeCompleted)
    assert not pair.link.events_of("server", DataReceived)


# --- RID steering, timeouts, stray errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("client_node", "server_node"),
    [(b"NODE-042", None), (b"NODE-042", b"NODE-042"), (None, b"NODE-042"), (None, None)],
)
def test_session_rid_steering_prefix(ids: Ids, client_node: bytes | None,
                                     server_node: bytes | None) -> None:
    client_cfg, _ = configs(ids, 21, node_id=client_node)
    _, server_cfg = configs(ids, 21, node_id=server_node)
    pair = make_pair(client_cfg, server_cfg)
    session = pair.handshake()
    hello_rid = wire_records(pair, CLIENT_ADDR, CH)[0].rid
    if client_node is not None:
        assert hello_rid[:8] == client_node
    expected = server_node or client_node
    assert session.rid == pair.client.rid
    if expected is not None:
        assert session.rid[:8] == expected
    else:
        assert session.rid[:8] == hello_rid[:8]
    # rotation epoch 0, fresh random tail
    assert session.rid[8:10] == b"\x00\x00" and session.rid[10:] != hello_rid[10:]
    # Every datagram after the ServerHello (handshake or encrypted) routes on the prefix.
    pair.client.send_data(b"x")
    session.send_data(b"y")
    pair.run(duration=0.5)
    later = [e.data for e in pair.link.emitted
             if not (is_handshake(e.data) and hs.decode(e.data).msg_type == CH)]
    assert later and all(d[6:14] == session.rid[:8] for d in later)


def test_client_targeting_another_node_never_establishes(ids: Ids) -> None:
    """A ServerHello whose session RID drops the node id the client targeted is not for it."""
    client_cfg, _ = configs(ids, 22, node_id=b"NODE-001", handshake_timeout=3.0)
    _, server_cfg = configs(ids, 22, node_id=b"NODE-002")
    pair = make_pair(client_cfg, server_cfg)
    pair.connect()
    pair.run(lambda: pair.client.closed, duration=10)
    assert pair.client.state == "C_CLOSED"
    assert [c.error_code for c in closed_events(pair, pair.client)] == [0x010A]
    assert pair.client.drop_counts.get("unknown-rid", 0) > 0
    assert pair.client.record is None


def test_handshake_timeout_with_a_silent_server(ids: Ids) -> None:
    client_cfg, _ = configs(ids, 23, handshake_timeout=5.0, initial_rto=0.3)
    pair = make_pair(client_cfg, configs(ids)[1], mitm=lambda d, s, dst, now: [])
    pair.connect()
    assert pair.client.state == "C_WAIT_SH"
    pair.run(lambda: pair.client.closed, duration=30)
    assert pair.client.state == "C_CLOSED"
    assert 5.0 <= pair.link.now < 5.5
    assert_aborted(pair, pair.client, 0x010A, by_peer=False)
    # It retransmitted with growing gaps before giving up, and told nobody (no ErrorResponse).
    sends = sorted({e.time for e in pair.link.emitted if e.src == CLIENT_ADDR})
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert len(sends) >= 4 and all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert error_responses(pair, CLIENT_ADDR) == []
    assert pair.server.connections == []  # nothing reached it


def _error_record(rid: bytes, code: int) -> bytes:
    body = wire.ErrorResponse(error_code=code, details="go away").encode()
    return hs.HandshakeRecord(hs.MSG_ERROR_RESPONSE, rid, 0, 0, len(body), body).encode()


def test_error_response_with_a_wrong_rid_is_ignored(ids: Ids) -> None:
    pair = make_pair(*configs(ids, 24), min_delay=0.05, max_delay=0.05)
    pair.connect()
    hello_rid = pair.client.rid
    wrong = bytes(b ^ 0xFF for b in hello_rid)
    # Arrives long before the server's answer.
    pair.link.inject(_error_record(wrong, 0x0107), SERVER_ADDR, CLIENT_ADDR, delay=0.001)
    pair.run(duration=0.02)
    assert pair.client.state == "C_WAIT_SH"
    assert pair.client.drop_counts.get("stale-error-response") == 1
    pair.run(lambda: pair.client.established, duration=5)
    assert pair.client.state == "C_ESTABLISHED"
    assert not closed_events(pair, pair.client)


def test_error_response_with_the_right_rid_aborts_the_client(ids: Ids) -> None:
    """The positive control for the test above: same record, the client's own first-flight RID."""
    pair = make_pair(*configs(ids, 25), min_delay=0.05, max_delay=0.05)
    pair.connect()
    pair.link.inject(_error_record(pair.client.rid, 0x0107), SERVER_ADDR, CLIENT_ADDR,
                     delay=0.001)
    pair.run(lambda: pair.client.closed, duration=1)
    assert_aborted(pair, pair.client, 0x0107, by_peer=True)


def test_error_response_after_establishment_is_ignored(ids: Ids) -> None:
    """Once a session is established (and, for the client, the server has proven it holds the
    keys), a cleartext ErrorResponse, even one with the session RID, cannot tear it down."""
    # The server's handshake acks never arrive, so only its data proves it has the keys.
    pair = make_pair(*configs(ids, 26), mitm=lambda d, src, dst, now: []
                     if dst == CLIENT_ADDR and hs_type(d) == hs.MSG_HANDSHAKE_ACK else None)
    session = pair.handshake()
    session.send_data(b"proof")
    pair.run(duration=0.2)
    forged = _error_record(pair.client.rid, 0x0106)
    pair.link.inject(forged, SERVER_ADDR, CLIENT_ADDR)
    pair.link.inject(forged, CLIENT_ADDR, SERVER_ADDR)
    pair.run(duration=0.5)
    assert pair.client.state == "C_ESTABLISHED" and session.state == "S_ESTABLISHED"
    assert pair.client.drop_counts.get("stale-error-response") == 1
    assert session.drop_counts.get("stale-error-response") == 1
    pair.client.send_data(b"still here")
    session.send_data(b"me too")
    pair.run(duration=0.5)
    assert pair.link.data_received("server") == [b"still here"]
    assert pair.link.data_received("client") == [b"proof", b"me too"]
    assert not [e for e in pair.link.events if isinstance(e.event, ConnectionClosed)]


@pytest.mark.parametrize(
    ("offered", "allowed", "agreed"),
    [(0, 0x07, 0), (0x01, 0, 0), (0x03, 0x06, 0x02), (0x07, 0x07, 0x07)],
)
def test_plus_features_are_the_intersection(ids: Ids, offered: int, allowed: int,
                                            agreed: int) -> None:
    client_cfg, _ = configs(ids, 27, plus_features=offered)
    _, server_cfg = configs(ids, 27, plus_features=allowed)
    pair = make_pair(client_cfg, server_cfg)
    session = pair.handshake()
    done = [e.event for e in pair.link.events if isinstance(e.event, HandshakeCompleted)]
    assert [d.plus_features for d in done] == [agreed, agreed]
    assert pair.client.plus_features == session.plus_features == agreed


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_handshake_completes_over_a_hostile_link(ids: Ids, seed: int) -> None:
    """20 % loss, duplication and reordering: the handshake still completes, once per side."""
    pair = make_pair(*configs(ids, 100 + seed), seed=seed, loss=0.2, duplicate=0.2,
                     min_delay=0.005, max_delay=0.12)
    session = pair.handshake(duration=30)
    assert pair.client.rid == session.rid
    assert len(pair.link.events_of("client", HandshakeCompleted)) == 1
    assert len(pair.link.events_of("server", HandshakeCompleted)) == 1
    assert len(pair.sessions()) == 1
    assert pair.link.lost > 0 and pair.link.duplicated > 0
