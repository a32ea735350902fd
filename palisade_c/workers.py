"""``palisade serve --workers N``: N worker processes behind one UDP port (docs/architecture.md).

Theory of operation
-------------------
The supervisor (this module, in the process the user started) binds N UDP sockets to the port
with ``SO_REUSEPORT``, in order, so that socket *i* is member *i* of the kernel's reuseport
group, and attaches the classic BPF program of :func:`palisade_c.ridlayout.steering_program`
to the group. The kernel then hands each datagram to the socket whose index is the worker id
byte of its RID modulo N. Worker *i* is ``palisade serve`` run again with socket *i* inherited
(``--worker-fd``); it writes *i* into the worker id field of every session RID it issues
(:class:`palisade_c.ridlayout.RidLayout`), so every later packet of its sessions, from any
address (migration), comes back to it. New ClientHellos carry a random RID and are spread
evenly by the same program.

The supervisor keeps its copies of the N sockets open for as long as it runs: a worker that
dies and closes its socket does not renumber the group (which would misroute every session),
and its replacement inherits the same socket and index. Datagrams for a worker being
restarted wait in its socket's buffer.

What must be shared among workers is shared through files and the store, never through the
supervisor: the ticket key ring (``--ticket-key``, a private temporary one when not given) and
the used-ticket store (``--ticket-db`` / ``--ticket-store``, a private temporary SQLite file
when neither is given). The Retry cookie key is drawn by the supervisor and handed to each
worker on its standard input (never on a command line or in the environment).

Where the kernel cannot steer (no ``SO_REUSEPORT``, or no ``SO_ATTACH_REUSEPORT_CBPF``: Linux
before 4.5, other systems) the supervisor says so and the caller serves with one process:
plain ``SO_REUSEPORT`` without the program would spread one session's packets over workers
that do not hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from palisade_c.ridlayout import SteeringUnavailable, reuseport_group

log = logging.getLogger("palisade_c.workers")

#: A worker that exits within this many seconds of starting is crashing, not dying once.
CRASH_WINDOW = 5.0
MAX_QUICK_RESTARTS = 3
STOP_GRACE = 10.0


def open_group(host: str, port: int, workers: int) -> list[socket.socket] | None:
    """The worker sockets, or None (after saying why on stderr) when the kernel cannot steer."""
    try:
        return reuseport_group(host, port, workers)
    except SteeringUnavailable as exc:  # a bind error is not: the caller reports it
        print(f"palisade: --workers {workers} needs SO_REUSEPORT with a classic BPF steering "
              f"program (Linux 4.5 or later), unavailable here ({exc}); "
              f"serving with one worker", file=sys.stderr, flush=True)
        return None


def die_with_parent() -> None:
    """In a worker: be sent SIGTERM when the supervisor dies, however it dies (Linux
    PR_SET_PDEATHSIG), so no worker serves on without the process that keeps the group's
    numbering intact."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before the call: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Starts, watches and stops the worker processes of one reuseport group."""

    def __init__(self, socks: list[socket.socket], argv: list[str], *, plus: bool,
                 has_ticket_key: bool, has_store: bool) -> None:
        self.socks = socks
        self.n = len(socks)
        self._argv = list(argv)
        self._secret = os.urandom(32)
        self._tmp: str | None = None
        self._extra: list[str] = []
        if plus and not (has_ticket_key and has_store):
            # Workers must open each other's tickets and share one single-use store.
            self._tmp = tempfile.mkdtemp(prefix="palisade-workers-")
            if not has_ticket_key:
                self._extra += ["--ticket-key", os.path.join(self._tmp, "ticket.keys")]
            if not has_store:
                self._extra += ["--ticket-db", os.path.join(self._tmp, "used.sqlite")]
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.n
        self._ready = [asyncio.Event() for _ in range(self.n)]
        self._listening_line = ""
        self._stopping = False
        self._failed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def _command(self, i: int) -> list[str]:
        return [sys.executable, "-m", "palisade_c", *self._argv,
                "--worker-fd", str(self.socks[i].fileno()), "--worker-index", str(i),
                *self._extra]

    async def _start(self, i: int) -> asyncio.subprocess.Process:
        self._ready[i].clear()
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which stops the
        # workers in order instead of racing their exits against a restart.
        proc = await asyncio.create_subprocess_exec(
            *self._command(i), pass_fds=(self.socks[i].fileno(),),
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert proc.stdin is not None
        proc.stdin.write(self._secret.hex().encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        self.procs[i] = proc
        task = asyncio.create_task(self._relay_stderr(i, proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proc

    async def _relay_stderr(self, i: int, proc: asyncio.subprocess.Process) -> None:
        """Pass a worker's messages on, tagged with its index; note when it listens."""
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("palisade: listening on") and not self._ready[i].is_set():
                self._listening_line = line
                self._ready[i].set()
                continue
            print(f"[worker {i}] {line}", file=sys.stderr, flush=True)

    async def _watch(self, i: int, stop: asyncio.Event) -> None:
        quick = 0
        while True:
            proc = self.procs[i]
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            quick = quick + 1 if time.monotonic() - started < CRASH_WINDOW else 0
            if quick >= MAX_QUICK_RESTARTS:
                print(f"palisade: worker {i} keeps exiting (status {code}); stopping",
                      file=sys.stderr, flush=True)
                self._failed = True
                stop.set()
                return
            print(f"palisade: worker {i} exited with status {code}; restarting it",
                  file=sys.stderr, flush=True)
            await self._start(i)

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (or a worker crash-loops); 0 on a clean stop."""
        watchers: list[asyncio.Task[None]] = []
        try:
            for i in range(self.n):
                await self._start(i)
            watchers += [asyncio.create_task(self._watch(i, stop)) for i in range(self.n)]
            ready: asyncio.Future[Any] = asyncio.gather(*(e.wait() for e in self._ready))
            stopped: asyncio.Future[Any] = asyncio.create_task(stop.wait())
            await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
            if ready.done():
                head = self._listening_line.rstrip(")")
                print(f"{head}, {self.n} workers)", file=sys.stderr, flush=True)
            else:
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
            await stopped
            return 1 if self._failed else 0
        finally:
            self._stopping = True
            await self._stop_all()
            for w in watchers:
                w.cancel()
            for s in self.socks:
                s.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def signal_workers(self, sig: int) -> int:
        """Send ``sig`` to every live worker (SIGHUP: each re-reads its trust); how many."""
        sent = 0
        for p in self.procs:
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
                    sent += 1
        return sent

    async def _stop_all(self) -> None:
        live = [p for p in self.procs if p is not None and p.returncode is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                await asyncio.wait_for(p.wait(), STOP_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
