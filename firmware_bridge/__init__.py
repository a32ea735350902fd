"""The serial side of palisade-c: PALISADE over UART/USB-CDC links to constrained devices.

* :mod:`firmware_bridge.serial_link`: the serial transport (framing from the shared C codec in
  ``firmware_bridge/c/``, exposed as :mod:`palisade_c.link`), used by ``palisade connect`` and
  ``palisade serve`` for ``serial://`` URLs.
* :mod:`firmware_bridge.gateway`: relays PALISADE datagrams between UDP peers and serial
  devices by the RID steering prefix, without holding any session key.
* :mod:`firmware_bridge.pty_link`: a virtual serial line (two pseudo-terminals joined by a pump
  paced to a baud rate, optionally noisy), for tests and ``palisade demo``.
* :mod:`firmware_bridge.progress`: handshake progress on slow links.

``firmware_bridge/LINK.md`` specifies the link for firmware authors.
"""

from __future__ import annotations

__all__ = ["gateway", "progress", "pty_link", "serial_link"]
