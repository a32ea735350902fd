"""A deterministic in-memory link for sans-IO PALISADE peers, driven by a virtual clock.

Test helper, not part of the package. Any object with the sans-IO surface
(``receive_datagram``, ``datagrams_to_send``, ``get_timer``, ``handle_timer``, ``next_event``)
can be attached at an address: a client :class:`~palisade_c.connection.Connection`, a bare
server ``Connection`` or a :class:`~palisade_c.endpoint.ServerEndpoint`.

Every datagram a node emits is addressed (the ``addr`` of ``datagrams_to_send``) and delivered
to the node attached at that address, with the sender's address as source. On the way it may be

* rewritten or swallowed by a man-in-the-middle hook (``mitm``),
* duplicated (``duplicate`` probability; each copy has its own fate),
* lost (``loss`` probability, per copy; ``loss_to`` sets it per destination, for asymmetric
  paths; ``burst = (p, seconds)`` adds loss bursts: each datagram starts, with probability
  ``p``, an outage of the path to its destination lasting up to ``seconds`` (uniformly drawn),
  during which everything sent there is lost),
* delayed by a random amount in ``[min_delay, max_delay]`` (per copy), which reorders datagrams
  that leave close together.

All randomness comes from one ``random.Random(seed)``, and the clock only moves when the
simulator moves it: to the earliest of the next delivery, the next scheduled callback and the
earliest ``get_timer()`` of any node. So a run is a pure function of the seed and of the peers'
own (seedable) randomness. ``run`` is bounded in virtual time and in steps.

The simulator keeps two logs: ``emitted`` (what each node put on the wire, before the MITM and
loss) and ``delivered`` (what reached a node); the amplification tests measure both per address.
"""

from __future__ import annotations

import heapq
import random
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from palisade_c import hsrecord as hs
from palisade_c.config import Config
from palisade_c.connection import Connection
from palisade_c.endpoint import EndpointEvent, ServerEndpoint
from palisade_c.events import ConnectionClosed, DataReceived, Event

Addr = Any
#: (data, src, dst, now) -> replacement datagrams ([] swallows it), or None to pass it on as is.
MitmHook = Callable[[bytes, Addr, Addr, float], Iterable[bytes] | None]


class SansIOPeer(Protocol):
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None: ...
    def datagrams_to_send(self, now: float | None = None) -> list[tuple[bytes, Addr]]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def next_event(self) -> Any: ...


class SimulationError(AssertionError):
    """The simulation did not settle within its step budget (a livelock in the peers)."""


@dataclass(frozen=True)
class SimEvent:
    """One event a node reported, with the virtual time at which it was collected."""

    time: float
    node: str
    event: Event
    #: The session that raised it: the node itself for a Connection, the session for an
    #: endpoint's EndpointEvent.
    connection: Connection | None


@dataclass(frozen=True)
class WireEntry:
    time: float
    src: Addr
    dst: Addr
    data: bytes


@dataclass
class Node:
    name: str
    addr: Addr
    peer: SansIOPeer


@dataclass(order=True)
class _Delivery:
    time: float
    seq: int
    src: Addr = field(compare=False)
    dst: Addr = field(compare=False)
    data: bytes = field(compare=False)


@dataclass(order=True)
class _Callback:
    time: float
    seq: int
    fn: Callable[[float], None] = field(compare=False)


