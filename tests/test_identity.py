"""Tests of long-term identities, key files and the pinning trust store (palisade_c.identity)."""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from palisade_c import identity as identity_mod
from palisade_c.errors import ConfigError
from palisade_c.identity import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    Identity,
    TrustStore,
    fingerprint,
    load_public_key,
    verify_signature,
)


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def other() -> Identity:
    return Identity.generate()


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- Identity ---------------------------------------------------------------------------------


def test_public_key_and_fingerprint(ident: Identity) -> None:
    assert len(ident.public_key) == 1952
    assert ident.fingerprint == hashlib.sha3_256(ident.public_key).hexdigest()
    assert len(ident.fingerprint) == 64
    assert fingerprint(ident.public_key) == ident.fingerprint
    assert ident.fingerprint not in repr(ident)  # only a prefix, no key material


def test_sign_and_verify(ident: Identity, other: Identity) -> None:
    sig = ident.sign(b"transcript", SERVER_CONTEXT)
    assert len(sig) == 3309
    assert verify_signature(ident.public_key, sig, b"transcript", SERVER_CONTEXT)
    assert not verify_signature(ident.public_key, sig, b"transcript", CLIENT_CONTEXT)
    assert not verify_signature(ident.public_key, sig, b"transcripT", SERVER_CONTEXT)
    assert not verify_signature(other.public_key, sig, b"transcript", SERVER_CONTEXT)
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(ident.public_key, tampered, b"transcript", SERVER_CONTEXT)


@pytest.mark.parametrize(
    "args",
    [
        (b"", b"", b"", b""),
        (b"\x00" * 1952, b"\x00" * 3309, b"x", b""),
        (b"\x01" * 10, b"sig", b"x", b""),
        (None, b"sig", b"x", b""),
        (10**12, b"sig", b"x", b""),  # must not allocate a terabyte of zeros
        ("key", "sig", "x", ""),
        ("PUB", 10**12, 10**12, 10**12),
    ],
)
def test_verify_signature_never_raises(args: tuple[Any, Any, Any, Any]) -> None:
    assert verify_signature(*args) is False


def test_verify_signature_context_too_long(ident: Identity) -> None:
    sig = ident.sign(b"x", b"c")
    assert not verify_signature(ident.public_key, sig, b"x", b"c" * 256)


def test_verify_mldsa87_by_length() -> None:
    key = mldsa.MLDSA87PrivateKey.generate()
    sig = key.sign(b"m", context=b"ctx")
    assert verify_signature(key.public_key().public_bytes_raw(), sig, b"m", b"ctx")


def test_save_load_roundtrip(tmp_path: Path, ident: Identity, umask_022: None) -> None:
    path = tmp_path / "server.key"
    ident.save(path)
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]  # no temp file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0600 file draws no permission warning
        loaded = Identity.load(path)
    assert loaded.public_key == ident.public_key
    assert loaded.fingerprint == ident.fingerprint
    sig = loaded.sign(b"data", CLIENT_CONTEXT)
    assert verify_signature(ident.public_key, sig, b"data", CLIENT_CONTEXT)
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_save_is_0600_even_with_open_umask(tmp_path: Path, ident: Identity) -> None:
    old = os.umask(0)
    try:
        ident.save(str(tmp_path / "k"))
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "k") == 0o600


def test_save_refuses_to_overwrite(tmp_path: Path, ident: Identity, other: Identity) -> None:
    path = tmp_path / "k"
    ident.save(path)
    with pytest.raises(FileExistsError):
        other.save(path)
    assert Identity.load(path).public_key == ident.public_key
    other.save(path, overwrite=True)
    assert Identity.load(path).public_key == other.public_key
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]


def test_load_warns_on_open_permissions(tmp_path: Path, ident: Identity) -> None:
    path = tmp_path / "k"
    ident.save(path)
    path.chmod(0o644)
    with pytest.warns(UserWarning, match="0600"):
        Identity.load(path)


def test_load_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Identity.load(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key at all")
    junk.chmod(0o600)
    with pytest.raises(ConfigError):
        Identity.load(junk)
    ed = tmp_path / "ed"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ed.chmod(0o600)
    with pytest.raises(ConfigError, match="not ML-DSA-65"):
        Identity.load(ed)
    with pytest.raises(ConfigError):
        Identity.load(tmp_path)  # a directory


def test_identity_rejects_other_key_types() -> None:
    with pytest.raises(TypeError):
        Identity(ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]


# --- public keys and trust ------------------------------------------------------------------


def test_save_public_and_load(tmp_path: Path, ident: Identity) -> None:
    pub = tmp_path / "server.pub"
    ident.save_public(pub)
    assert load_public_key(pub) == ident.public_key
    assert load_public_key(str(pub)) == ident.public_key
    bad = tmp_path / "bad.pub"
    bad.write_text("hello")
    with pytest.raises(ConfigError):
        load_public_key(bad)
    with pytest.raises(ConfigError):
        load_public_key(tmp_path / "missing.pub")


def test_trust_by_bytes_fingerprint_and_path(
    tmp_path: Path, ident: Identity, other: Identity
) -> None:
    third = Identity.generate()
    pub = tmp_path / "third.pub"
    third.save_public(pub)
    store = TrustStore([ident.public_key, other.fingerprint.upper(), pub])
    assert len(store) == 3
    for trusted in (ident, other, third):
        assert store.is_trusted(trusted.public_key)
        assert trusted.public_key in store
    assert store.fingerprints == {ident.fingerprint, other.fingerprint, third.fingerprint}
    # Same key given twice in different forms counts once.
    assert len(TrustStore([ident.public_key, ident.fingerprint, bytearray(ident.public_key)])) == 1
    assert len(TrustStore([str(pub)])) == 1


def test_pinned_fingerprint_names_the_pinned_key(
        ident: Identity, other: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TrustStore([ident.fingerprint])
    expected = ident.fingerprint  # computed before counting starts
    hashed: list[bytes] = []
    real = identity_mod.fingerprint

    def counting(raw: bytes) -> str:
        hashed.append(raw)
        return real(raw)

    monkeypatch.setattr(identity_mod, "fingerprint", counting)
    for _ in range(2):
        assert store.pinned_fingerprint(ident.public_key) == expected
        assert store.pinned_fingerprint(bytearray(ident.public_key)) == expected
        assert store.pinned_fingerprint(other.public_key) is None
    assert store.pinned_fingerprint(None) is None  # type: ignore[arg-type]
    # The pinned key was hashed once, then answered from the raw-key cache; the unpinned one
    # is never cached, so it is hashed every time.
    assert hashed.count(ident.public_key) == 1
    assert hashed.count(other.public_key) == 2


def test_untrusted_key_rejected(ident: Identity, other: Identity) -> None:
    store = TrustStore([ident.fingerprint])
    assert not store.is_trusted(other.public_key)
    assert not store.is_trusted(b"")
    assert not store.is_trusted(ident.public_key[:-1])
    assert not store.is_trusted(None)  # type: ignore[arg-type]
    assert other.public_key not in store
    assert len(TrustStore()) == 0
    assert not TrustStore().is_trusted(ident.public_key)


@pytest.mark.parametrize("entry", [b"\x00" * 10, 12345, "not-a-file.pub", "ab" * 31, None])
def test_bad_trust_entries(entry: Any) -> None:
    with pytest.raises(ConfigError):
        TrustStore([entry])
