"""``palisade pubkey`` and ``palisade fingerprint``: the public half and the name of any key
file, private (PKCS#8 PEM from ``palisade keygen``) or public (``.pub``)."""

from __future__ import annotations

import warnings

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from palisade_c.errors import ConfigError
from palisade_c.identity import Identity, StrPath, fingerprint, load_public_key

__all__ = ["fingerprint_of", "public_key_of", "public_pem"]


def public_key_of(path: StrPath) -> bytes:
    """The raw public key of a ``.pub`` file or of a private key file."""
    try:
        return load_public_key(path)
    except ConfigError as public_error:
        try:
            with warnings.catch_warnings():
                # Only the public half is read out: the loose-mode warning is for serving.
                warnings.simplefilter("ignore")
                return Identity.load(path).public_key
        except ConfigError:
            raise ConfigError(f"{path} holds neither a PALISADE public key nor a private "
                              "key") from public_error


def public_pem(path: StrPath) -> str:
    """The SubjectPublicKeyInfo PEM text of the key in ``path`` (what ``.pub`` files hold)."""
    raw = public_key_of(path)
    key: mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey
    if len(raw) == 1952:
        key = mldsa.MLDSA65PublicKey.from_public_bytes(raw)
    else:
        key = mldsa.MLDSA87PublicKey.from_public_bytes(raw)
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode("ascii")


def fingerprint_of(path: StrPath) -> str:
    """The hex fingerprint of the key in ``path`` (private or public)."""
    return fingerprint(public_key_of(path))
