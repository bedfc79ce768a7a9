"""Event-driven reactors for pynetdicom 3.0.4: wait on the socket and on a wake-up,
never poll with sleeps.

pynetdicom runs two threads per association. The DUL thread reads PDUs from the socket
and runs the upper-layer state machine (PS3.8 9.2); the association thread serves the
DIMSE messages the DUL assembles. In pynetdicom 3.0.4 both loops poll: the DUL sleeps
1 ms whenever a pass found nothing to do (``DULServiceProvider._run_loop_delay``, marked
"TODO: make this event based" upstream), the association loop sleeps 1 ms on every pass.
So every request/response turn waits for up to two sleeps, and an idle association
wakes its threads 2,000 times a second (bench/results/profile-ingest-2026-11-30.md:
28 % of the association thread and 82 % of the DUL thread were those sleeps).

Here the same loops, with the same steps in the same order, block instead:

- the DUL thread waits in ``select`` on the peer's socket and on a socket pair that is
  written whenever something is queued for it (a primitive to send, an event, a kill),
  with a timeout no longer than the ARTIM timer's remaining time;
- the association thread waits on a ``threading.Event`` that the DUL sets after every
  state-machine action (a DIMSE message or an A-RELEASE/A-ABORT for the user), when it
  stops, and that ``kill()`` sets; with a timeout no longer than the network idle timer.

Both keep a 0.5 s ceiling on any wait, so a wake-up that never came only costs latency.
The layer patches the two classes' methods, only for the pinned version (`PINNED`), and
leaves pynetdicom as it is (with a warning) for any other: the loops are copies of
3.0.4's and must be compared again on an upgrade. tests/unit/test_reactor.py checks
that an idle association does not spin and that every DIMSE service still works.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import threading
from typing import Any

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)
# the loops' own messages keep the loggers pynetdicom gives them
_assoc_log = logging.getLogger("pynetdicom.association")
_dul_log = logging.getLogger("pynetdicom.dul")

PINNED = "3.0.4"
_CEILING = 0.5  # seconds: the longest any loop waits without looking around

_originals: dict[str, Any] = {}
_lock = threading.Lock()


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that wakes its DUL thread whenever something is put on it."""

    def __init__(self, dul: DULServiceProvider) -> None:
        super().__init__()
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        _wake_dul(self._dul)


def _wake_dul(dul: DULServiceProvider) -> None:
    # The lock keeps a late wake-up from writing to a closed (and maybe reused) fd.
    with dul._anim_wake_lock:  # type: ignore[attr-defined]
        w = dul._anim_wake_w  # type: ignore[attr-defined]
        if w is not None:
            # full (a wake-up is already pending) or closing: either way nothing to do
            with contextlib.suppress(OSError):
                w.send(b"\0")


def _dul_init(self: DULServiceProvider, assoc: Association) -> None:
    _originals["dul_init"](self, assoc)
    self._anim_wake_lock = threading.Lock()  # type: ignore[attr-defined]
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    self._anim_wake_r, self._anim_wake_w = r, w  # type: ignore[attr-defined]
    self._anim_loops = 0  # type: ignore[attr-defined]  # passes of the loop, for tests
    self.event_queue = _WakingQueue(self)
    self.to_provider_queue = _WakingQueue(self)


def _dul_kill(self: DULServiceProvider) -> None:
    self._kill_thread = True
    _wake_dul(self)


def _dul_stop(self: DULServiceProvider) -> bool:
    """``stop_dul``: stop the reactor if the state is Sta1 (idle), and wait for it."""
    if self.state_machine.current_state != "Sta1":
        return False
    self._kill_thread = True
    _wake_dul(self)
    if self.is_alive() and threading.current_thread() is not self:
        self.join()
    return True


