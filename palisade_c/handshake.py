"""The full PALISADE handshake: CH -> SH -> CF (PROFILE §2-§3, spec §7).

Theory of operation
-------------------
``ClientHandshake`` and ``ServerHandshake`` turn decoded messages into replies and, at the end,
a :class:`HandshakeResult` holding the master secret. They know nothing about datagrams,
fragments, timers or addresses; :mod:`palisade_c.connection` feeds them complete messages and
puts their answers on the wire.

Every failure raises :class:`HandshakeError` with the spec code that applies, after erasing the
ephemeral secrets, so the caller can send an ErrorResponse and abort without leaking anything:

    0x0100 version   0x0101-0x0103 no common KEM/signature/AEAD   0x0104/0x0105/0x0109 malformed
    0x0106 bad signature   0x0107 peer key not pinned   0x0108 KEM decapsulation failed

Transcript and signatures [profile §3]: ``X*`` is a message encoded with its signature field
empty. The server signs SHA3-256(CH* ‖ SH*) under context "PALISADE server"; the client signs
th = SHA3-256(CH* ‖ SH* ‖ CF*) under "PALISADE client". th also feeds the key schedule.
"""

from __future__ import annotations

import hmac as _hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import mlkem

from palisade_c import keyschedule as ks
from palisade_c import wire
from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.errors import DecodeError, ErrorCode, HandshakeError
from palisade_c.identity import CLIENT_CONTEXT, SERVER_CONTEXT, verify_signature
from palisade_c.shaping import Shaping, client_shaping, server_shaping, shaping_extensions
from palisade_c.tickets import ClientTicket, TicketInner, TicketService

#: What this implementation can do, in preference order.
SUPPORTED_KEMS = (wire.KEM_MLKEM768, wire.KEM_MLKEM1024)
SUPPORTED_SIGS = (wire.SIG_MLDSA65,)
SUPPORTED_AEADS = (wire.AEAD_CHACHA20POLY1305,)

_KEM_CLASSES: dict[int, type[mlkem.MLKEM768PrivateKey] | type[mlkem.MLKEM1024PrivateKey]] = {
    wire.KEM_MLKEM768: mlkem.MLKEM768PrivateKey,
    wire.KEM_MLKEM1024: mlkem.MLKEM1024PrivateKey,
}
_KEM_PUBLIC: dict[int, type[mlkem.MLKEM768PublicKey] | type[mlkem.MLKEM1024PublicKey]] = {
    wire.KEM_MLKEM768: mlkem.MLKEM768PublicKey,
    wire.KEM_MLKEM1024: mlkem.MLKEM1024PublicKey,
}


_SHA3 = hashes.SHA3_256()


class _Transcript:
    """The running SHA3-256 over the handshake messages (PROFILE §3), through cryptography's
    hash; an intermediate digest finalizes a copy, so the transcript can go on."""

    __slots__ = ("_hash",)

    def __init__(self, first: bytes) -> None:
        self._hash = hashes.Hash(_SHA3)
        self._hash.update(first)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.copy().finalize()

    def copy(self) -> _Transcript:
        twin = _Transcript.__new__(_Transcript)
        twin._hash = self._hash.copy()
        return twin


@dataclass
class HandshakeResult:
    """What a finished handshake hands to the session. The caller wipes the secrets."""

    master_secret: bytearray
    #: Derived only when the session may carry tickets (PLUS resumption negotiated).
    resumption_secret: bytearray | None
    #: Hex SHA3-256 of the peer's key (from the trust store, or from the ticket).
    peer_fingerprint: str
    plus_features: int
    kem: int = wire.KEM_MLKEM768
    sig: int = wire.SIG_MLDSA65
    aead: int = wire.AEAD_CHACHA20POLY1305

    resumed: bool = False
    #: Traffic shaping agreed for the session (spec §10; Mode 0 unless negotiated).
    shaping: Shaping = field(default_factory=Shaping)


def _encapsulate(kem: int, public_key: bytes, code: ErrorCode) -> tuple[bytearray, bytes]:
    """``(shared_secret, ciphertext)``; a public key that does not load fails with ``code``.

    The shared secret is returned in a bytearray the caller wipes. ``cryptography`` hands it
    over as immutable bytes; that object is dropped here at once, unwiped (see "Erasure" in
    docs/architecture.md)."""
    try:
        pub = _KEM_PUBLIC[kem].from_public_bytes(public_key)
        ss, ct = pub.encapsulate()
    except (ValueError, KeyError) as exc:
        raise HandshakeError(code, "peer KEM public key is invalid") from exc
    return bytearray(ss), ct