class SimLink:
    """See the module docstring."""

    def __init__(
        self,
        seed: int,
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        min_delay: float = 0.01,
        max_delay: float = 0.01,
        mitm: MitmHook | None = None,
        start: float = 0.0,
        loss_to: dict[Addr, float] | None = None,
        burst: tuple[float, float] | None = None,
    ) -> None:
        if not (0.0 <= loss < 1.0 and 0.0 <= duplicate < 1.0):
            raise ValueError("loss and duplicate are probabilities in [0, 1)")
        if loss_to is not None and not all(0.0 <= p < 1.0 for p in loss_to.values()):
            raise ValueError("loss_to holds probabilities in [0, 1)")
        if burst is not None and not (0.0 <= burst[0] < 1.0 and burst[1] > 0.0):
            raise ValueError("burst is (probability in [0, 1), positive seconds)")
        if not 0.0 <= min_delay <= max_delay:
            raise ValueError("need 0 <= min_delay <= max_delay")
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.mitm = mitm
        self.loss_to = dict(loss_to or {})
        self.burst = burst
        self._outage: dict[Addr, float] = {}  # destination -> end of its current burst
        self.now = start
        self.nodes: dict[str, Node] = {}
        self._by_addr: dict[Addr, Node] = {}
        self._queue: list[_Delivery] = []
        self._callbacks: list[_Callback] = []
        self._seq = 0
        self._timers: dict[str, float] = {}
        self.events: list[SimEvent] = []
        self.emitted: list[WireEntry] = []
        self.delivered: list[WireEntry] = []
        self.lost = 0
        self.duplicated = 0
        self.event_handlers: list[Callable[[SimEvent], None]] = []
        self.step_hooks: list[Callable[[float], None]] = []

    # -- wiring ----------------------------------------------------------------------------------

    def add(self, name: str, addr: Addr, peer: SansIOPeer) -> Node:
        if name in self.nodes or addr in self._by_addr:
            raise ValueError(f"node {name!r} or address {addr!r} already attached")
        node = Node(name, addr, peer)
        self.nodes[name] = node
        self._by_addr[addr] = node
        return node

    def on_event(self, handler: Callable[[SimEvent], None]) -> None:
        """Call ``handler`` for every event as it is collected (it may send data)."""
        self.event_handlers.append(handler)

    def on_step(self, hook: Callable[[float], None]) -> None:
        """Call ``hook(now)`` after every step of the simulation (to sample state)."""
        self.step_hooks.append(hook)

    def schedule(self, at: float, fn: Callable[[float], None]) -> None:
        """Run ``fn(now)`` at virtual time ``at`` (an application timer)."""
        self._seq += 1
        heapq.heappush(self._callbacks, _Callback(at, self._seq, fn))

    def inject(self, data: bytes, src: Addr, dst: Addr, delay: float = 0.0) -> None:
        """Put a datagram on the wire as if ``src`` had sent it: no MITM, no loss."""
        self._push(data, src, dst, self.now + delay)

    # -- introspection ---------------------------------------------------------------------------

    def bytes_emitted(self, src: Addr, dst: Addr | None = None) -> int:
        return sum(len(e.data) for e in self.emitted
                   if e.src == src and (dst is None or e.dst == dst))

    def bytes_delivered(self, src: Addr | None, dst: Addr) -> int:
        return sum(len(e.data) for e in self.delivered
                   if e.dst == dst and (src is None or e.src == src))

    @property
    def pending_callbacks(self) -> int:
        return len(self._callbacks)

    def events_of(self, node: str, kind: type[Event] | None = None) -> list[SimEvent]:
        return [e for e in self.events
                if e.node == node and (kind is None or isinstance(e.event, kind))]

    def closes(self, node: str) -> list[ConnectionClosed]:
        """The ConnectionClosed events ``node`` reported (all of an endpoint's sessions)."""
        return [e.event for e in self.events
                if e.node == node and isinstance(e.event, ConnectionClosed)]

    def data_received(self, node: str, since: int = 0) -> list[bytes]:
        """Payloads of the DataReceived events ``node`` reported (from event index ``since``)."""
        return [e.event.data for e in self.events[since:]
                if e.node == node and isinstance(e.event, DataReceived)]

    # -- the loop --------------------------------------------------------------------------------

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        duration: float = 30.0,
        max_steps: int = 200_000,
    ) -> list[SimEvent]:
        """Advance virtual time until ``until()`` holds, nothing is left to do, or ``duration``
        seconds of virtual time have passed. Returns the events collected during this run."""
        first = len(self.events)
        deadline = self.now + duration
        for _ in range(max_steps):
            self._settle()
            if until is not None and until():
                return self.events[first:]
            t = self._next_time()
            if t is None:
                return self.events[first:]
            if t > deadline:
                self.now = deadline
                return self.events[first:]
            self.now = max(self.now, t)
            self._step()
            for hook in self.step_hooks:
                hook(self.now)
        raise SimulationError(f"no quiescence after {max_steps} steps (t={self.now:.3f})")

    def _next_time(self) -> float | None:
        times: list[float] = []
        if self._queue:
            times.append(self._queue[0].time)
        if self._callbacks:
            times.append(self._callbacks[0].time)
        self._timers = {}
        for name, node in self.nodes.items():
            t = node.peer.get_timer()
            if t is not None:
                self._timers[name] = t
                times.append(t)
        return min(times) if times else None

    def _step(self) -> None:
        now = self.now
        touched: set[str] = set()
        while self._queue and self._queue[0].time <= now:
            d = heapq.heappop(self._queue)
            node = self._by_addr.get(d.dst)
            if node is None:
                continue  # nobody listens there
            self.delivered.append(WireEntry(now, d.src, d.dst, d.data))
            node.peer.receive_datagram(d.data, d.src, now)
            touched.add(node.name)
        ran_callback = False
        while self._callbacks and self._callbacks[0].time <= now:
            cb = heapq.heappop(self._callbacks)
            cb.fn(now)
            ran_callback = True
        # Timers polled by _next_time are still valid for nodes nothing happened to since.
        for name, node in self.nodes.items():
            if ran_callback or name in touched:
                t = node.peer.get_timer()
            else:
                t = self._timers.get(name)
            if t is not None and t <= now:
                node.peer.handle_timer(now)

    def _settle(self) -> None:
        """Move everything the nodes queued onto the wire and collect their events, until an
        event handler no longer produces anything new."""
        for _ in range(1000):
            moved = False
            for node in self.nodes.values():
                for data, dst in node.peer.datagrams_to_send(self.now):
                    moved = True
                    self._transmit(node, data, dst)
                while (ev := node.peer.next_event()) is not None:
                    moved = True
                    if isinstance(ev, EndpointEvent):
                        sim_ev = SimEvent(self.now, node.name, ev.event, ev.connection)
                    else:
                        conn = node.peer if isinstance(node.peer, Connection) else None
                        sim_ev = SimEvent(self.now, node.name, ev, conn)
                    self.events.append(sim_ev)
                    for handler in self.event_handlers:
                        handler(sim_ev)
            if not moved:
                return
        raise SimulationError("event handlers keep producing output")

    def _transmit(self, node: Node, data: bytes, dst: Addr) -> None:
        src = node.addr
        self.emitted.append(WireEntry(self.now, src, dst, data))
        out: Iterable[bytes] = [data]
        if self.mitm is not None:
            replaced = self.mitm(data, src, dst, self.now)
            if replaced is not None:
                out = replaced
        for datagram in out:
            copies = 1
            if self.duplicate and self.rng.random() < self.duplicate:
                copies = 2
                self.duplicated += 1
            for _ in range(copies):
                if self._lose(dst):
                    self.lost += 1
                    continue
                delay = self.rng.uniform(self.min_delay, self.max_delay)
                self._push(datagram, src, dst, self.now + delay)

    def _lose(self, dst: Addr) -> bool:
        # Random numbers are drawn only for the features in use, so runs without bursts or
        # per-destination loss replay exactly as before these existed.
        if self.burst is not None:
            if self.now < self._outage.get(dst, 0.0):
                return True
            if self.rng.random() < self.burst[0]:
                self._outage[dst] = self.now + self.rng.uniform(0.0, self.burst[1])
                return True
        loss = self.loss_to.get(dst, self.loss) if self.loss_to else self.loss
        return bool(loss) and self.rng.random() < loss

    def _push(self, data: bytes, src: Addr, dst: Addr, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._queue, _Delivery(at, self._seq, src, dst, bytes(data)))


