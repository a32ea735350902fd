"""A seeded UDP middlebox for tests that run real processes: loss, duplication, reordering.

Test helper, not part of the package. It listens on a loopback port, relays every datagram
from its (single) client to ``target`` and every answer back, and on the way may

* drop a datagram (``loss``, or ``loss_up`` / ``loss_down`` per direction: up is towards the
  target),
* send it twice (``duplicate``),
* hold it back for a random delay in ``[0, max_delay]`` (``reorder`` probability), so later
  datagrams overtake it,
* let only the first ``pass_down`` datagrams through towards the client (a path that dies
  halfway through the server's reply),
* drop exactly the datagrams numbered in ``drop_up`` / ``drop_down`` (1-based, counted per
  direction), to force one schedule regardless of timing.

With ``only_prefix`` set (``b"QH"``: handshake records), only datagrams starting with it suffer
any of this; the rest pass untouched, so a test of the handshake can also count on its data.

Every decision comes from one ``random.Random(seed)``, in the order datagrams arrive. The relay
runs in a daemon thread around one ``selectors`` loop; ``with Middlebox(...) as box`` starts and
stops it. Run as a script (``python tests/middlebox.py LISTEN_PORT TARGET_PORT --loss 0.2``) it
relays until interrupted and prints its counters.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import selectors
import socket
import threading
import time
from collections import Counter
from types import TracebackType

Addr = tuple[str, int]


class Middlebox:
    """See the module docstring."""

    def __init__(
        self,
        target: Addr,
        *,
        seed: int = 0,
        loss: float = 0.0,
        loss_up: float | None = None,
        loss_down: float | None = None,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        max_delay: float = 0.05,
        pass_down: int | None = None,
        only_prefix: bytes | None = None,
        drop_up: frozenset[int] = frozenset(),
        drop_down: frozenset[int] = frozenset(),
        listen_port: int = 0,
    ) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.loss_up = loss if loss_up is None else loss_up
        self.loss_down = loss if loss_down is None else loss_down
        self.duplicate = duplicate
        self.reorder = reorder
        self.max_delay = max_delay
        self.pass_down = pass_down
        self.only_prefix = only_prefix
        self.drop = {True: frozenset(drop_up), False: frozenset(drop_down)}
        self._number = {True: 0, False: 0}  # datagrams seen per direction (the affected ones)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", listen_port))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.port: int = self.front.getsockname()[1]
        self.client: Addr | None = None
        self.counters: Counter[str] = Counter()
        self._held: list[tuple[float, int, bytes, bool]] = []  # (due, seq, data, upwards)
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="middlebox", daemon=True)

    @property
    def url(self) -> str:
        return f"udp://127.0.0.1:{self.port}"

    def start(self) -> Middlebox:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.front.close()
        self.back.close()

    def __enter__(self) -> Middlebox:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the relay ---------------------------------------------------------------------------

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.front, selectors.EVENT_READ, True)
            sel.register(self.back, selectors.EVENT_READ, False)
            while not self._stop.is_set():
                timeout = 0.05
                if self._held:
                    timeout = max(0.0, min(timeout, self._held[0][0] - time.monotonic()))
                for key, _ in sel.select(timeout):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data, addr = sock.recvfrom(65535)
                    except OSError:
                        continue
                    if key.data:
                        self.client = addr
                    self._on_datagram(data, upwards=bool(key.data))
                now = time.monotonic()
                while self._held and self._held[0][0] <= now:
                    _, _, data, upwards = heapq.heappop(self._held)
                    self._emit(data, upwards)

    def _on_datagram(self, data: bytes, upwards: bool) -> None:
        direction = "up" if upwards else "down"
        self.counters[f"{direction}-in"] += 1
        if self.only_prefix is not None and not data.startswith(self.only_prefix):
            self._emit(data, upwards)
            return
        self._number[upwards] += 1
        number = self._number[upwards]
        if number in self.drop[upwards]:
            self.counters[f"{direction}-dropped"] += 1
            return
        if not upwards and self.pass_down is not None and number > self.pass_down:
            self.counters["down-cut"] += 1
            return
        copies = 2 if self.duplicate and self.rng.random() < self.duplicate else 1
        if copies == 2:
            self.counters[f"{direction}-duplicated"] += 1
        loss = self.loss_up if upwards else self.loss_down
        for _ in range(copies):
            if loss and self.rng.random() < loss:
                self.counters[f"{direction}-lost"] += 1
                continue
            if self.reorder and self.rng.random() < self.reorder:
                self.counters[f"{direction}-delayed"] += 1
                self._seq += 1
                due = time.monotonic() + self.rng.uniform(0.0, self.max_delay)
                heapq.heappush(self._held, (due, self._seq, data, upwards))
                continue
            self._emit(data, upwards)

    def _emit(self, data: bytes, upwards: bool) -> None:
        try:
            if upwards:
                self.back.sendto(data, self.target)
            elif self.client is not None:
                self.front.sendto(data, self.client)
            else:
                return
        except OSError:
            self.counters["send-error"] += 1
            return
        self.counters["up-out" if upwards else "down-out"] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description="seeded lossy UDP relay on 127.0.0.1")
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target_port", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--reorder", type=float, default=0.0)
    args = parser.parse_args()
    box = Middlebox(("127.0.0.1", args.target_port), seed=args.seed, loss=args.loss,
                    duplicate=args.duplicate, reorder=args.reorder,
                    listen_port=args.listen_port)
    with box:
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print(json.dumps(dict(box.counters)))


if __name__ == "__main__":
    main()