def _decapsulate(
    key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey, ciphertext: bytes
) -> bytearray:
    """The shared secret in a bytearray the caller wipes (as for :func:`_encapsulate`)."""
    try:
        return bytearray(key.decapsulate(ciphertext))
    except ValueError as exc:
        raise HandshakeError(ErrorCode.ErrorKEMDecapFailed, "KEM decapsulation failed") from exc


def _derive(
    ss_c: bytearray, ss_s: bytearray, client_nonce: bytes, server_nonce: bytes, th: bytes,
    plus: int, psk: bytes | bytearray | None = None,
) -> tuple[bytearray, bytearray | None]:
    """master and resumption secrets from the KEM secrets, nonces and transcript (§3); a
    resumption uses the ticket's PSK as the Extract salt (PROFILE §7). The resumption secret
    exists only for sessions that negotiated PLUS resumption: no other session issues or
    redeems tickets, so it would be a secret kept for nothing. Both KEM secrets are wiped
    here, whatever happens: nothing needs them once the IKM exists."""
    try:
        ikm = ks.early_ikm(ss_c, ss_s, client_nonce, server_nonce)
    finally:
        ks.wipe(ss_c)
        ks.wipe(ss_s)
    hs = ks.handshake_secret(ikm, th, psk)
    try:
        master = ks.master_secret(hs)
        return master, ks.resumption_secret(master) if plus & PLUS_RESUMPTION else None
    finally:
        ks.wipe(ikm)
        ks.wipe(hs)


_M = TypeVar("_M")


def _decode(decoder: Callable[[bytes], _M], data: bytes) -> _M:
    """Decode a peer's message; a malformed one fails the handshake with its spec code."""
    try:
        return decoder(data)
    except DecodeError as exc:
        raise HandshakeError(exc.code, str(exc)) from exc


def _plus_extensions(features: int) -> list[wire.Extension]:
    """The PLUS extension carrying ``features``, or nothing for CORE."""
    return [wire.make_plus_extension(features)] if features else []


def _plus_from(extensions: tuple[wire.Extension, ...], code: ErrorCode) -> int:
    try:
        return wire.check_extensions(extensions)
    except DecodeError as exc:
        raise HandshakeError(exc.code if exc.code != ErrorCode.ErrorMalformedPacket else code,
                             str(exc)) from exc


def _plus_answered(extensions: tuple[wire.Extension, ...], offered: int) -> int:
    """Client: the PLUS features the server's hello selects, which must be ones we offered."""
    plus = _plus_from(extensions, ErrorCode.ErrorInvalidServerHello)
    if plus & ~offered:
        raise HandshakeError(ErrorCode.ErrorInvalidServerHello, "PLUS features not offered")
    return plus


