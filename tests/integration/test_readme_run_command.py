"""The README's first command, run as written in a fresh clone, gives a working archive."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, dcmtk, sample_files

FENCE = re.compile(r"```sh\n(.*?)```", re.S)


def readme_commands() -> list[str]:
    return [b.strip() for b in FENCE.findall((ROOT / "README.md").read_text())]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_readme_starts_with_the_run_and_test_commands() -> None:
    cmds = readme_commands()
    assert "anim serve" in cmds[0]
    assert cmds[1] == "./run-tests"
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci[-1].strip() == cmds[1]


@pytest.mark.integration
def test_readme_run_command_from_fresh_clone_stores_and_indexes_samples(tmp_path: Path) -> None:
    run = readme_commands()[0]
    # The command uses the documented default ports: they must be free for this test.
    assert port_free(11112), "port 11112 is in use: stop the archive running there"
    assert port_free(8080), "port 8080 is in use: stop the server running there"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANIM_", "VIRTUAL_ENV"))}
    proc = subprocess.Popen(["bash", "-c", run], cwd=clone, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " ready: DIMSE " in line:
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 600  # includes pip installing into a new venv
        while not ready.wait(0.2):
            assert proc.poll() is None, "".join(lines[-40:])
            assert time.monotonic() < deadline, "archive not ready:\n" + "".join(lines[-40:])
        env_dcmtk = {**os.environ, "TCP_NODELAY": "1"}
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "ANIM", "127.0.0.1", "11112"],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        store = subprocess.run(
            [dcmtk("storescu"), "-aec", "ANIM", "+sd", "+r", "+sp", "*.dcm", "127.0.0.1",
             "11112", "sample_dicom"], cwd=clone, capture_output=True, text=True, timeout=300,
            env=env_dcmtk)
        assert store.returncode == 0, store.stdout + store.stderr
        with urllib.request.urlopen("http://127.0.0.1:8080/health", timeout=10) as r:
            health = json.load(r)
        assert health["instances"] == len(sample_files())
        with urllib.request.urlopen("http://127.0.0.1:8080/dicom-web/studies", timeout=10) as r:
            studies = json.load(r)
        assert sum(s["00201208"]["Value"][0] for s in studies) == len(sample_files())
        assert (clone / "anim-data" / "index.sqlite").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        reader.join(10)
        if proc.stdout is not None:
            proc.stdout.close()
