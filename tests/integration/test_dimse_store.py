"""C-ECHO and C-STORE with DCMTK against a real anim serve process."""

from __future__ import annotations

import json
import urllib.request

from tests.conftest import SAMPLES, AnimServer, echoscu, open_archive, sample_files, storescu


def test_echoscu_succeeds(serve: AnimServer) -> None:
    r = echoscu(serve.dimse_port)
    assert r.returncode == 0, r.stdout + r.stderr


def test_storescu_samples_are_indexed(serve: AnimServer) -> None:
    r = storescu(serve.dimse_port, SAMPLES)
    assert r.returncode == 0, r.stdout + r.stderr
    with urllib.request.urlopen(f"{serve.url}/health") as resp:
        health = json.load(resp)
    assert health["instances"] == len(sample_files())
    with open_archive(serve.data_dir) as archive:
        for path in sample_files():
            from pydicom import dcmread

            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            stored = archive.read_bytes(uid)
            # DIMSE carries no file meta: the data set after group 0002 is identical
            assert stored[-1000:] == path.read_bytes()[-1000:]
