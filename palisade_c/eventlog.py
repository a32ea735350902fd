"""A JSON-lines event log: one object per state transition, epoch change, close and drop class.

:class:`JsonLinesLog` is a callable that :class:`~palisade_c.connection.Connection` and
:class:`~palisade_c.endpoint.ServerEndpoint` accept as ``event_log``. The events it receives
carry names, codes, epochs, counts and short fingerprint prefixes only (never keys, secrets or
plaintext: the core never puts them in an event), so the file is safe to ship to a log
collector. Each line is flushed as written, so a crash loses at most the line being written.

Every line carries ``time``, the wall-clock time as RFC 3339 UTC with milliseconds (for
correlating with other logs), beside the core's ``t``, the monotonic time the core was given
(for intervals within one process). The path ``-`` means standard output.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import UTC, datetime
from typing import IO, Any


def rfc3339_now() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonLinesLog:
    """Append events to ``path`` (or an open text stream), one JSON object per line."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 stream: IO[str] | None = None) -> None:
        if (path is None) == (stream is None):
            raise ValueError("give exactly one of path or stream")
        if stream is None and os.fspath(path) == "-":  # type: ignore[arg-type]
            stream, path = sys.stdout, None
            self._own = False
        else:
            self._own = stream is None
        if stream is None:
            assert path is not None
            # Line-buffered append: the log is read while the server runs (tail -f).
            stream = open(path, "a", encoding="utf-8", buffering=1)
        self._stream: IO[str] = stream
        self._lock = threading.Lock()
        self.lines = 0

    def __call__(self, event: dict[str, Any]) -> None:
        if "time" not in event:
            event = {"time": rfc3339_now(), **event}
        line = json.dumps(event, separators=(",", ":"), sort_keys=True, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._own:
                self._stream.close()
            else:
                self._stream.flush()

    def __enter__(self) -> JsonLinesLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
