"""A real HAProxy (Debian's 2.6) in front of several ``anim serve`` nodes.

Two frontends on free loopback ports:

- DIMSE: TCP mode, ``balance leastconn`` (an association is long-lived and stateful, so
  the node with the fewest open associations gets the next one). A node's DIMSE health
  is its HTTP readiness endpoint (``option httpchk`` on the node's HTTP port), because a
  bare TCP connect would accept even when the node cannot reach its index or blob store.
- DICOMweb: HTTP mode, round robin, the same HTTP health check.

A failed connect is retried on another node (``option redispatch``), so a node that
died between two health checks costs a retry, not a refused association. The admin
socket answers ``show stat``: server states (UP/DOWN) and sessions per node.

Used by tests/integration/test_scaleout.py and bench/run-nodes.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HAPROXY = "/usr/sbin/haproxy"
HEALTH_PATH = "/health/ready"  # 200 when the node can serve (index + blob store), else 503


@dataclass(frozen=True)
class Node:
    """One archive node as the balancer sees it."""

    name: str
    dimse_port: int
    http_port: int
    host: str = "127.0.0.1"


def haproxy_path() -> str | None:
    """The haproxy binary, or None when it is not installed."""
    found = shutil.which("haproxy") or (HAPROXY if Path(HAPROXY).exists() else None)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def render_config(nodes: list[Node], dimse_port: int, http_port: int, admin_socket: Path,
                  health_path: str = HEALTH_PATH, check_ms: int = 500) -> str:
    """The HAProxy configuration text for *nodes* behind the two frontends."""
    # inter: check interval; fall 2: two failed checks mark a node DOWN; rise 1: one good
    # check brings it back. fastinter shortens the interval while a node's state changes.
    check = f"check inter {check_ms}ms fastinter {max(100, check_ms // 2)}ms fall 2 rise 1"
    dimse = [f"    server {n.name} {n.host}:{n.dimse_port} {check} port {n.http_port}"
             for n in nodes]
    web = [f"    server {n.name} {n.host}:{n.http_port} {check}" for n in nodes]
    lines = [
        "global",
        "    maxconn 4096",
        f"    stats socket {admin_socket} mode 600 level admin",
        "defaults",
        "    timeout connect 5s",
        # DIMSE associations may idle between C-STOREs; big WADO responses take a while
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 2s",
        "    retries 2",
        "    option redispatch 1",
        "frontend dimse_in",
        "    mode tcp",
        f"    bind 127.0.0.1:{dimse_port}",
        "    default_backend dimse_nodes",
        "backend dimse_nodes",
        "    mode tcp",
        "    balance leastconn",
        "    option httpchk",
        f"    http-check send meth GET uri {health_path}",
        "    http-check expect status 200",
        *dimse,
        "frontend web_in",
        "    mode http",
        f"    bind 127.0.0.1:{http_port}",
        "    option forwardfor",
        "    default_backend web_nodes",
        "backend web_nodes",
        "    mode http",
        "    balance roundrobin",
        "    option httpchk",
        f"    http-check send meth GET uri {health_path}",
        "    http-check expect status 200",
        *web,
    ]
    return "\n".join(lines) + "\n"


class HAProxy:
    """``haproxy -db -f <cfg>`` in the foreground of a child process, stopped by its pid."""

    def __init__(self, workdir: Path, nodes: list[Node], health_path: str = HEALTH_PATH,
                 dimse_port: int = 0, http_port: int = 0, check_ms: int = 500) -> None:
        self.workdir = workdir
        self.nodes = nodes
        self.dimse_port = dimse_port or free_port()
        self.http_port = http_port or free_port()
        self.admin_socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.health_path = health_path
        self.check_ms = check_ms
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> HAProxy:
        exe = haproxy_path()
        if exe is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(render_config(self.nodes, self.dimse_port, self.http_port,
                                             self.admin_socket, self.health_path,
                                             self.check_ms))
        check = subprocess.run([exe, "-c", "-f", str(self.config)], capture_output=True,
                               text=True, check=False)
        if check.returncode:
            raise RuntimeError(f"haproxy rejects {self.config}:\n{check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([exe, "-db", "-f", str(self.config)], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # HAProxy binds its frontends before it serves the admin socket, so an answer there
        # means it listens. (A probe connection to a frontend would be sent on to a node.)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("haproxy did not start:\n" + self.log())
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGUSR1 is HAProxy's soft stop (finish open sessions); SIGTERM stops at once
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.admin_socket.unlink(missing_ok=True)

    # ---- the admin socket ----------------------------------------------------------------

    def command(self, cmd: str) -> str:
        """One command on the admin socket (HAProxy management guide, section 9.3)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.admin_socket))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows (pxname, svname, status, stot, ...), servers only."""
        text = self.command("show stat").lstrip("# ")
        rows = list(csv.DictReader(io.StringIO(text)))
        return [r for r in rows if r.get("svname") not in ("FRONTEND", "BACKEND", None)]

    def server(self, backend: str, name: str) -> dict[str, str]:
        for row in self.stats():
            if row["pxname"] == backend and row["svname"] == name:
                return row
        raise KeyError(f"{backend}/{name}")

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> status: UP, DOWN, 'UP 1/2' (going down), 'DOWN 1/2', ..."""
        return {(r["pxname"], r["svname"]): r["status"] for r in self.stats()}

    def sessions(self, backend: str = "dimse_nodes") -> dict[str, int]:
        """Server name -> sessions (connections) it has been given since the start."""
        return {r["svname"]: int(r["stot"] or 0) for r in self.stats()
                if r["pxname"] == backend}

    def wait_status(self, name: str, status: str, timeout: float = 30.0) -> None:
        """Wait until node *name* is *status* (UP or DOWN) in both backends."""
        deadline = time.monotonic() + timeout
        seen: dict[tuple[str, str], str] = {}
        while time.monotonic() < deadline:
            seen = self.states()
            mine = [v for (_, sv), v in seen.items() if sv == name]
            if mine and all(v == status for v in mine):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not {status} after {timeout:.0f} s: {seen}")
