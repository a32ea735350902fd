"""Trust directories and files (``--trust-dir``), reloadable while a server runs.

A trust source is either

* a directory: every ``*.pub`` file in it is a pinned public key, and every ``*.fp`` or
  ``*.txt`` file is a list of fingerprints; or
* a file in the ``authorized_keys`` spirit: one entry per line, each a 64-hex-digit
  fingerprint or the path of a ``.pub`` file (relative paths are relative to the list file);
  blank lines and lines starting with ``#`` are ignored, as is text after the first space.

:class:`TrustReloader` re-reads the sources into the running server's
:class:`~palisade_c.identity.TrustStore` in place (``palisade serve`` does it on SIGHUP).
Sessions already established are not touched: pinning is checked at the handshake.
A reload that fails (a malformed entry) keeps the previous trust and reports why.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from palisade_c.errors import ConfigError
from palisade_c.identity import TrustEntry, TrustStore

__all__ = ["TrustReloader", "read_trust_source"]

_LIST_SUFFIXES = (".fp", ".txt")


def _read_list(path: Path) -> list[TrustEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trust file {path}: {exc}") from None
    entries: list[TrustEntry] = []
    for line in text.splitlines():
        word = line.strip().split(" ", 1)[0] if line.strip() else ""
        if not word or word.startswith("#"):
            continue
        if len(word) == 64 and all(c in "0123456789abcdefABCDEF" for c in word):
            entries.append(word.lower())
        else:
            entries.append(str(path.parent / word))
    return entries


def read_trust_source(source: str | os.PathLike[str]) -> list[TrustEntry]:
    """The trust entries a directory or list file names (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        entries: list[TrustEntry] = []
        for child in sorted(path.iterdir()):
            if not child.is_file():
                continue
            if child.suffix == ".pub":
                entries.append(str(child))
            elif child.suffix in _LIST_SUFFIXES:
                entries.extend(_read_list(child))
        return entries
    if path.is_file():
        if path.suffix == ".pub":
            return [str(path)]
        return _read_list(path)
    raise ConfigError(f"trust source {path} is neither a directory nor a file")


class TrustReloader:
    """Rebuilds ``store`` from fixed entries (``--trust``) plus trust sources (``--trust-dir``)."""

    def __init__(self, store: TrustStore, fixed: Sequence[TrustEntry],
                 sources: Sequence[str | os.PathLike[str]]) -> None:
        self.store = store
        self.fixed = list(fixed)
        self.sources = list(sources)
        self.reloads = 0

    def build(self) -> TrustStore:
        entries = list(self.fixed)
        for source in self.sources:
            entries.extend(read_trust_source(source))
        return TrustStore(entries)

    def reload(self) -> int:
        """Re-read every source; returns the number of pinned keys. On ConfigError the
        store is left as it was."""
        new = self.build()
        self.store.replace_with(new)
        self.reloads += 1
        return len(new)
