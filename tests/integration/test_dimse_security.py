"""Who may talk DIMSE to the archive (issue 7, acceptance 3), shown with DCMTK peers.

- an unknown calling AE, when unknown callers are not allowed, gets an A-ASSOCIATE-RJ
  "calling AE title not recognized" (PS3.8 9.3.4); a known one is accepted;
- a known AE calling from an address other than its configured host is rejected;
- DICOM TLS (PS3.15 B.9/B.10) with client certificates: DCMTK's ``+tls`` stores and
  echoes; a certificate from another CA, no certificate, and plain DICOM are refused,
  and nothing is stored.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import trustme

from tests.conftest import SAMPLES, AnimServer, dcmtk, echoscu, sample_files, storescu
from tests.integration.test_tenancy import trail_rows

REJECTED = "Result: Rejected Permanent, Source: Service User"  # DCMTK's wording


def instances(srv: AnimServer) -> int:
    return int(requests.get(f"{srv.url}/health", timeout=30).json()["instances"])


def output(r: subprocess.CompletedProcess[str]) -> str:
    return r.stdout + r.stderr


# ---- calling AE title -------------------------------------------------------------------


@pytest.fixture
def closed(make_server: type[AnimServer], tmp_path: Path) -> AnimServer:
    """Unknown callers refused (by environment), one known AE (by flag)."""
    return make_server(tmp_path / "data", args=["--known-ae", "MODALITY1=127.0.0.1:11150"],
                       env={"ANIM_DIMSE_ALLOW_UNKNOWN_CALLERS": "false"}).start()


def test_unknown_calling_ae_is_rejected_and_a_known_one_accepted(closed: AnimServer) -> None:
    r = echoscu(closed.dimse_port, calling="STRANGER")
    assert r.returncode != 0
    assert "Association Rejected" in output(r)
    assert REJECTED in output(r)
    assert "Reason: Calling AE Title Not Recognized" in output(r)

    stored = storescu(closed.dimse_port, SAMPLES, calling="STRANGER")
    assert stored.returncode != 0
    assert "Calling AE Title Not Recognized" in output(stored)
    assert instances(closed) == 0

    ok = echoscu(closed.dimse_port, calling="MODALITY1")
    assert ok.returncode == 0, output(ok)
    # the rejection is logged with who and where (and nothing about patients)
    assert ("association from STRANGER at 127.0.0.1 to ANIM rejected: "
            "calling-AE-title-not-recognized") in closed.log
    # ... and in the audit trail: who, from where, the outcome and why
    rows = trail_rows(closed, lambda r: r["action"] == "association"
                      and r["outcome"] == "failure", 2)
    assert len(rows) == 2  # the echo and the store
    assert all((r["who"], r["address"], r["outcome"], r["reason"]) == (
        "STRANGER", "127.0.0.1", "failure", "calling-AE-title-not-recognized") for r in rows)


def test_wrong_called_ae_is_rejected(closed: AnimServer) -> None:
    r = echoscu(closed.dimse_port, aet="NOT_ANIM", calling="MODALITY1")
    assert r.returncode != 0
    assert REJECTED in output(r)
    assert "Reason: Called AE Title Not Recognized" in output(r)


# ---- peer address -----------------------------------------------------------------------


def _address_bound(make_server: type[AnimServer], base: Path, host: str,
                   allow_unknown: bool) -> AnimServer:
    config = base / "anim.toml"
    config.write_text(f"""
[dimse]
allow_unknown_callers = {str(allow_unknown).lower()}

[dimse.known_aes.MODALITY1]
host = "{host}"
port = 11150
""")
    return make_server(base / "data", args=["--config", str(config)]).start()


@pytest.mark.parametrize("allow_unknown", [False, True])
def test_known_ae_from_another_address_is_rejected(make_server: type[AnimServer],
                                                   tmp_path: Path, allow_unknown: bool) -> None:
    # MODALITY1 may only call from 127.0.0.2; DCMTK calls from 127.0.0.1
    srv = _address_bound(make_server, tmp_path, "127.0.0.2", allow_unknown)
    r = storescu(srv.dimse_port, SAMPLES, calling="MODALITY1")
    assert r.returncode != 0
    assert REJECTED in output(r)
    assert "Reason: Calling AE Title Not Recognized" in output(r)
    assert instances(srv) == 0
    assert "association from MODALITY1 at 127.0.0.1 to ANIM rejected" in srv.log


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_known_ae_from_its_own_address_is_accepted(make_server: type[AnimServer],
                                                   tmp_path: Path, host: str) -> None:
    srv = _address_bound(make_server, tmp_path, host, allow_unknown=False)
    r = storescu(srv.dimse_port, SAMPLES, calling="MODALITY1")
    assert r.returncode == 0, output(r)
    assert instances(srv) == len(sample_files())


# ---- DICOM TLS --------------------------------------------------------------------------


class Pki:
    """PEM files: a CA, the archive's certificate, a client of that CA, and a client of
    another CA (with the same name, so only the issuer differs)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        ca, rogue_ca = trustme.CA(), trustme.CA()
        self.ca = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca))
        self.server_cert, self.server_key = self._issue(ca, folder, "server", "127.0.0.1")
        self.client_cert, self.client_key = self._issue(ca, folder, "client", "MODALITY1")
        self.rogue_cert, self.rogue_key = self._issue(rogue_ca, folder, "rogue", "MODALITY1")

    @staticmethod
    def _issue(ca: trustme.CA, folder: Path, name: str, identity: str) -> tuple[Path, Path]:
        cert = ca.issue_cert(identity, common_name=identity)
        pem, key = folder / f"{name}.pem", folder / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(pem))
        cert.private_key_pem.write_to_path(str(key))
        return pem, key

    def client_tls(self, key: Path | None = None, cert: Path | None = None
                   ) -> tuple[str, ...]:
        """DCMTK options: TLS with this key and certificate, the archive's CA trusted."""
        return ("+tls", str(key or self.client_key), str(cert or self.client_cert),
                "+cf", str(self.ca))


