"""scp/reactor.py: pynetdicom's reactors wait for work instead of polling, and still work.

In-process pynetdicom peers on loopback (both ends patched, as in `anim serve`, whose C-MOVE
sub-associations are requestors): the DUL loop's pass counter shows that an idle association
does not spin; echo, store and release/abort show that every turn of the state machine is
still driven. The DCMTK peers of the integration suite run against the same patched server.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pynetdicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from scp import reactor


@pytest.fixture
def server() -> Iterator[tuple[int, list[Dataset]]]:
    assert reactor.install()
    stored: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        stored.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="REACTOR")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.network_timeout = 30
    srv = ae.start_server(("127.0.0.1", 0), block=False,
                          evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield srv.server_address[1], stored
    finally:
        srv.shutdown()


def _scu() -> AE:
    ae = AE(ae_title="PEER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae


def _acceptor(port: int) -> Association:
    for t in threading.enumerate():
        if isinstance(t, Association) and t.is_acceptor and t.is_established:
            return t
    raise AssertionError("no established acceptor association")


def _ct() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "REACTOR-1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_installed_on_the_pinned_version_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reactor.install()
    assert DULServiceProvider.run_reactor is reactor._dul_run_reactor
    reactor.uninstall()
    try:
        assert DULServiceProvider.run_reactor is not reactor._dul_run_reactor
        assert Association._run_reactor is not reactor._assoc_run_reactor
        monkeypatch.setattr(pynetdicom, "__version__", "9.9.9")
        assert not reactor.install()  # another version: left as shipped
        assert not reactor.installed()
        assert DULServiceProvider.run_reactor is not reactor._dul_run_reactor
    finally:
        monkeypatch.undo()
        assert reactor.install()


def test_an_idle_association_waits_instead_of_polling(server: tuple[int, list[Dataset]]) -> None:
    port, _ = server
    assoc = _scu().associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    try:
        acceptor = _acceptor(port)
        before = (acceptor.dul._anim_loops, assoc.dul._anim_loops)
        time.sleep(1.5)
        after = (acceptor.dul._anim_loops, assoc.dul._anim_loops)
        # pynetdicom's own loop passes ~1,000 times a second when idle (1 ms sleeps); here a
        # pass happens only on a wake-up or the 0.5 s ceiling
        assert after[0] - before[0] <= 10, (before, after)
        assert after[1] - before[1] <= 10, (before, after)
        # and it still answers at once when asked
        for _ in range(20):
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released


def test_many_turns_on_one_association(server: tuple[int, list[Dataset]]) -> None:
    port, stored = server
    assoc = _scu().associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    sent = [_ct() for _ in range(30)]
    for i, ds in enumerate(sent):
        if i % 3 == 0:
            assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert [d.SOPInstanceUID for d in stored] == [d.SOPInstanceUID for d in sent]


def test_the_acceptor_ends_when_the_peer_releases_or_vanishes(
        server: tuple[int, list[Dataset]]) -> None:
    port, _ = server
    assoc = _scu().associate("127.0.0.1", port, ae_title="REACTOR")
    acceptor = _acceptor(port)
    assoc.release()
    acceptor.join(timeout=10)
    assert not acceptor.is_alive()
    assert acceptor.is_released
    assert not acceptor.dul.is_alive()

    # a peer whose TCP connection just drops (no A-RELEASE, no A-ABORT)
    assoc = _scu().associate("127.0.0.1", port, ae_title="REACTOR")
    acceptor = _acceptor(port)
    sock = assoc.dul.socket.socket
    assert sock is not None
    assoc.dul.kill_dul()  # stop our side's reactor without telling the peer
    assoc.dul.join(timeout=10)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    acceptor.join(timeout=10)
    assert not acceptor.is_alive()
    assert not acceptor.is_established
    assoc.kill()