class ClientHandshake:
    """Client side: builds CH, checks SH, builds CF, derives the session secrets."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._kem_key: mlkem.MLKEM768PrivateKey | None = mlkem.MLKEM768PrivateKey.generate()
        extensions = (_plus_extensions(config.plus_features)
                      + shaping_extensions(config, config.plus_features))
        self.client_hello = wire.ClientHello(
            supported_kems=(wire.KEM_MLKEM768,),
            supported_sigs=SUPPORTED_SIGS,
            supported_aeads=SUPPORTED_AEADS,
            client_nonce=config.rng(32),
            k_c=self._kem_key.public_key().public_bytes_raw(),
            client_certificate=config.identity.public_key,
            extensions=extensions,
        )
        self.client_hello_bytes = self.client_hello.encode()
        self.result: HandshakeResult | None = None
        #: True once an SH's signature verified: from then on a failure is the server's own,
        #: and the handshake is over; before that, a failing SH may be a forgery.
        self.authentic = False

    def erase(self) -> None:
        """Drop the ephemeral KEM key. ``cryptography`` holds it inside the key object, out of
        our reach: dropping the last reference is all we can do (docs/architecture.md)."""
        self._kem_key = None

    def on_server_hello(self, data: bytes) -> bytes:
        """Check SH; return the encoded ClientFinished. ``self.result`` is then set.

        An SH whose signature did not verify may be a forgery, not the server's answer: it
        leaves this object usable for the genuine SH that may still come (the connection
        decides when to give up). Past the signature the SH is the server's own, and any
        failure there erases the handshake."""
        try:
            return self._on_server_hello(data)
        except HandshakeError:
            if self.authentic:
                self.erase()
            raise

    def _on_server_hello(self, data: bytes) -> bytes:
        if self._kem_key is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "handshake already finished")
        sh = _decode(wire.ServerHello.decode, data)
        ch = self.client_hello
        if sh.version != wire.VERSION:
            raise HandshakeError(ErrorCode.ErrorInvalidVersion, f"server version {sh.version:#x}")
        # The server must pick from what we offered; anything else is a downgrade attempt.
        if sh.kem_choice not in ch.supported_kems:
            raise HandshakeError(ErrorCode.ErrorUnsupportedKEM, "server chose a KEM not offered")
        if sh.sig_choice not in ch.supported_sigs:
            raise HandshakeError(ErrorCode.ErrorUnsupportedSignature, "signature not offered")
        if sh.aead_choice not in ch.supported_aeads:
            raise HandshakeError(ErrorCode.ErrorUnsupportedAEAD, "AEAD not offered")
        plus = _plus_answered(sh.extensions, self._config.plus_features)
        shaping = client_shaping(self._config, plus, sh.extensions)
        peer_fp = self._config.trust.pinned_fingerprint(sh.server_certificate)
        if peer_fp is None:
            raise HandshakeError(ErrorCode.ErrorCertificateInvalid, "server key is not pinned")
        # Hash CH* ‖ SH* once; the copy continues into th with CF*. CH carries no signature,
        # so its transcript form is its encoding.
        running = _Transcript(self.client_hello_bytes)
        running.update(sh.transcript_bytes())
        signed = running.digest()
        if not verify_signature(
            sh.server_certificate, sh.server_signature, signed, SERVER_CONTEXT
        ):
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "server signature")
        self.authentic = True
        ss_c = _decapsulate(self._kem_key, sh.ct_c)
        try:
            ss_s, ct_s = _encapsulate(sh.kem_choice, sh.k_s, ErrorCode.ErrorInvalidServerHello)
        except HandshakeError:
            ks.wipe(ss_c)
            raise
        try:
            cf = wire.ClientFinished(ct_s=ct_s)
            running.update(cf.transcript_bytes())
            th = running.digest()
            cf = cf.replace(client_signature=self._config.identity.sign(th, CLIENT_CONTEXT))
        except BaseException:
            ks.wipe(ss_c)
            ks.wipe(ss_s)
            raise
        master, resumption = _derive(ss_c, ss_s, ch.client_nonce, sh.server_nonce, th, plus)
        self.erase()
        self.result = HandshakeResult(
            master_secret=master,
            resumption_secret=resumption,
            peer_fingerprint=peer_fp,
            plus_features=plus,
            shaping=shaping,
            kem=sh.kem_choice,
            sig=sh.sig_choice,
            aead=sh.aead_choice,
        )
        return cf.encode()


@dataclass
class ServerHandshake:
    """Server side: checks CH, builds SH, checks CF, derives the session secrets."""

    config: Config
    result: HandshakeResult | None = None
    _kem_key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey | None = field(
        default=None, repr=False
    )
    _ss_c: bytearray | None = field(default=None, repr=False)
    _ch: wire.ClientHello | None = None
    _sh: wire.ServerHello | None = None
    _plus: int = 0
    _shaping: Shaping = field(default_factory=Shaping)
    _peer_fp: str = ""
    _running: _Transcript | None = None  # SHA3-256 state over CH* ‖ SH*

    def erase(self) -> None:
        """Wipe the held KEM secret; drop the KEM key (held inside ``cryptography``)."""
        self._kem_key = None
        ks.wipe(self._ss_c)
        self._ss_c = None

    def on_client_hello(self, data: bytes) -> bytes:
        """Check CH; return the encoded ServerHello."""
        try:
            return self._on_client_hello(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_client_hello(self, data: bytes) -> bytes:
        ch = _decode(wire.ClientHello.decode, data)
        if ch.client_signature:
            # The client signs in ClientFinished (PROFILE §2-§3); CH carries no signature, and a
            # filled-in one sits outside the transcript where anyone could have put it.
            raise HandshakeError(ErrorCode.ErrorInvalidClientHello,
                                 "ClientHello must not carry a signature")
        kem = next((k for k in ch.supported_kems if k in SUPPORTED_KEMS), None)
        if kem is None:
            raise HandshakeError(ErrorCode.ErrorUnsupportedKEM, "no common KEM")
        sig = next((s for s in ch.supported_sigs if s in SUPPORTED_SIGS), None)
        if sig is None:
            raise HandshakeError(ErrorCode.ErrorUnsupportedSignature, "no common signature")
        aead = next((a for a in ch.supported_aeads if a in SUPPORTED_AEADS), None)
        if aead is None:
            raise HandshakeError(ErrorCode.ErrorUnsupportedAEAD, "no common AEAD")
        offered = _plus_from(ch.extensions, ErrorCode.ErrorInvalidClientHello)
        self._plus = offered & self.config.plus_features
        self._shaping = server_shaping(self.config, self._plus, ch.extensions)
        peer_fp = self.config.trust.pinned_fingerprint(ch.client_certificate)
        if peer_fp is None:
            raise HandshakeError(ErrorCode.ErrorCertificateInvalid, "client key is not pinned")
        ss_c, ct_c = _encapsulate(kem, ch.k_c, ErrorCode.ErrorInvalidClientHello)
        self._ss_c = ss_c  # held from here on, so that erase() wipes it whatever fails next
        self._kem_key = _KEM_CLASSES[kem].generate()
        extensions = (_plus_extensions(self._plus)
                      + shaping_extensions(self.config, self._plus, answer=self._shaping))
        sh = wire.ServerHello(
            kem_choice=kem,
            sig_choice=sig,
            aead_choice=aead,
            server_nonce=self.config.rng(32),
            k_s=self._kem_key.public_key().public_bytes_raw(),
            ct_c=ct_c,
            server_certificate=self.config.identity.public_key,
            extensions=extensions,
        )
        # CH* is CH as received: it carries no signature (checked above), so the bytes on the
        # wire are its transcript form and need no re-encoding.
        running = _Transcript(data)
        running.update(sh.transcript_bytes())
        signed = running.digest()
        sh = sh.replace(server_signature=self.config.identity.sign(signed, SERVER_CONTEXT))
        self._ch, self._sh, self._running = ch, sh, running
        self._peer_fp = peer_fp
        return sh.encode()

    def on_client_finished(self, data: bytes) -> HandshakeResult:
        try:
            return self._on_client_finished(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_client_finished(self, data: bytes) -> HandshakeResult:
        if self._kem_key is None or self._ch is None or self._sh is None or self._ss_c is None \
                or self._running is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "ClientFinished out of order")
        cf = _decode(wire.ClientFinished.decode, data)
        ch, sh = self._ch, self._sh
        running = self._running.copy()
        running.update(cf.transcript_bytes())
        th = running.digest()
        if not verify_signature(
            ch.client_certificate, cf.client_signature, th, CLIENT_CONTEXT
        ):
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "client signature")
        ss_s = _decapsulate(self._kem_key, cf.ct_s)
        master, resumption = _derive(self._ss_c, ss_s, ch.client_nonce, sh.server_nonce, th,
                                     self._plus)  # wipes both KEM secrets
        self.erase()
        self.result = HandshakeResult(
            master_secret=master,
            resumption_secret=resumption,
            peer_fingerprint=self._peer_fp,
            plus_features=self._plus,
            shaping=self._shaping,
            kem=sh.kem_choice,
            sig=sh.sig_choice,
            aead=sh.aead_choice,
        )
        return self.result


# -- resumption (PALISADE-PLUS, PROFILE §7) ---------------------------------------------------
#
# CHR -> SHR -> CFR. No certificates and no signatures: both sides prove they hold the ticket's
# PSK with HMAC-SHA3-256 under finished keys expanded from it. The server's MAC covers
# SHA3-256(CHR* ‖ SHR*); the client's covers th = SHA3-256(CHR* ‖ SHR* ‖ CFR*), where X* is X
# without its MAC. A fresh double KEM exchange still runs, so the new session's keys do not
# depend on the PSK alone, and the PSK is the Extract salt of the usual key schedule.


def _finished_mac(psk: bytearray, role: bytes, digest: bytes) -> bytes:
    """HMAC-SHA3-256 of ``digest`` under the ``role`` finished key of ``psk`` (PROFILE §7);
    the finished key is wiped as soon as the MAC is made."""
    key = ks.finished_key(psk, role)
    try:
        h = hmac.HMAC(key, _SHA3)
        h.update(digest)
        return h.finalize()
    finally:
        ks.wipe(key)


class ClientResumeHandshake:
    """Client side of resumption: CHR (with optional early-data keys), check SHR, build CFR."""

    def __init__(self, config: Config, ticket: ClientTicket, early_data: bool) -> None:
        self._config = config
        self._ticket = ticket
        self._psk = bytearray(ticket.psk)
        self._kem_key: mlkem.MLKEM768PrivateKey | None = mlkem.MLKEM768PrivateKey.generate()
        extensions = (_plus_extensions(config.plus_features)
                      + shaping_extensions(config, config.plus_features))
        self.hello = wire.ClientHelloResume(
            ticket=ticket.ticket,
            k_c=self._kem_key.public_key().public_bytes_raw(),
            resume_nonce=config.rng(32),
            early_data_offered=early_data,
            extensions=extensions,
        )
        self.hello_bytes = self.hello.encode()
        self._running = _Transcript(self.hello_bytes)  # CHR has no MAC: CHR* is CHR
        #: 0-RTT traffic secret, when early data is offered (the caller builds its record layer).
        self.early_secret: bytearray | None = (
            ks.early_data_secret(self._psk, self._running.digest()) if early_data else None
        )
        self.result: HandshakeResult | None = None
        self.accepted_0rtt = False
        #: True once an SHR's MAC verified: from then on a failure is the server's.
        self.authentic = False

    def erase(self) -> None:
        self._kem_key = None
        ks.wipe(self._psk)
        ks.wipe(self.early_secret)

    def on_server_hello_resume(self, data: bytes) -> bytes:
        """Check SHR; return the encoded CFR. As for SH, a reply whose MAC does not verify
        leaves this object usable for the genuine one."""
        try:
            return self._on_shr(data)
        except HandshakeError:
            if self.authentic:
                self.erase()
            raise

    def _on_shr(self, data: bytes) -> bytes:
        if self._kem_key is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "handshake already finished")
        shr = _decode(wire.ServerHelloResume.decode, data)
        plus = _plus_answered(shr.extensions, self._config.plus_features)
        shaping = client_shaping(self._config, plus, shr.extensions)
        running = self._running.copy()
        running.update(shr.transcript_bytes())
        if not _hmac.compare_digest(_finished_mac(self._psk, b"server", running.digest()),
                                    shr.mac):
            # Only a holder of the PSK, sealed in the ticket by the real server, can make it.
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "resumption MAC")
        self.authentic = True
        ss_c = _decapsulate(self._kem_key, shr.ct_c)
        try:
            ss_s, ct_s = _encapsulate(wire.KEM_MLKEM768, shr.k_s,
                                      ErrorCode.ErrorInvalidServerHello)
        except HandshakeError:
            ks.wipe(ss_c)
            raise
        cfr_star = wire.ClientFinishedResume(ct_s=ct_s, mac=bytes(32)).transcript_bytes()
        running.update(cfr_star)
        th = running.digest()
        cfr = wire.ClientFinishedResume(ct_s=ct_s, mac=_finished_mac(self._psk, b"client", th))
        master, resumption = _derive(ss_c, ss_s, self.hello.resume_nonce, shr.server_nonce, th,
                                     plus, self._psk)
        self.accepted_0rtt = shr.accept_0rtt
        self.result = HandshakeResult(
            master_secret=master, resumption_secret=resumption,
            peer_fingerprint=self._ticket.server_fingerprint,
            plus_features=plus, resumed=True, shaping=shaping,
        )
        self._kem_key = None
        ks.wipe(self._psk)
        return cfr.encode()


class ServerResumeHandshake:
    """Server side of resumption: redeem the ticket, build SHR, check CFR."""

    def __init__(self, config: Config, tickets: TicketService) -> None:
        self._config = config
        self._tickets = tickets
        self._kem_key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey | None = None
        self._psk = bytearray()
        self._ss_c: bytearray | None = None
        self._running: _Transcript | None = None
        self._hello: wire.ClientHelloResume | None = None
        self._shr: wire.ServerHelloResume | None = None
        self._shaping = Shaping()
        self._plus = 0
        self.inner: TicketInner | None = None
        self.accept_0rtt = False
        self.early_secret: bytearray | None = None
        self.result: HandshakeResult | None = None

    def erase(self) -> None:
        self._kem_key = None
        ks.wipe(self._ss_c)
        self._ss_c = None
        ks.wipe(self._psk)
        ks.wipe(self.early_secret)

    def on_client_hello_resume(self, data: bytes) -> bytes:
        try:
            return self._on_chr(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_chr(self, data: bytes) -> bytes:
        chr_ = _decode(wire.ClientHelloResume.decode, data)
        offered = _plus_from(chr_.extensions, ErrorCode.ErrorInvalidClientHello)
        self._plus = offered & self._config.plus_features
        self._shaping = server_shaping(self._config, self._plus, chr_.extensions)
        inner, why = self._tickets.redeem(chr_.ticket)
        if inner is None:
            code = {"expired": ErrorCode.ErrorTicketExpired,
                    "replayed": ErrorCode.ErrorTicketReplayed}.get(why,
                                                                   ErrorCode.ErrorTicketInvalid)
            raise HandshakeError(code, f"ticket {why}")
        # The pin that admitted the original client must still be in force.
        if not self._config.trust.has_fingerprint(inner.client_fingerprint.hex()):
            raise HandshakeError(ErrorCode.ErrorCertificateInvalid, "ticket's client not pinned")
        if inner.kem not in SUPPORTED_KEMS:
            raise HandshakeError(ErrorCode.ErrorTicketInvalid, "ticket names an unknown KEM")
        self.inner = inner
        self._psk = bytearray(inner.psk)
        ss_c, ct_c = _encapsulate(wire.KEM_MLKEM768, chr_.k_c, ErrorCode.ErrorInvalidClientHello)
        self._ss_c = ss_c  # held from here on, so that erase() wipes it whatever fails next
        self._kem_key = mlkem.MLKEM768PrivateKey.generate()
        self.accept_0rtt = bool(chr_.early_data_offered and inner.max_early_data > 0
                                and self._config.early_data_streams)
        running = _Transcript(data)  # CHR has no MAC field: CHR* is CHR as received
        if self.accept_0rtt:
            self.early_secret = ks.early_data_secret(self._psk, running.digest())
        extensions = (_plus_extensions(self._plus)
                      + shaping_extensions(self._config, self._plus, answer=self._shaping))
        shr = wire.ServerHelloResume(
            server_nonce=self._config.rng(32),
            k_s=self._kem_key.public_key().public_bytes_raw(),
            ct_c=ct_c, mac=bytes(32), accept_0rtt=self.accept_0rtt, extensions=extensions,
        )
        running.update(shr.transcript_bytes())
        shr = shr.replace(mac=_finished_mac(self._psk, b"server", running.digest()))
        self._hello, self._shr, self._running = chr_, shr, running
        return shr.encode()

    def on_client_finished_resume(self, data: bytes) -> HandshakeResult:
        try:
            return self._on_cfr(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_cfr(self, data: bytes) -> HandshakeResult:
        if self._kem_key is None or self._hello is None or self._shr is None \
                or self._ss_c is None or self.inner is None or self._running is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "CFR out of order")
        cfr = _decode(wire.ClientFinishedResume.decode, data)
        running = self._running.copy()
        running.update(cfr.transcript_bytes())
        th = running.digest()
        if not _hmac.compare_digest(_finished_mac(self._psk, b"client", th), cfr.mac):
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "resumption MAC")
        ss_s = _decapsulate(self._kem_key, cfr.ct_s)
        master, resumption = _derive(self._ss_c, ss_s, self._hello.resume_nonce,
                                     self._shr.server_nonce, th, self._plus, self._psk)
        inner = self.inner
        self.erase()
        self.result = HandshakeResult(
            master_secret=master, resumption_secret=resumption,
            peer_fingerprint=inner.client_fingerprint.hex(),
            plus_features=self._plus, kem=inner.kem, sig=inner.sig,
            aead=inner.aead, resumed=True, shaping=self._shaping,
        )
        return self.result
