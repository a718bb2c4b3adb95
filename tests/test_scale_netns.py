"""Scale-out across machine boundaries: Linux network namespaces joined by veth pairs, made here.

    w1 (10.77.1.2) ──veth── broker (10.77.1.1 | 10.77.2.1 | 10.77.3.1) ──veth── edge (10.77.3.2)
    w2 (10.77.2.2) ──veth──┘                                                  nomad, gallery_bridge,
                                                                              the emulated sites (its loopback)

The broker's namespace does not forward between its links, so a worker cannot reach nomad's
namespace and nomad cannot reach a worker's; the emulated sites listen on the edge namespace's own
loopback, so only nomad reaches them. Every process is real (``python -m anti_sus …``) and runs in
its namespace through ``ip netns exec``; the models are the torch-free tiny ones.

Shown: both workers take work, each a fair share of the requests (the broker balances, it does not
fill the first worker it knows); a worker killed with ``kill -9`` while it holds a request of nomad's
loses nothing and doubles nothing in the gallery; a worker joining later takes work. How much two
workers filter compared with one is a benchmark, not a test (timed assertions fail on a busy CI
machine): bench/scale.py, on the same topology (built by bench/netns.py, shared with this module).

Root only: without root, ``ip`` or the right to make namespaces the module is skipped with the reason.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bench.netns import IP, Net, netns_unavailable, wait_for
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(600)

FRONTEND = "tcp://10.77.3.1:7777"
BACKEND = {"w1": "tcp://10.77.1.1:7779", "w2": "tcp://10.77.2.1:7779"}
POSTS = 48

REASON = netns_unavailable()
if REASON is not None:
    pytest.skip(REASON, allow_module_level=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import tiny_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    tiny_onnx.build(out)
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    n = Net(tmp_path_factory.mktemp("netns_logs"))
    assert (n.frontend, n.backend) == (FRONTEND, BACKEND)
    try:
        n.create()
        yield n
    finally:
        n.close()  # always: processes killed, namespaces (and their veth pairs) deleted
        assert not n.left_behind(), "a namespace was left behind"


class Cluster:
    """Broker, gallery_bridge and the emulator (started once); workers come and go per test."""

    def __init__(self, net: Net, models: Path, tmp: Path) -> None:
        self.net, self.models, self.tmp = net, models, tmp
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.ids: dict[str, str] = {}
        self.gallery = tmp / "gallery"

    def joined(self) -> list[str]:
        return re.findall(r"worker ([0-9a-f]+) joined", self.net.log("broker"))

    def start_worker(self, name: str, role: str, core: int | None = None) -> subprocess.Popen[bytes]:
        """A worker in ``role``'s namespace; returns once the broker has counted it (its id is recorded)."""
        before = len(self.joined())
        proc = self.net.spawn(role, name, ["anti_sus", "serve", "--models", str(self.models), "--connect", BACKEND[role],
                                           "--threads", "1", "--heartbeat", "0.5"], core)
        wait_for(lambda: len(self.joined()) > before or proc.poll() is not None, 90, f"{name} joins the broker",
                 lambda: self.net.log(name)[-2000:] + self.net.log("broker")[-2000:])
        assert proc.poll() is None, self.net.log(name)[-2000:]
        self.workers[name], self.ids[name] = proc, self.joined()[-1]
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        self.workers.clear()

    def replies(self, name: str) -> int:
        return self.net.log(name).count("filter id=")

    def load(self, seconds: float, warmup: float = 1.0, clients: int = 4, batch: int = 8) -> dict[str, float]:
        """The load generator in the edge namespace (nomad's), through the broker's frontend."""
        out = self.net.run("e", ["-m", "bench.netns_load", "--server", FRONTEND, "--seconds", str(seconds),
                                 "--warmup", str(warmup), "--clients", str(clients), "--batch", str(batch)],
                           timeout=seconds + warmup + 120)
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(net: Net, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(net, models, tmp_path_factory.mktemp("cluster"))
    c.gallery.mkdir()
    net.spawn("b", "broker", ["anti_sus", "broker", "--frontend", FRONTEND, "--backend", BACKEND["w1"], "--backend",
                              BACKEND["w2"], "--worker-timeout", "20", "--log-level", "DEBUG"])
    net.spawn("e", "gallery", ["gallery_bridge", "serve", "--bind", "tcp://127.0.0.1:7778", "--target", f"folder:{c.gallery}"])
    nomad_json = c.tmp / "nomad.json"
    net.spawn("e", "emulator", ["tests.netns_emulator", "--posts", str(POSTS), "--out", str(nomad_json)])
    wait_for(nomad_json.exists, 60, "the emulator starts", lambda: net.log("emulator")[-2000:])
    ping = net.run("e", ["-m", "gallery_bridge", "ping", "--connect", "tcp://127.0.0.1:7778", "--timeout", "5", "--retries", "10"], 120)
    assert ping.returncode == 0, ping.stdout + ping.stderr + net.log("gallery")[-2000:]
    yield c
    c.stop_workers()


def connects(net: Net, role: str, host: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(({host!r}, {port}), timeout=2).close()"
    return net.run(role, ["-c", code], 30).returncode == 0


def test_namespaces_isolate_the_roles(net: Net, cluster: Cluster) -> None:
    """Workers reach only the backend, nomad's namespace only the frontend, and only nomad's the sites."""
    cluster.start_worker("w1", "w1")
    emulator_port = json.loads((cluster.tmp / "nomad.json").read_text())["args"]
    port = int(re.search(r":(\d+):127\.0\.0\.1", " ".join(emulator_port)).group(1))  # type: ignore[union-attr]
    assert connects(net, "e", "10.77.3.1", 7777)
    assert connects(net, "w1", "10.77.1.1", 7779)
    assert not connects(net, "w1", "10.77.3.2", 7778), "a worker reached nomad's namespace"
    assert not connects(net, "e", "10.77.1.2", 7779), "nomad's namespace reached a worker's"
    assert connects(net, "e", "127.0.0.1", port)
    for role in ("b", "w1"):
        assert not connects(net, role, "127.0.0.1", port), f"the emulated sites answered in {role}"
        assert not connects(net, role, "10.77.3.2", port), f"the emulated sites answered {role}"


def test_both_workers_take_work(cluster: Cluster) -> None:
    if "w1" not in cluster.workers:
        cluster.start_worker("w1", "w1")
    cluster.start_worker("w2", "w2")
    before = {w: cluster.replies(w) for w in ("w1", "w2")}
    result = cluster.load(seconds=3)
    assert result["errors"] == 0 and result["images"] > 0, result
    done = {w: cluster.replies(w) - before[w] for w in ("w1", "w2")}
    for w in ("w1", "w2"):
        assert done[w] > 0, f"{w} took no work: {done} {result}"
    # Two equal workers and four clients: the broker hands each request to the worker free longest, so
    # neither gets less than a quarter (a broker that keeps feeding the first worker while it keeps up
    # would give the second next to nothing). A count of requests, not a speed: no clock in it.
    total = sum(done.values())
    for w in ("w1", "w2"):
        assert done[w] >= total / 4, f"{w} answered {done[w]} of {total} requests: not a fair share"


def test_kill9_mid_batch_loses_and_doubles_nothing(net: Net, cluster: Cluster) -> None:
    """nomad crawls all posts through the broker; w1 is frozen, handed a request of nomad's, then killed -9.

    The client's retry gives the request to w2, and the gallery ends with every photo exactly once.
    """
    for name, role in (("w1", "w1"), ("w2", "w2")):
        if name not in cluster.workers or cluster.workers[name].poll() is not None:
            cluster.start_worker(name, role)
    emu = json.loads((cluster.tmp / "nomad.json").read_text())
    w1 = cluster.workers["w1"]
    w1.send_signal(signal.SIGSTOP)  # frozen with its connection open: the broker still counts it free
    forwarded_before = net.log("broker").count(f"request to worker {cluster.ids['w1']}")
    argv = ["-m", "nomad", "once", *emu["args"], "--source", "reddit", "--listing", "r/EarthPorn/new",
            "--anti-sus", FRONTEND, "--anti-sus-timeout", "4", "--gallery", "tcp://127.0.0.1:7778",
            "--state-dir", str(cluster.tmp / "nomad-state"), "--batch-size", "4", "--gmm-threshold=-1e30",
            "--watermark-threshold", "1.0"]
    nomad = subprocess.Popen([IP, "netns", "exec", net.names["e"], sys.executable, *argv], cwd=REPO,  # type: ignore[list-item]
                             stdout=open(net.logs / "nomad.log", "wb"), stderr=subprocess.STDOUT,
                             env={**os.environ, **emu["env"], "PYTHONUNBUFFERED": "1"})
    net.procs.append(nomad)
    try:
        wait_for(lambda: net.log("broker").count(f"request to worker {cluster.ids['w1']}") > forwarded_before
                 or nomad.poll() is not None, 120, "the broker hands the frozen w1 a request of nomad's",
                 lambda: net.log("nomad")[-3000:] + net.log("broker")[-3000:])
        assert nomad.poll() is None, "nomad finished before w1 was given a request: " + net.log("nomad")[-3000:]
        w1.send_signal(signal.SIGKILL)  # dies holding it
        w1.wait(timeout=30)
        # The broker gave w1 more requests than w1 ever answered: one of nomad's was lost with it.
        assert net.log("broker").count(f"request to worker {cluster.ids['w1']}") > cluster.replies("w1")
        assert nomad.wait(timeout=300) == 0, net.log("nomad")[-4000:]
    finally:
        if nomad.poll() is None:
            nomad.kill()
    assert cluster.replies("w2") > 0
    with sqlite3.connect(f"file:{cluster.gallery / 'catalogue.sqlite'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT key, sha256, source_url FROM entries WHERE state = 'complete'").fetchall()
        aliases = db.execute("SELECT COUNT(*) FROM aliases").fetchone()[0]
    urls = sorted(r[2] for r in rows)
    expected = [u for u in urls if re.search(r"/scale\d{4}\.jpeg$", u)]
    assert len(rows) == POSTS, f"{len(rows)} photos in the gallery, {POSTS} posted (lost or doubled)"
    assert len(set(expected)) == POSTS and len({r[1] for r in rows}) == POSTS, "a photo is missing or stored twice"
    assert aliases == 0, "a photo arrived twice under another key"


def test_a_worker_joining_later_takes_work(cluster: Cluster) -> None:
    late = cluster.start_worker("w1-late", "w1")  # in the killed worker's namespace, after the others
    assert late.poll() is None
    result = cluster.load(seconds=3)
    assert result["errors"] == 0, result
    assert cluster.replies("w1-late") > 0, f"the late worker took no work: {result}"
