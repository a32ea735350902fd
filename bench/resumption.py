"""Resumption handshake CPU against full handshake CPU, in one process.

Run: ``python bench/resumption.py`` (``--seconds`` per measurement, ``--rounds``).

Both handshakes run in memory through the real Connection and ServerEndpoint objects, both
sides included. A full handshake costs two ML-DSA signatures and verifications on top of the
double ML-KEM exchange; a resumption replaces them with HMACs under the ticket's PSK and keeps
the fresh double KEM. Each resumption spends the ticket the previous one was issued (tickets
are single use), exactly as a reconnecting client would.
"""

from __future__ import annotations

import argparse

from _timing import paired_ratio as _paired_ratio
from _timing import pump as _pump

from palisade_c.config import PLUS_RESUMPTION, Config
from palisade_c.connection import Connection
from palisade_c.endpoint import ServerEndpoint
from palisade_c.events import NewTicket
from palisade_c.identity import Identity
from palisade_c.tickets import ClientTicket


def _handshake(client_cfg: Config, server: ServerEndpoint,
               ticket: ClientTicket | None) -> ClientTicket:
    client = Connection(client_cfg, True)
    client.connect(("server", 1), 0.0, ticket=ticket)
    _pump(client, server)
    if not client.established or (ticket is not None and not client.resumed):
        raise RuntimeError("benchmark handshake did not complete as intended")
    fresh = None
    while (ev := client.next_event()) is not None:
        if isinstance(ev, NewTicket):
            fresh = ev.ticket
    while server.next_event() is not None:
        pass
    if fresh is None:
        raise RuntimeError("no ticket issued")
    return fresh


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="resumption vs full handshake CPU")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    cid, sid = Identity.generate(), Identity.generate()
    client_cfg = Config(identity=cid, trusted_peers=[sid.public_key],
                        plus_features=PLUS_RESUMPTION)
    server_cfg = Config(identity=sid, trusted_peers=[cid.public_key],
                        plus_features=PLUS_RESUMPTION)
    rounds: list[tuple[float, float, float]] = []
    for _ in range(args.rounds):
        # A fresh server endpoint per round (sessions accumulate in it), with its own ticket
        # keys, so each round starts from a ticket that a full handshake just earned.
        server = ServerEndpoint(server_cfg)
        state = {"ticket": _handshake(client_cfg, server, None)}

        def full(server: ServerEndpoint = server) -> None:
            _handshake(client_cfg, server, None)

        def resumed(server: ServerEndpoint = server,
                    state: dict[str, ClientTicket] = state) -> None:
            state["ticket"] = _handshake(client_cfg, server, state["ticket"])

        rounds.append(_paired_ratio(resumed, full, args.seconds))
    ratio, res_t, full_t = sorted(rounds)[len(rounds) // 2]  # the median round
    print("in-memory handshakes, both sides, same process, finely interleaved; "
          f"median of {args.rounds} rounds")
    print(f"  full handshake:    {full_t * 1e3:7.3f} ms")
    print(f"  resumption:        {res_t * 1e3:7.3f} ms")
    print(f"  ratio resumption / full: {ratio:.3f}  (target <= 0.35)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