def _tls_server(make_server: type[AnimServer], base: Path, pki: Pki,
                client_auth: bool = True) -> AnimServer:
    config = base / "anim.toml"
    config.write_text(f"""
[dimse]
tls_cert = "{pki.server_cert}"
tls_key = "{pki.server_key}"
tls_ca = "{pki.ca}"
tls_client_auth = {str(client_auth).lower()}
""")
    return make_server(base / "data", args=["--config", str(config)]).start()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls(make_server: type[AnimServer], tmp_path: Path, pki: Pki) -> AnimServer:
    return _tls_server(make_server, tmp_path, pki)


def tls_echoscu(port: int, *tls_options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY1", "-aec", "ANIM",
                           *tls_options, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_tls_store_and_echo_with_a_client_certificate(tls: AnimServer, pki: Pki) -> None:
    assert "(TLS, client certificate required)" in tls.log
    r = storescu(tls.dimse_port, SAMPLES, calling="MODALITY1", extra=pki.client_tls())
    assert r.returncode == 0, output(r)
    assert instances(tls) == len(sample_files())
    echo = tls_echoscu(tls.dimse_port, *pki.client_tls())
    assert echo.returncode == 0, output(echo)


def test_tls_refuses_wrong_certificate_no_certificate_and_plain_dicom(tls: AnimServer,
                                                                     pki: Pki) -> None:
    rogue = storescu(tls.dimse_port, SAMPLES, calling="MODALITY1",
                     extra=pki.client_tls(pki.rogue_key, pki.rogue_cert))
    assert rogue.returncode != 0
    anonymous = storescu(tls.dimse_port, SAMPLES, calling="MODALITY1",
                         extra=("+tla", "+cf", str(pki.ca)))
    assert anonymous.returncode != 0
    plain = storescu(tls.dimse_port, SAMPLES, calling="MODALITY1")
    assert plain.returncode != 0
    assert instances(tls) == 0
    assert "TLS handshake with 127.0.0.1 refused: CERTIFICATE_VERIFY_FAILED" in tls.log
    assert "TLS handshake with 127.0.0.1 refused: PEER_DID_NOT_RETURN_A_CERTIFICATE" in tls.log
    refused = trail_rows(tls, lambda r: r["action"] == "association"
                         and r["outcome"] == "failure", 3)
    reasons = " ".join(r["reason"] for r in refused)
    assert "CERTIFICATE_VERIFY_FAILED" in reasons
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons
    assert all(r["outcome"] == "failure" and r["address"] == "127.0.0.1" for r in refused)
    # the archive is still there for the right client
    echo = tls_echoscu(tls.dimse_port, *pki.client_tls())
    assert echo.returncode == 0, output(echo)


def test_silent_connection_does_not_hold_up_tls_associations(tls: AnimServer,
                                                             pki: Pki) -> None:
    # the handshake runs on each association's thread, not in the accept loop
    with socket.create_connection(("127.0.0.1", tls.dimse_port)):
        started = time.monotonic()
        echo = tls_echoscu(tls.dimse_port, *pki.client_tls())
        assert echo.returncode == 0, output(echo)
        assert time.monotonic() - started < 10


def test_tls_without_client_authentication(make_server: type[AnimServer], tmp_path: Path,
                                           pki: Pki) -> None:
    srv = _tls_server(make_server, tmp_path, pki, client_auth=False)
    echo = tls_echoscu(srv.dimse_port, "+tla", "+cf", str(pki.ca))
    assert echo.returncode == 0, output(echo)
    plain = echoscu(srv.dimse_port, calling="MODALITY1")
    assert plain.returncode != 0


def test_associations_per_ae_are_limited_and_freed(make_server: type[AnimServer],
                                                    tmp_path: Path) -> None:
    """One AE may hold [dimse].max_associations_per_ae at once; the next gets a transient
    A-ASSOCIATE-RJ (local-limit-exceeded), another AE is unaffected, and a released
    association frees its place."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    srv = make_server(tmp_path / "data", env={"ANIM_DIMSE_MAX_ASSOCIATIONS_PER_AE": "2"}).start()
    ae = AE(ae_title="BUSY")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", srv.dimse_port, ae_title="ANIM") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = echoscu(srv.dimse_port, calling="BUSY")
    assert third.returncode != 0
    assert "Local Limit Exceeded" in output(third)
    assert echoscu(srv.dimse_port, calling="OTHER").returncode == 0
    held[0].release()
    deadline = time.monotonic() + 10
    while echoscu(srv.dimse_port, calling="BUSY").returncode != 0:
        assert time.monotonic() < deadline, "a released association never freed its place"
        time.sleep(0.1)
    held[1].release()
