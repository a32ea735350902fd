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

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import mlkem

from palisade_c import keyschedule as ks
from palisade_c import wire
from palisade_c.config import Config
from palisade_c.errors import DecodeError, ErrorCode, HandshakeError
from palisade_c.identity import fingerprint, verify_signature

SERVER_SIG_CONTEXT = b"PALISADE server"
CLIENT_SIG_CONTEXT = b"PALISADE client"

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


@dataclass
class HandshakeResult:
    """What a finished handshake hands to the session. The caller wipes the secrets."""

    master_secret: bytearray
    resumption_secret: bytearray
    peer_public_key: bytes
    plus_features: int
    transcript_hash: bytes
    kem: int = wire.KEM_MLKEM768
    sig: int = wire.SIG_MLDSA65
    aead: int = wire.AEAD_CHACHA20POLY1305

    @functools.cached_property
    def peer_fingerprint(self) -> str:
        return fingerprint(self.peer_public_key)

    def erase(self) -> None:
        ks.wipe(self.master_secret)
        ks.wipe(self.resumption_secret)


def _encapsulate(kem: int, public_key: bytes, code: ErrorCode) -> tuple[bytes, bytes]:
    """``(shared_secret, ciphertext)``; a public key that does not load fails with ``code``."""
    try:
        pub = _KEM_PUBLIC[kem].from_public_bytes(public_key)
        return pub.encapsulate()
    except (ValueError, KeyError) as exc:
        raise HandshakeError(code, "peer KEM public key is invalid") from exc


def _decapsulate(
    key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey, ciphertext: bytes
) -> bytes:
    try:
        return key.decapsulate(ciphertext)
    except ValueError as exc:
        raise HandshakeError(ErrorCode.ErrorKEMDecapFailed, "KEM decapsulation failed") from exc


def _derive(
    ss_c: bytes, ss_s: bytes, client_nonce: bytes, server_nonce: bytes, th: bytes
) -> tuple[bytearray, bytearray]:
    """master and resumption secrets from the KEM secrets, nonces and transcript (§3)."""
    ikm = ks.early_ikm(ss_c, ss_s, client_nonce, server_nonce)
    hs = ks.handshake_secret(ikm, th)
    try:
        master = ks.master_secret(hs)
        return master, ks.resumption_secret(master)
    finally:
        ks.wipe(ikm)
        ks.wipe(hs)


def _plus_from(extensions: tuple[wire.Extension, ...], code: ErrorCode) -> int:
    try:
        return wire.check_extensions(extensions)
    except DecodeError as exc:
        raise HandshakeError(exc.code if exc.code != ErrorCode.ErrorMalformedPacket else code,
                             str(exc)) from exc


class ClientHandshake:
    """Client side: builds CH, checks SH, builds CF, derives the session secrets."""

    def __init__(self, config: Config, rng: Callable[[int], bytes] | None = None) -> None:
        self._config = config
        rng = rng or config.rng
        self._kem_key: mlkem.MLKEM768PrivateKey | None = mlkem.MLKEM768PrivateKey.generate()
        extensions = []
        if config.plus_features:
            extensions.append(wire.make_plus_extension(config.plus_features))
        self.client_hello = wire.ClientHello(
            supported_kems=(wire.KEM_MLKEM768,),
            supported_sigs=SUPPORTED_SIGS,
            supported_aeads=SUPPORTED_AEADS,
            client_nonce=rng(32),
            k_c=self._kem_key.public_key().public_bytes_raw(),
            client_certificate=config.identity.public_key,
            extensions=extensions,
        )
        self.client_hello_bytes = self.client_hello.encode()
        # CH carries no signature, so its transcript form is its encoding.
        self._ch_star = self.client_hello.transcript_bytes()
        self.result: HandshakeResult | None = None

    def erase(self) -> None:
        """Drop the ephemeral KEM key (the object holds the only copy)."""
        self._kem_key = None

    def on_server_hello(self, data: bytes) -> bytes:
        """Check SH; return the encoded ClientFinished. ``self.result`` is then set."""
        try:
            return self._on_server_hello(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_server_hello(self, data: bytes) -> bytes:
        if self._kem_key is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "handshake already finished")
        try:
            sh = wire.ServerHello.decode(data)
        except DecodeError as exc:
            raise HandshakeError(exc.code, str(exc)) from exc
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
        plus = _plus_from(sh.extensions, ErrorCode.ErrorInvalidServerHello)
        if plus & ~self._config.plus_features:
            raise HandshakeError(ErrorCode.ErrorInvalidServerHello, "PLUS features not offered")
        if not self._config.trust.is_trusted(sh.server_certificate):
            raise HandshakeError(ErrorCode.ErrorCertificateInvalid, "server key is not pinned")
        # Hash CH* ‖ SH* once; the copy continues into th with CF*.
        running = hashlib.sha3_256(self._ch_star)
        running.update(sh.transcript_bytes())
        signed = running.digest()
        if not verify_signature(
            sh.server_certificate, sh.server_signature, signed, SERVER_SIG_CONTEXT
        ):
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "server signature")
        ss_c = _decapsulate(self._kem_key, sh.ct_c)
        ss_s, ct_s = _encapsulate(sh.kem_choice, sh.k_s, ErrorCode.ErrorInvalidServerHello)
        cf = wire.ClientFinished(ct_s=ct_s)
        running.update(cf.transcript_bytes())
        th = running.digest()
        cf = cf.replace(client_signature=self._config.identity.sign(th, CLIENT_SIG_CONTEXT))
        master, resumption = _derive(ss_c, ss_s, ch.client_nonce, sh.server_nonce, th)
        self.erase()
        self.result = HandshakeResult(
            master_secret=master,
            resumption_secret=resumption,
            peer_public_key=sh.server_certificate,
            plus_features=plus,
            transcript_hash=th,
            kem=sh.kem_choice,
            sig=sh.sig_choice,
            aead=sh.aead_choice,
        )
        return cf.encode()