# -- handshake-aware helpers -------------------------------------------------------------------


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic ``Config.rng`` (nonces, RIDs, timer jitter, cookie secrets)."""
    return random.Random(seed).randbytes


def is_handshake(data: bytes) -> bool:
    return data[:2] == b"QH"


def hs_type(data: bytes) -> int | None:
    """The msg_type of a handshake datagram, None for anything else."""
    return hs.decode(data).msg_type if is_handshake(data) else None


def closed_events(pair: Pair, conn: Connection) -> list[ConnectionClosed]:
    """The ConnectionClosed events one session of the pair reported."""
    return [e.event for e in pair.link.events
            if e.connection is conn and isinstance(e.event, ConnectionClosed)]


def free_udp_port() -> int:
    """A loopback UDP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def record_rid(data: bytes) -> bytes:
    """The RID at bytes 6..30 (the same offset in handshake records and encrypted packets)."""
    return bytes(data[6:30])


class HandshakeMitm:
    """A man-in-the-middle hook that rewrites whole handshake messages.

    It passively reassembles every handshake message crossing the link (``seen`` keeps the
    first complete original of each msg_type). For each msg_type in ``rewrites`` it holds that
    message's fragments until it has all of them, passes the message through
    ``rewrites[msg_type](message, self)``, and forwards the result re-fragmented under the same
    RID and msg_seq. Later copies of the original (retransmissions) are swallowed, so the
    receiver only ever sees the rewritten version; ``forwarded`` keeps what was sent instead.
    """

    def __init__(
        self,
        rewrites: dict[int, Callable[[bytes, HandshakeMitm], bytes]],
        max_datagram: int = 1200,
    ) -> None:
        self.rewrites = rewrites
        self.max_datagram = max_datagram
        self.seen: dict[int, bytes] = {}
        self.forwarded: dict[int, bytes] = {}
        self._parts: dict[tuple[int, bytes, int], dict[int, bytes]] = {}

    def __call__(self, data: bytes, src: Addr, dst: Addr, now: float) -> Iterable[bytes] | None:
        if not is_handshake(data):
            return None
        try:
            rec = hs.decode(data)
        except ValueError:
            return None
        t = rec.msg_type
        if not 1 <= t <= 6:
            return None  # acks, errors and retries pass untouched
        if t in self.rewrites and t in self.forwarded:
            return []
        key = (t, rec.rid, rec.msg_seq)
        parts = self._parts.setdefault(key, {})
        parts[rec.frag_offset] = rec.fragment
        message = self._assemble(parts, rec.msg_length)
        if message is not None:
            self.seen.setdefault(t, message)
        if t not in self.rewrites:
            return None
        if message is None:
            return []  # hold the fragments until the whole message is here
        new = self.rewrites[t](message, self)
        self.forwarded[t] = new
        return hs.fragment_message(t, rec.rid, rec.msg_seq, new, self.max_datagram)

    @staticmethod
    def _assemble(parts: dict[int, bytes], length: int) -> bytes | None:
        buf = bytearray(length)
        covered = 0
        for offset in sorted(parts):
            frag = parts[offset]
            if offset > covered:
                return None
            buf[offset:offset + len(frag)] = frag
            covered = max(covered, offset + len(frag))
        return bytes(buf) if covered >= length else None


