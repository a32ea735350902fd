"""Server-issued RIDs that load balancers can route on (docs/protocol.md §3.3, [profile]).

A RID is ``steering_prefix[8] ‖ rotation_epoch u16 ‖ tail[14]``. The steering prefix stays the
node id (the serial gateway routes on it); a server that runs behind a load balancer, or as
several worker processes, writes its routing fields into the tail of every session RID it
issues, in the manner of QUIC-LB's plaintext mode::

    tail[0]     config id (high 3 bits; 7 = "not issued under a layout") | 5 random bits
    tail[1:3]   host id   (u16, big-endian): which host of a fleet
    tail[3]     worker id (u8): which worker process on that host
    tail[4:7]   3 random bytes, fresh per session
    tail[7:14]  check bytes over the client's hello RID (palisade_c.connection.session_rid;
                docs/protocol.md §8.4), which replace the rest of what ``tail`` draws

Routing is a pure function of the RID, so every datagram that carries one RID reaches the same
place. A client's first-flight RID is random, so the same function spreads new ClientHellos
(and their fragments, retransmissions and 0-RTT packets, which share that RID) uniformly; a RID
the server issued decodes to the worker and host that hold the session. No key is needed.

Unlinkability: the fields an observer can read are the same for every session on a worker,
and the 29 random bits and 56 check bits (a hash over the client's random hello RID) are fresh
for each session, so two sessions of one client on one worker look exactly like two sessions
of two clients. What the fields reveal (which host and worker)
is no more than the server's address already tells.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from palisade_c.errors import ConfigError

#: Offsets inside a RID (the RID itself sits at bytes 6..30 of every datagram).
RID_OFFSET_IN_DATAGRAM = 6
TAIL_OFFSET = 10
FIRST_OCTET = TAIL_OFFSET
HOST_ID_OFFSET = TAIL_OFFSET + 1
WORKER_ID_OFFSET = TAIL_OFFSET + 3
NONCE_LEN = 10
CONFIG_ID_UNROUTABLE = 7
MAX_WORKERS = 256

#: ``SO_ATTACH_REUSEPORT_CBPF`` (asm-generic/socket.h; Python does not export it).
SO_ATTACH_REUSEPORT_CBPF = 51


@dataclass(frozen=True)
class RidLayout:
    """The routing fields this server writes into the tail of the session RIDs it issues."""

    config_id: int = 0
    host_id: int = 0
    worker_id: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.config_id < CONFIG_ID_UNROUTABLE:
            raise ConfigError("RID config id must be 0..6 (7 marks an unrouted RID)")
        if not 0 <= self.host_id <= 0xFFFF:
            raise ConfigError("RID host id must be 0..65535")
        if not 0 <= self.worker_id < MAX_WORKERS:
            raise ConfigError("RID worker id must be 0..255")

    def tail(self, rng: Callable[[int], bytes]) -> bytes:
        """The 14 bytes after the rotation epoch of a new session RID."""
        r = rng(1 + NONCE_LEN)
        first = (self.config_id << 5) | (r[0] & 0x1F)
        return (bytes((first,)) + self.host_id.to_bytes(2, "big") + bytes((self.worker_id,))
                + r[1:])


def decode(rid: bytes) -> tuple[int, int, int]:
    """``(config_id, host_id, worker_id)`` as written by :class:`RidLayout` (for a RID the
    client chose these are random: route it with :func:`host_for` / :func:`worker_for`)."""
    if len(rid) != 24:
        raise ValueError("a RID is 24 bytes")
    return (rid[FIRST_OCTET] >> 5, int.from_bytes(rid[HOST_ID_OFFSET:HOST_ID_OFFSET + 2], "big"),
            rid[WORKER_ID_OFFSET])


def worker_for(rid: bytes, workers: int) -> int:
    """The worker (of ``workers``) that receives datagrams carrying ``rid``: exactly what the
    kernel program of :func:`steering_program` computes."""
    return rid[WORKER_ID_OFFSET] % workers


def host_for(rid: bytes, hosts: int, config_id: int = 0) -> int:
    """A stateless load balancer's choice among ``hosts`` hosts numbered 0..hosts-1: the host
    id of a RID issued under ``config_id``, else a hash of the RID (first flights)."""
    cid, host, _worker = decode(rid)
    if cid == config_id and host < hosts:
        return host
    return int.from_bytes(rid[TAIL_OFFSET:], "big") % hosts


# -- in-kernel steering among worker processes (Linux SO_REUSEPORT) -------------------------------

_BPF_LD_B_ABS = 0x00 | 0x10 | 0x20
_BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00
_BPF_RET_A = 0x06 | 0x10


def steering_program(workers: int) -> bytes:
    """Classic BPF, run by the kernel on each datagram's UDP payload: return the worker id
    byte of the RID modulo ``workers`` as the index of the socket in the reuseport group. A
    datagram too short to hold a RID aborts the program, which selects socket 0 (it would be
    dropped by any worker)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be 1..{MAX_WORKERS}")
    insns = [
        (_BPF_LD_B_ABS, 0, 0, RID_OFFSET_IN_DATAGRAM + WORKER_ID_OFFSET),
        (_BPF_ALU_MOD_K, 0, 0, workers),
        (_BPF_RET_A, 0, 0, 0),
    ]
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach :func:`steering_program` to ``sock``'s reuseport group (any member will do).
    Raises OSError where the kernel lacks SO_ATTACH_REUSEPORT_CBPF (Linux < 4.5, not Linux)."""
    prog = steering_program(workers)
    buf = ctypes.create_string_buffer(prog, len(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native layout.
    fprog = struct.pack("@HP", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class SteeringUnavailable(OSError):
    """The kernel cannot steer datagrams among worker sockets (no SO_REUSEPORT, or no
    SO_ATTACH_REUSEPORT_CBPF: Linux before 4.5, other systems)."""


def reuseport_group(host: str, port: int, workers: int) -> list[socket.socket]:
    """``workers`` UDP sockets sharing ``host:port``, bound in order so that socket *i* is
    index *i* of the group, with the steering program attached. The caller keeps every socket
    open for as long as the group serves: closing one would renumber the others and send
    sessions to the wrong worker. Raises :class:`SteeringUnavailable` when the kernel cannot
    steer, and OSError when the address cannot be bound."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise SteeringUnavailable("SO_REUSEPORT is not available on this platform")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    socks: list[socket.socket] = []
    try:
        for i in range(workers):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except OSError as exc:
                raise SteeringUnavailable(f"SO_REUSEPORT refused: {exc}") from exc
            s.bind(addr if i == 0 else socks[0].getsockname())
            if i == 0:
                addr = s.getsockname()  # port 0: every member takes the port the first got
        try:
            attach_steering(socks[0], workers)
        except OSError as exc:
            raise SteeringUnavailable(f"SO_ATTACH_REUSEPORT_CBPF refused: {exc}") from exc
        for s in socks:
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
