"""The firmware side of palisade-c's serial links: the portable C99 link codec in
``firmware_bridge/c/`` (compiled into :mod:`palisade_c.link`, and copied into device firmware)
and ``firmware_bridge/LINK.md``, which specifies the link for firmware authors.

The Python side lives in palisade_c, which never imports this package:

* :mod:`palisade_c.transport.serial`: the serial transport, beside UDP in the transport layer;
* :mod:`palisade_c.gateway`: the UDP-to-serial relay;
* :mod:`palisade_c.transport.pty`: a virtual serial line for tests and ``palisade demo``;
* :mod:`palisade_c.progress`: handshake progress on slow links.

``firmware_bridge.serial_link``, ``.gateway``, ``.pty_link`` and ``.progress`` remain as
aliases of those modules for existing code.
"""

from __future__ import annotations

__all__ = ["gateway", "progress", "pty_link", "serial_link"]
