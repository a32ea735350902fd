"""Peer-chosen text made safe to log or print.

ErrorResponse details, CTRL_CLOSE reasons and a device's log lines are written by the peer. Put
into a log line or a terminal as they are, a newline forges a second log line and an escape
sequence rewrites the terminal. :func:`printable` escapes every character Python does not call
printable (C0 and C1 controls, DEL, line and paragraph separators, bidirectional overrides and
other format characters) the way ``repr`` spells it, and leaves the rest alone. Its output is
printable, so escaping twice changes nothing: each layer (core log, exception message, CLI)
may escape without knowing whether another already did.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, limit: int | None = None) -> str:
    """``text`` on one line, control and format characters escaped; cut to ``limit``
    characters (before escaping) when given."""
    if limit is not None:
        text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
