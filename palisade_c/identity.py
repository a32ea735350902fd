"""Long-term identities and the pinning trust store (PROFILE §2, "certificates").

A PALISADE "certificate" is the raw ML-DSA public key of an endpoint, and trust is pinning:
each side is configured with the peer keys (or their fingerprints) it accepts; there are no
certificate chains [profile]. This module holds:

* :class:`Identity` - an endpoint's ML-DSA-65 signing key, with file storage;
* :func:`load_public_key` / :func:`fingerprint` - peer keys and their names;
* :class:`TrustStore` - the set of pinned peer keys;
* :func:`verify_signature` - a verification that answers True/False and never raises.

Files. The private key is stored as PKCS#8 PEM (self-describing, readable by OpenSSL), created
with mode 0600 and moved into place atomically so a crash never leaves a half-written key. The
public key is stored as SubjectPublicKeyInfo PEM in a ``.pub`` file. A fingerprint is the
lowercase hex SHA3-256 of the raw public key bytes [profile].
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import mldsa

from palisade_c.errors import ConfigError

StrPath: TypeAlias = str | os.PathLike[str]
TrustEntry: TypeAlias = bytes | bytearray | memoryview | str | os.PathLike[str]

MLDSA65_PUBLIC_KEY_LEN = 1952
MLDSA87_PUBLIC_KEY_LEN = 2592
FINGERPRINT_HEX_LEN = 64

#: Context strings of the handshake signatures (PROFILE §3).
SERVER_CONTEXT = b"PALISADE server"
CLIENT_CONTEXT = b"PALISADE client"

_HEX_DIGITS = frozenset("0123456789abcdef")


def fingerprint(public_key: bytes) -> str:
    """Lowercase hex SHA3-256 of a raw public key [profile]."""
    digest = hashes.Hash(hashes.SHA3_256())
    digest.update(public_key)
    return digest.finalize().hex()


def write_atomic(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory.

    The temporary file is created with ``mode`` from the start (never world-readable, even for
    an instant) and renamed over the target only once it is complete and synced.
    """
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; make it exact
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() refuses an existing target, so a file created since the check above is
            # never clobbered; the temporary name is dropped afterwards.
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_file(path: StrPath, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror}") from exc


def _as_bytes(value: object) -> bytes | None:
    # bytes(n) for an int n would allocate n zero bytes: accept only real byte buffers.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def _public_key_object(raw: bytes) -> mldsa.MLDSA65PublicKey | mldsa.MLDSA87PublicKey | None:
    """Parse raw ML-DSA public key bytes; the algorithm follows from the length."""
    try:
        if len(raw) == MLDSA65_PUBLIC_KEY_LEN:
            return mldsa.MLDSA65PublicKey.from_public_bytes(raw)
        if len(raw) == MLDSA87_PUBLIC_KEY_LEN:
            return mldsa.MLDSA87PublicKey.from_public_bytes(raw)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return None