def _dul_wait(self: DULServiceProvider) -> None:
    """Block until the peer sent something, something was queued, or a timer is due."""
    timeout = _CEILING
    artim = self.artim_timer
    if artim._start_time is not None and artim._end_time is None:
        timeout = max(0.0, min(timeout, artim.remaining))
    wake_r = self._anim_wake_r  # type: ignore[attr-defined]
    fds: list[Any] = [wake_r]
    sock = self.socket
    raw = getattr(sock, "socket", None) if sock is not None else None
    if raw is not None and sock._is_connected:  # type: ignore[union-attr]
        # an SSLSocket may hold decrypted bytes select cannot see (pynetdicom #528)
        pending = getattr(raw, "pending", None)
        if pending is not None and pending():
            return
        fds.append(raw)
    try:
        select.select(fds, [], [], timeout)
    except (OSError, ValueError):
        # the peer's socket was closed under us: the next pass reports it (Evt17)
        select.select([wake_r], [], [], min(timeout, 0.01))
    try:
        while wake_r.recv(4096):
            pass
    except OSError:  # BlockingIOError: drained
        pass


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4 ``DULServiceProvider.run_reactor`` with the sleep replaced."""
    try:
        _dul_loop(self)
    finally:
        with self._anim_wake_lock:  # type: ignore[attr-defined]
            w, self._anim_wake_w = self._anim_wake_w, None  # type: ignore[attr-defined]
        w.close()
        self._anim_wake_r.close()  # type: ignore[attr-defined]
        _wake_assoc(self.assoc)


def _dul_loop(self: DULServiceProvider) -> None:
    self._idle_timer.start()
    idle = False
    while True:
        self._anim_loops += 1  # type: ignore[attr-defined]
        if not self.assoc._dul_ready.is_set():
            self.assoc._dul_ready.set()
        if idle:
            _dul_wait(self)
        if self._kill_thread:
            break
        # the ARTIM timer first, so its event is queued ahead of any other this pass
        if self.artim_timer.expired:
            self.event_queue.put("Evt18")
        try:
            # one primitive encoded and sent, or one PDU received and decoded, per pass
            if self._process_recv_primitive():
                pass
            elif self._is_transport_event():
                self._idle_timer.restart()
        except Exception:
            _dul_failed(self)
            return
        try:
            event = self.event_queue.get(block=False)
        except queue.Empty:
            idle = True
            continue
        self.state_machine.do_action(event)
        _wake_assoc(self.assoc)
        idle = False


def _dul_failed(self: DULServiceProvider) -> None:
    _dul_log.exception("DUL reactor failed, aborting the association")
    # as pynetdicom does: bypass the state machine, whose state is now unknown
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    try:
        self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
    except Exception:
        _dul_log.debug("A-ABORT could not be sent", exc_info=True)
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    self.assoc._kill = True
    self._kill_thread = True


def _wake_assoc(assoc: Association) -> None:
    wake = getattr(assoc, "_anim_wake", None)
    if wake is not None:
        wake.set()


def _assoc_init(self: Association, *args: Any, **kwargs: Any) -> None:
    _originals["assoc_init"](self, *args, **kwargs)
    self._anim_wake = threading.Event()  # type: ignore[attr-defined]


def _assoc_kill(self: Association) -> None:
    self._anim_wake.set()  # type: ignore[attr-defined]
    _originals["assoc_kill"](self)


def _assoc_run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4 ``Association._run_reactor`` with the sleep replaced.

    While it waits for a wake-up the reactor counts as paused: it touches nothing before
    passing ``_reactor_checkpoint`` again, so a ``send_c_*`` call (which clears the
    checkpoint and waits for ``_is_paused``) never has to wait for a timeout.
    """
    wake: threading.Event = self._anim_wake  # type: ignore[attr-defined]
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False
        wake.clear()

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
            continue  # another message may already be queued: look again at once

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _assoc_log.info("Association Released")
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            _assoc_log.info("Association Aborted%s",
                     " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
            self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _assoc_log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return

        timeout = _CEILING
        idle = self.dul._idle_timer
        if idle.timeout is not None:
            timeout = max(0.0, min(timeout, idle.remaining))
        self._is_paused = True
        wake.wait(timeout)


def is_pinned(otherwise: str) -> bool:
    """Whether pynetdicom is the version these layers were written against; if not, log
    what happens *otherwise* (the layer stays out)."""
    if pynetdicom.__version__ == PINNED:
        return True
    log.warning("pynetdicom %s is not %s: %s", pynetdicom.__version__, PINNED, otherwise)
    return False


def installed() -> bool:
    return bool(_originals)


def install() -> bool:
    """Patch pynetdicom's two reactors (idempotent). False when the version is not
    the pinned one: pynetdicom then runs as shipped."""
    with _lock:
        if _originals:
            return True
        if not is_pinned("its polling reactors are left as they are"):
            return False
        _originals.update(
            dul_init=DULServiceProvider.__init__, dul_run=DULServiceProvider.run_reactor,
            dul_kill=DULServiceProvider.kill_dul, dul_stop=DULServiceProvider.stop_dul,
            assoc_init=Association.__init__, assoc_run=Association._run_reactor,
            assoc_kill=Association.kill)
        DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
        Association.__init__ = _assoc_init  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        Association.kill = _assoc_kill  # type: ignore[method-assign]
        return True


def uninstall() -> None:
    """Put pynetdicom's own reactors back (for associations created afterwards)."""
    with _lock:
        if not _originals:
            return
        DULServiceProvider.__init__ = _originals["dul_init"]  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _originals["dul_run"]  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _originals["dul_kill"]  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _originals["dul_stop"]  # type: ignore[method-assign]
        Association.__init__ = _originals["assoc_init"]  # type: ignore[method-assign]
        Association._run_reactor = _originals["assoc_run"]  # type: ignore[method-assign]
        Association.kill = _originals["assoc_kill"]  # type: ignore[method-assign]
        _originals.clear()