@dataclass
class ServerHandshake:
    """Server side: checks CH, builds SH, checks CF, derives the session secrets."""

    config: Config
    rng: Callable[[int], bytes] | None = None
    result: HandshakeResult | None = None
    _kem_key: mlkem.MLKEM768PrivateKey | mlkem.MLKEM1024PrivateKey | None = field(
        default=None, repr=False
    )
    _ss_c: bytes | None = field(default=None, repr=False)
    _ch: wire.ClientHello | None = None
    _sh: wire.ServerHello | None = None
    _plus: int = 0
    _running: Any = None  # SHA3-256 state over CH* ‖ SH*

    def erase(self) -> None:
        self._kem_key = None
        self._ss_c = None

    def on_client_hello(self, data: bytes) -> bytes:
        """Check CH; return the encoded ServerHello."""
        try:
            return self._on_client_hello(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_client_hello(self, data: bytes) -> bytes:
        try:
            ch = wire.ClientHello.decode(data)
        except DecodeError as exc:
            raise HandshakeError(exc.code, str(exc)) from exc
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
        if not self.config.trust.is_trusted(ch.client_certificate):
            raise HandshakeError(ErrorCode.ErrorCertificateInvalid, "client key is not pinned")
        ss_c, ct_c = _encapsulate(kem, ch.k_c, ErrorCode.ErrorInvalidClientHello)
        self._kem_key = _KEM_CLASSES[kem].generate()
        extensions = [wire.make_plus_extension(self._plus)] if self._plus else []
        sh = wire.ServerHello(
            kem_choice=kem,
            sig_choice=sig,
            aead_choice=aead,
            server_nonce=(self.rng or self.config.rng)(32),
            k_s=self._kem_key.public_key().public_bytes_raw(),
            ct_c=ct_c,
            server_certificate=self.config.identity.public_key,
            extensions=extensions,
        )
        running = hashlib.sha3_256(ch.transcript_bytes())
        running.update(sh.transcript_bytes())
        signed = running.digest()
        sh = sh.replace(server_signature=self.config.identity.sign(signed, SERVER_SIG_CONTEXT))
        self._ch, self._sh, self._ss_c, self._running = ch, sh, ss_c, running
        return sh.encode()

    def on_client_finished(self, data: bytes) -> HandshakeResult:
        try:
            return self._on_client_finished(data)
        except HandshakeError:
            self.erase()
            raise

    def _on_client_finished(self, data: bytes) -> HandshakeResult:
        if self._kem_key is None or self._ch is None or self._sh is None or self._ss_c is None:
            raise HandshakeError(ErrorCode.ErrorProtocolViolation, "ClientFinished out of order")
        try:
            cf = wire.ClientFinished.decode(data)
        except DecodeError as exc:
            raise HandshakeError(exc.code, str(exc)) from exc
        ch, sh = self._ch, self._sh
        running = self._running.copy()
        running.update(cf.transcript_bytes())
        th = running.digest()
        if not verify_signature(
            ch.client_certificate, cf.client_signature, th, CLIENT_SIG_CONTEXT
        ):
            raise HandshakeError(ErrorCode.ErrorSignatureVerifyFailed, "client signature")
        ss_s = _decapsulate(self._kem_key, cf.ct_s)
        master, resumption = _derive(self._ss_c, ss_s, ch.client_nonce, sh.server_nonce, th)
        self.erase()
        self.result = HandshakeResult(
            master_secret=master,
            resumption_secret=resumption,
            peer_public_key=ch.client_certificate,
            plus_features=self._plus,
            transcript_hash=th,
            kem=sh.kem_choice,
            sig=sh.sig_choice,
            aead=sh.aead_choice,
        )
        return self.result
