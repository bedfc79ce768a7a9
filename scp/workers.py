"""DIMSE worker processes: several processes accept associations on one port.

One Python process runs its associations' Python code one thread at a time (the GIL),
so with ``[dimse] workers = N`` (N > 1) ``anim serve`` starts N - 1 more processes that
each open the archive and listen on the same DIMSE port with ``SO_REUSEPORT``; the
kernel spreads incoming connections over the N listening sockets. The index and blob
store already take several writers (row locks, unique constraints, content-addressed
blobs), so a worker is a whole DIMSE server: store, find, move, get. It runs no HTTP
and no background jobs (stability sweeps, webhooks): those stay in the main process.

A worker gets its configuration from the main process as a pickle on stdin (no secret
touches the disk or the command line), and stops on SIGTERM or when stdin reaches
end-of-file, which is when the main process is gone, whatever way it went. The main
process restarts a worker that dies, after a pause that grows while they keep dying.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from anim.config import Config

log = logging.getLogger("scp.workers")  # also when run as __main__

_RESTART_PAUSE = (1.0, 30.0)  # first and longest pause before restarting a dead worker


class Workers:
    """The main process's side: start, watch and stop the worker processes."""

    def __init__(self, cfg: Config, port: int, count: int, debug: bool = False) -> None:
        self._payload = pickle.dumps((cfg, port, debug))
        self._count = count
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="anim-dimse-workers",
                                         daemon=True)

    def start(self) -> None:
        for i in range(self._count):
            self._spawn(i)
        self._watcher.start()
        log.info("DIMSE: %d worker process(es) share the port", self._count)

    def _spawn(self, i: int) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "scp.workers"],
                                stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(struct.pack(">Q", len(self._payload)) + self._payload)
        proc.stdin.flush()  # stays open: its end-of-file tells the worker we are gone
        self._procs[i] = proc

    def _watch(self) -> None:
        pause = dict.fromkeys(range(self._count), _RESTART_PAUSE[0])
        while not self._stopping.wait(0.5):
            for i, proc in enumerate(self._procs):
                if proc is None or proc.poll() is None:
                    continue
                log.error("DIMSE worker %d (pid %d) exited with %s; restarting in %.0f s",
                          i + 1, proc.pid, proc.returncode, pause[i])
                if self._stopping.wait(pause[i]):
                    return
                pause[i] = min(pause[i] * 2, _RESTART_PAUSE[1])
                self._spawn(i)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        procs = [p for p in self._procs if p is not None]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("DIMSE worker pid %d did not stop in time: killed", p.pid)
                p.kill()
                p.wait()
            if p.stdin is not None:
                p.stdin.close()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.poll() is None]


def _read_exactly(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = os.read(fd, n - len(out))
        if not more:
            raise SystemExit("scp.workers: the main process went away before the configuration")
        out += more
    return out


def _worker_main() -> int:
    """A worker process: read (config, port, debug) from stdin, serve DIMSE until told to stop."""
    # raw reads of fd 0: a thread blocked in a buffered stdin read would hold its lock
    # when the interpreter shuts down (a fatal error at exit)
    size = struct.unpack(">Q", _read_exactly(0, 8))[0]
    cfg, port, debug = pickle.loads(_read_exactly(0, size))
    from anim.archive import Archive
    from anim.cli import _setup_logging
    from scp import server as scp_server

    _setup_logging(cfg.log.level, debug)
    for h in logging.getLogger().handlers:  # the main process's log, told apart
        h.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s [dimse worker %(process)d] %(name)s: %(message)s"))
    stop = threading.Event()

    def on_signal(_sig: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def parent_gone() -> None:
        while os.read(0, 4096):  # b"" once the main process closed the pipe or died
            pass
        stop.set()

    threading.Thread(target=parent_gone, name="anim-parent-watch", daemon=True).start()
    import dataclasses

    dimse = dataclasses.replace(cfg.dimse, port=port)
    with Archive.open(dataclasses.replace(cfg, dimse=dimse)) as archive:
        server = scp_server.start(archive, dimse, reuse_port=True)
        log.info("DIMSE worker pid %d serving", os.getpid())
        stop.wait()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