class Identity:
    """An endpoint's long-term ML-DSA-65 key (spec §4: ML-DSA-65 is the MUST signature)."""

    __slots__ = ("_key", "_public")

    def __init__(self, private_key: mldsa.MLDSA65PrivateKey) -> None:
        if not isinstance(private_key, mldsa.MLDSA65PrivateKey):
            raise TypeError("Identity needs an ML-DSA-65 private key")
        self._key = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(mldsa.MLDSA65PrivateKey.generate())

    @classmethod
    def load(cls, path: StrPath) -> Identity:
        """Read a private key file written by :meth:`save`.

        Raises :class:`ConfigError` if the file cannot be read or does not hold an unencrypted
        ML-DSA-65 PKCS#8 key. Warns (it does not refuse) if group or others may read it.
        """
        data = _read_file(path, "identity file")
        with contextlib.suppress(OSError):
            mode = os.stat(path).st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.warn(
                    f"identity file {os.fspath(path)!r} is accessible to other users "
                    f"(mode {stat.S_IMODE(mode):04o}); it should be 0600",
                    stacklevel=2,
                )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # The underlying message may quote file content; keep it out of the error.
            raise ConfigError(f"{os.fspath(path)!r} is not an unencrypted PEM private key") from exc
        if not isinstance(key, mldsa.MLDSA65PrivateKey):
            raise ConfigError(f"{os.fspath(path)!r} holds a key that is not ML-DSA-65")
        return cls(key)

    def save(self, path: StrPath, *, overwrite: bool = False) -> None:
        """Write the private key (PKCS#8 PEM) with mode 0600, atomically."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_atomic(Path(path), pem, 0o600, overwrite)

    def save_public(self, path: StrPath, *, overwrite: bool = False) -> None:
        """Write the public key (SubjectPublicKeyInfo PEM) for peers to pin; mode 0644."""
        pem = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_atomic(Path(path), pem, 0o644, overwrite)

    @property
    def public_key(self) -> bytes:
        """The raw public key: the bytes sent as the handshake certificate (1952 bytes)."""
        return self._public

    @property
    def fingerprint(self) -> str:
        """Hex SHA3-256 of :attr:`public_key`."""
        return fingerprint(self._public)

    def sign(self, data: bytes, context: bytes) -> bytes:
        """ML-DSA-65 signature of ``data`` under ``context`` (PROFILE §3 context strings)."""
        return self._key.sign(data, context=context)

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.fingerprint[:16]}...)"


def load_public_key(path: StrPath) -> bytes:
    """Raw public key bytes from a ``.pub`` file written by :meth:`Identity.save_public`.

    ML-DSA-65 and ML-DSA-87 keys are accepted; anything else raises :class:`ConfigError`.
    """
    data = _read_file(path, "public key file")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{os.fspath(path)!r} is not a PEM public key") from exc
    if not isinstance(key, (mldsa.MLDSA65PublicKey, mldsa.MLDSA87PublicKey)):
        raise ConfigError(f"{os.fspath(path)!r} holds a key that is not ML-DSA-65/87")
    return key.public_bytes_raw()


def verify_signature(public_key: bytes, signature: bytes, data: bytes, context: bytes) -> bool:
    """True only if ``signature`` is a valid ML-DSA signature of ``data`` under ``context``.

    The algorithm (ML-DSA-65 or -87) follows from the key length. Any failure (wrong types,
    a malformed key, a bad signature, a context over 255 bytes) gives False: this is fed
    with peer bytes, and a peer must never be able to raise out of the core.
    """
    raw, sig, msg, ctx = (_as_bytes(v) for v in (public_key, signature, data, context))
    if raw is None or sig is None or msg is None or ctx is None:
        return False
    try:
        key = _public_key_object(raw)
        if key is None:
            return False
        key.verify(sig, msg, context=ctx)
    except (InvalidSignature, ValueError, TypeError, OverflowError):
        return False
    return True


def _is_fingerprint(text: str) -> bool:
    return len(text) == FINGERPRINT_HEX_LEN and set(text.lower()) <= _HEX_DIGITS


class TrustStore:
    """The pinned peer keys (PROFILE §2: trust is pinning; no chains).

    Each entry is one of:

    * raw public key bytes (``bytes``/``bytearray``/``memoryview``), ML-DSA-65 or -87;
    * a 64-character hex fingerprint string (case-insensitive);
    * a path (``str`` or ``os.PathLike``) to a ``.pub`` file.

    A ``str`` that is 64 hex digits is read as a fingerprint, never as a file name.
    Malformed entries raise :class:`ConfigError` when the store is built.
    """

    __slots__ = ("_fingerprints", "_known_raw")

    def __init__(self, entries: Iterable[TrustEntry] = ()) -> None:
        self._fingerprints: set[str] = set()
        # Raw keys already seen to be pinned, with their fingerprints: a dict lookup instead of
        # a SHA3 per handshake.
        self._known_raw: dict[bytes, str] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: TrustEntry) -> None:
        """Pin one more key (see the class docstring for the entry forms)."""
        if isinstance(entry, (bytes, bytearray, memoryview)):
            raw = bytes(entry)
            if _public_key_object(raw) is None:
                raise ConfigError(
                    f"trusted key of {len(raw)} bytes is not an ML-DSA-65/87 public key"
                )
            self._fingerprints.add(fingerprint(raw))
        elif isinstance(entry, str) and _is_fingerprint(entry):
            self._fingerprints.add(entry.lower())
        elif isinstance(entry, (str, os.PathLike)):
            self._fingerprints.add(fingerprint(load_public_key(entry)))
        else:
            raise ConfigError(f"cannot use a {type(entry).__name__} as a trust entry")

    def replace_with(self, other: TrustStore) -> None:
        """Pin exactly what ``other`` pins, in place (a trust reload: every holder of this
        store sees the change at its next handshake; live sessions are not re-checked)."""
        self._fingerprints = set(other._fingerprints)
        self._known_raw = {}

    def is_trusted(self, public_key: bytes) -> bool:
        """True if ``public_key`` (raw bytes, as received) is pinned. Never raises."""
        return self.pinned_fingerprint(public_key) is not None

    def pinned_fingerprint(self, public_key: bytes) -> str | None:
        """The fingerprint of ``public_key`` if it is pinned, else None. Never raises."""
        raw = _as_bytes(public_key)
        if raw is None:
            return None
        known = self._known_raw.get(raw)
        if known is not None:
            return known
        fp = fingerprint(raw)
        if fp not in self._fingerprints:
            return None
        if len(self._known_raw) < 4 * len(self._fingerprints):  # bounded: pinned keys only
            self._known_raw[raw] = fp
        return fp

    def has_fingerprint(self, fp: str) -> bool:
        """True if the key with this hex fingerprint is pinned (case-insensitive)."""
        return fp.lower() in self._fingerprints

    @property
    def fingerprints(self) -> frozenset[str]:
        """The pinned fingerprints (lowercase hex)."""
        return frozenset(self._fingerprints)

    def __contains__(self, public_key: object) -> bool:
        raw = _as_bytes(public_key)
        return raw is not None and self.is_trusted(raw)

    def __len__(self) -> int:
        return len(self._fingerprints)

    def __repr__(self) -> str:
        return f"TrustStore({len(self)} keys)"