# -- a client and a server endpoint on one link ------------------------------------------------

CLIENT_ADDR: tuple[str, int] = ("10.0.0.2", 50000)
SERVER_ADDR: tuple[str, int] = ("10.0.0.1", 4433)


@dataclass
class Pair:
    """A client Connection and a ServerEndpoint attached to one SimLink, with both sides'
    structured event logs (``Connection(event_log=...)``) in ``log``."""

    link: SimLink
    client: Connection
    server: ServerEndpoint
    log: list[dict[str, Any]]

    def connect(self) -> None:
        self.client.connect(SERVER_ADDR, self.link.now)

    def run(self, until: Callable[[], bool] | None = None, duration: float = 30.0
            ) -> list[SimEvent]:
        return self.link.run(until, duration=duration)

    def handshake(self, duration: float = 30.0) -> Connection:
        """Connect and run until both sides are established; return the server's session."""
        self.connect()
        self.run(lambda: self.client.established
                 and any(c.established for c in self.server.connections), duration)
        session = self.session()
        assert self.client.established and session is not None and session.established, (
            self.client.state, [c.state for c in self.sessions()])
        return session

    def sessions(self) -> list[Connection]:
        """Every session the endpoint ever reported or still holds (closed ones included)."""
        seen: dict[int, Connection] = {}
        for ev in self.link.events:
            if ev.node == "server" and ev.connection is not None:
                seen.setdefault(id(ev.connection), ev.connection)
        for conn in self.server.connections:
            seen.setdefault(id(conn), conn)
        return list(seen.values())

    def session(self) -> Connection | None:
        sessions = self.sessions()
        return sessions[0] if sessions else None

    def transitions(self, conn_name: str) -> list[tuple[str, str, str]]:
        return [(e["old"], e["event"], e["new"]) for e in self.log
                if e["kind"] == "transition" and e["conn"] == conn_name]


def make_pair(
    client_config: Config,
    server_config: Config,
    *,
    seed: int = 0,
    loss: float = 0.0,
    duplicate: float = 0.0,
    min_delay: float = 0.01,
    max_delay: float = 0.01,
    mitm: MitmHook | None = None,
    loss_to: dict[Addr, float] | None = None,
    burst: tuple[float, float] | None = None,
) -> Pair:
    log: list[dict[str, Any]] = []
    link = SimLink(seed, loss=loss, duplicate=duplicate, min_delay=min_delay,
                   max_delay=max_delay, mitm=mitm, loss_to=loss_to, burst=burst)
    client = Connection(client_config, True, event_log=log.append, name="client")
    server = ServerEndpoint(server_config, event_log=log.append)
    link.add("client", CLIENT_ADDR, client)
    link.add("server", SERVER_ADDR, server)
    return Pair(link, client, server, log)
