"""Helpers shared by the benchmark scripts (each script runs as a plain file, with bench/ as
the first entry of sys.path, so this imports as ``_timing``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def rate(fn: Callable[[], None], per_call: int, seconds: float) -> float:
    """Calls ``fn`` repeatedly for about ``seconds``; returns operations per second."""
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls * per_call / (now - start)


def best_rates(workloads: dict[str, Callable[[], None]], per_call: int, seconds: float,
               rounds: int) -> dict[str, float]:
    """Operations per second of each workload, the best of ``rounds``; the workloads take
    turns within each round, so a burst of load from a neighbour hits them alike."""
    best = dict.fromkeys(workloads, 0.0)
    for _ in range(rounds):
        for name, fn in workloads.items():
            best[name] = max(best[name], rate(fn, per_call, seconds))
    return best


def mean_per_op(fn: Callable[[], None], seconds: float) -> float:
    """Seconds per call, averaged over a window of ``seconds``.

    A mean over hundreds of calls, not a minimum of small batches: ML-DSA signing time varies
    a lot from call to call (rejection sampling), and a minimum would reward lucky draws.
    """
    return 1.0 / rate(fn, 1, seconds)


def pump(client: Any, server: Any) -> None:
    """Move datagrams between two in-memory sans-IO peers until both are quiet."""
    moved = True
    while moved:
        moved = False
        for data, _ in client.datagrams_to_send(0.0):
            server.receive_datagram(data, ("client", 2), 0.0)
            moved = True
        for data, _ in server.datagrams_to_send(0.0):
            client.receive_datagram(data, ("server", 1), 0.0)
            moved = True


def paired_ratio(numerator: Callable[[], None], denominator: Callable[[], None],
                 seconds: float, batch: int = 4) -> tuple[float, float, float]:
    """``(ratio, numerator s/op, denominator s/op)`` from finely interleaved batches.

    The two workloads alternate every ``batch`` calls for about ``seconds`` in total, so a
    burst of load from a neighbour on this shared machine slows both sides alike instead of
    landing on one block of measurements; the ratio is the ratio of the summed times.
    """
    num_t = den_t = 0.0
    calls = 0
    clock = time.perf_counter
    deadline = clock() + seconds
    while True:
        t0 = clock()
        for _ in range(batch):
            numerator()
        t1 = clock()
        for _ in range(batch):
            denominator()
        t2 = clock()
        num_t += t1 - t0
        den_t += t2 - t1
        calls += batch
        if t2 >= deadline:
            return num_t / den_t, num_t / calls, den_t / calls
