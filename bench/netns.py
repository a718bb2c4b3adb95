"""Network namespaces joined by veth pairs, and the processes in them: the harness of bench/scale.py and
tests/test_scale_netns.py (the test imports it from here: benchmarks never import tests/).

    w1 (10.77.1.2) ──veth── broker (10.77.1.1 | 10.77.2.1 | 10.77.3.1) ──veth── edge (10.77.3.2)
    w2 (10.77.2.2) ──veth──┘

The broker's namespace does not forward between its links, so a worker cannot reach the edge
namespace and the edge cannot reach a worker. Every process is a real ``python -m …`` run in its
namespace through ``ip netns exec`` (optionally pinned to a core with ``taskset``). Without root (or
without ``ip``/veth), ``Net(namespaces=False)`` runs the same processes on the host's loopback with the
same pinning, and :func:`netns_unavailable` says why namespaces could not be used.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
IP = shutil.which("ip")
TASKSET = shutil.which("taskset")
ROLES = ("b", "w1", "w2", "e")
# One /24 per link; the broker holds .1 of each.
LINKS = {"w1": "10.77.1", "w2": "10.77.2", "e": "10.77.3"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if IP is None:
        raise RuntimeError("no `ip` command (iproute2) on this machine")
    out = subprocess.run([IP, *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def netns_unavailable(tag: str = f"pm{os.getpid() % 100000}") -> str | None:
    """Why this machine cannot make the namespaces, found by trying what :meth:`Net.create` does; None when it can."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "not root: making network namespaces and veth pairs needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    if IP is None:
        return "no `ip` command (iproute2) on this machine"
    probe = f"{tag}probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"cannot make a network namespace: {made.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False)
        if veth.returncode != 0:
            return f"cannot make a veth pair (no CAP_NET_ADMIN or no veth module): {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Net:
    """The namespaces (or the loopback), their addresses and every process started; ``close()`` removes it all."""

    def __init__(self, logs: Path, namespaces: bool = True, tag: str = f"pm{os.getpid() % 100000}") -> None:
        self.logs = logs
        self.namespaces = namespaces
        self.names = {role: f"{tag}{role}" for role in ROLES}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []
        if namespaces:
            self.frontend = f"tcp://{LINKS['e']}.1:7777"
            self.backend = {w: f"tcp://{LINKS[w]}.1:7779" for w in ("w1", "w2")}
        else:  # one backend port for both workers: on the loopback there is nothing to keep apart
            port = free_port()
            self.frontend = f"tcp://127.0.0.1:{free_port()}"
            self.backend = {w: f"tcp://127.0.0.1:{port}" for w in ("w1", "w2")}

    def create(self) -> None:
        if not self.namespaces:
            return
        for ns in self.names.values():
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        b = self.names["b"]
        for role, net in LINKS.items():
            # Made straight inside the two namespaces: nothing appears in the host's namespace.
            _ip("link", "add", f"to{role}", "netns", b, "type", "veth", "peer", "name", "uplink", "netns", self.names[role])
            _ip("-n", b, "addr", "add", f"{net}.1/24", "dev", f"to{role}")
            _ip("-n", self.names[role], "addr", "add", f"{net}.2/24", "dev", "uplink")
            _ip("-n", b, "link", "set", f"to{role}", "up")
            _ip("-n", self.names[role], "link", "set", "uplink", "up")

    def _prefix(self, role: str, core: int | None) -> list[str]:
        netns = [IP, "netns", "exec", self.names[role]] if self.namespaces and IP else []
        if core is None:
            return netns
        if TASKSET is None:
            raise RuntimeError("no `taskset` (util-linux) to pin a process to a core")
        return [*netns, TASKSET, "-c", str(core)]

    def spawn(self, role: str, name: str, argv: list[str], core: int | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``python -m argv…`` as a process in ``role``'s namespace, logging to ``name``.log."""
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([*self._prefix(role, core), sys.executable, "-m", *argv], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
        log.close()
        self.procs.append(proc)
        return proc

    def run(self, role: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """``python argv…`` in ``role``'s namespace, to completion."""
        return subprocess.run([*self._prefix(role, None), sys.executable, *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.made:
            _ip("netns", "del", ns, check=False)

    def left_behind(self) -> list[str]:
        """Namespaces of this Net still present (after ``close()``: none)."""
        if not self.made:
            return []
        listed = _ip("netns", "list").stdout
        return [ns for ns in self.made if ns in listed]


def wait_for(cond: Callable[[], bool], seconds: float, what: str, why: Callable[[], str] = lambda: "") -> None:
    """Poll ``cond`` until true; AssertionError naming ``what`` (and ``why()``) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:g} s\n{why()}")
        time.sleep(0.1)


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU time of the processes (``ip netns exec`` and ``taskset`` exec into Python: same pid)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks
