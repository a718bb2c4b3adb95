"""The launcher (make up) as a supervisor: restarts after SIGKILL with a backoff that grows
and resets, one signal stops everything, and it knows its own children from strangers on its ports."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from anti_sus.client import FilterClient
from photocore.protocol import ok_reply, parse_header, request_id
from stack import up
from stack.procs import Service, free_port, python_module, stop_all, wait_until
from stack.emulator import Emulator
from tests.concurrency import background

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

STARTED = re.compile(r"started (\w+) \(pid (\d+)\)")


@dataclass
class Recorded(Service):
    """A stand-in child that remembers when the supervisor (re)started it."""

    starts: list[float] = field(default_factory=list)

    def start(self) -> "Recorded":
        super().start()
        self.starts.append(self.started_at)
        return self


def counting_child(counter: Path, script: str) -> list[str]:
    """``sh`` that counts its runs in ``counter`` (as $n) and then runs ``script``."""
    return ["sh", "-c", f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"; {script}']


def runs(counter: Path) -> int:
    try:
        return int(counter.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_supervise_restarts_with_growing_backoff_that_resets_after_a_stable_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stand-ins: 'flaky' crashes at once, except its 4th run stays up past stable_after and its 6th for good;
    'broken' always crashes (its backoff must stop at the cap)."""
    flaky_n, broken_n = tmp_path / "flaky", tmp_path / "broken"
    flaky = Recorded("flaky", counting_child(flaky_n, 'if [ $n -eq 4 ]; then sleep 2; fi; if [ $n -ge 6 ]; then exec sleep 60; fi; exit 3'))
    broken = Recorded("broken", counting_child(broken_n, "exit 4"))
    svcs: list[Service] = [flaky.start(), broken.start()]
    stop_flag = [False]
    caplog.set_level(logging.ERROR, logger="stack.up")
    sup = threading.Thread(target=up.supervise, args=(svcs, stop_flag),
                           kwargs={"base_backoff": 0.2, "max_backoff": 0.8, "stable_after": 1.0, "poll": 0.05}, daemon=True)
    sup.start()
    try:
        wait_until(lambda: runs(flaky_n) >= 6 and flaky.running and runs(broken_n) >= 5, 60, 0.1,
                   "the stand-ins to be restarted after each crash")
    finally:
        stop_flag[0] = True
        sup.join(timeout=5)
        stop_all(svcs)
    assert not sup.is_alive()

    def delays(name: str) -> list[float]:
        return [float(m.group(1)) for r in caplog.records
                if r.getMessage().startswith(f"{name} exited") and (m := re.search(r"restarting in ([\d.]+)s", r.getMessage()))]

    # Doubles per crash in a row; the 4th run stayed up 2 s > stable_after, so the 4th crash starts over.
    assert delays("flaky")[:5] == [0.2, 0.4, 0.8, 0.2, 0.4], caplog.text
    assert delays("broken")[:4] == [0.2, 0.4, 0.8, 0.8], caplog.text
    # The restarts really waited that long (and really happened: one start per run).
    for svc, ds in ((flaky, delays("flaky")), (broken, delays("broken"))):
        gaps = [b - a for a, b in zip(svc.starts, svc.starts[1:])]
        assert len(gaps) >= 4 and all(g >= d for g, d in zip(gaps, ds)), (gaps, ds)
        assert svc.restarts == len(svc.starts) - 1


def test_supervise_stops_at_once_while_a_restart_is_pending(tmp_path: Path) -> None:
    """A stop request (what Ctrl-C/SIGTERM set) ends supervision without waiting out a long backoff."""
    dead = Service("dead", counting_child(tmp_path / "n", "exit 1")).start()
    stop_flag = [False]
    sup = threading.Thread(target=up.supervise, args=([dead], stop_flag), kwargs={"base_backoff": 30.0, "poll": 0.05}, daemon=True)
    sup.start()
    wait_until(lambda: not dead.running, 10, 0.05, "the stand-in to exit")
    time.sleep(0.3)  # the 30 s restart is now scheduled
    t0 = time.monotonic()
    stop_flag[0] = True
    sup.join(timeout=5)
    assert not sup.is_alive() and time.monotonic() - t0 < 2.0
    assert runs(tmp_path / "n") == 1


def pids(log: str) -> dict[str, list[int]]:
    """Every pid the launcher started, per service, in order."""
    out: dict[str, list[int]] = {}
    for name, pid in STARTED.findall(log):
        out.setdefault(name, []).append(int(pid))
    return out


def whole(svc: Service) -> str:
    """All of a service's log so far."""
    assert svc.log_path is not None
    return svc.log_path.read_text("utf-8", "replace")


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_launcher_restarts_each_service_killed_with_sigkill(tiny_models: Path, tmp_path: Path) -> None:
    """kill -9 anti_sus, gallery_bridge and nomad under `make up`: each comes back with a new pid, the servers
    answer again (their own new child, by pid when the reply carries it), and one SIGTERM then stops everything."""
    a_port, g_port = free_port(), free_port()
    endpoints = {"anti_sus": f"tcp://127.0.0.1:{a_port}", "gallery_bridge": f"tcp://127.0.0.1:{g_port}"}
    with Emulator() as emu:
        argv = python_module("stack.up", "--skip-models", "--models", str(tiny_models), "--gallery", str(tmp_path / "gallery"),
                             "--state-dir", str(tmp_path / "state"), "--anti-sus-port", str(a_port), "--gallery-port", str(g_port),
                             "--", *emu.nomad_args(), "--interval", "3600", "--deadline", "3", "--http-retries", "0")
        launcher = Service("up", argv, tmp_path / "up.log", env=emu.nomad_env()).start()
        seen: list[int] = []
        try:
            wait_until(lambda: "mining into" in whole(launcher) or not launcher.running, 180, 0.5, "the launcher to be up")
            assert launcher.running, launcher.tail(60)
            for name in ("anti_sus", "gallery_bridge", "nomad"):
                old = pids(whole(launcher))[name][-1]
                os.kill(old, signal.SIGKILL)
                wait_until(lambda: pids(whole(launcher))[name][-1] != old or not launcher.running, 60, 0.2,
                           f"{name} to be restarted after kill -9")
                assert launcher.running, launcher.tail(60)
                new = pids(whole(launcher))[name][-1]
                assert new != old and alive(new)
                assert re.search(rf"{name} exited with code -9 .*restarting in 1\.0s", whole(launcher)), launcher.tail(60)
                if name in endpoints:
                    def back() -> bool:
                        reply = up.info(name, endpoints[name])
                        return reply is not None and reply.get("pid", new) == new
                    wait_until(back, 120, 0.5, f"the restarted {name} to answer")
                    assert up.answers(name, endpoints[name])
            seen = [p for ps in pids(whole(launcher)).values() for p in ps]
            launcher.proc.send_signal(signal.SIGTERM)
            assert launcher.proc.wait(timeout=120) == 0, launcher.tail(60)
        finally:
            launcher.stop()
    assert len(seen) >= 6
    assert not [p for p in seen if alive(p)], "a child outlived the launcher"


def run_launcher(tiny_models: Path, tmp_path: Path, a_port: int, g_port: int, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    argv = python_module("stack.up", "--skip-models", "--models", str(tiny_models), "--gallery", str(tmp_path / "gallery"),
                         "--state-dir", str(tmp_path / "state"), "--anti-sus-port", str(a_port), "--gallery-port", str(g_port),
                         "--", "--listing", "r/EarthPorn/new", "--interval", "3600")
    t0 = time.monotonic()
    # A launcher that wrongly reports ready never exits: the timeout turns that into a failure.
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return out, time.monotonic() - t0


def error_text(stderr: str) -> str:
    """The launcher's own error message (after the children's log lines)."""
    at = stderr.rfind("\nerror: ") + 1 if not stderr.startswith("error: ") else 0
    assert stderr.startswith("error: ") or at > 0, stderr[-3000:]
    return stderr[at:]


def test_launcher_refuses_an_anti_sus_that_is_not_its_own(tiny_models: Path, tmp_path: Path) -> None:
    """Another anti_sus already on the port answers the pings; the launcher must not call it ready."""
    port = free_port()
    stranger = Service("stranger", python_module("anti_sus", "serve", "--models", str(tiny_models), "--bind", f"tcp://127.0.0.1:{port}"),
                       tmp_path / "stranger.log", env={"ANTI_SUS_INSTANCE": "somebody-else"}).start()
    try:
        wait_until(lambda: up.answers("anti_sus", f"tcp://127.0.0.1:{port}") or not stranger.running, 120, 0.5, "the stranger")
        assert stranger.running, stranger.tail()
        with FilterClient(f"tcp://127.0.0.1:{port}", timeout=10, retries=0) as client:
            reply = client.info()
        out, took = run_launcher(tiny_models, tmp_path, port, free_port())
    finally:
        stranger.stop()
    assert out.returncode == 1, out.stderr[-3000:]
    err = error_text(out.stderr)
    pid = reply.get("pid", "unknown")
    assert f"error: port {port} is answered by another anti_sus (pid {pid}), not ours: stop it or choose --anti-sus-port" in err
    assert "Traceback" not in out.stderr and "started nomad" not in out.stderr and "mining into" not in out.stderr
    assert took < 60


@pytest.fixture
def fake_gallery_bridge() -> Iterator[int]:
    """A ZeroMQ ROUTER on a loopback port answering ping/info as a gallery_bridge of somebody else's (pid 4242)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()

    def serve() -> None:
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            frames = sock.recv_multipart()
            try:
                rid = request_id(parse_header(frames[-1]))
            except Exception:  # noqa: BLE001 - a stand-in answers whatever it can
                rid = None
            sock.send_multipart([*frames[:-1], ok_reply(rid, pong=True, version="0", instance="not-yours", pid=4242)])

    try:
        with background(serve, done.set, join_timeout=5):
            yield port
    finally:
        sock.close(0)
        ctx.term()


def test_gallery_bridge_port_answered_by_a_stranger(tiny_models: Path, tmp_path: Path, fake_gallery_bridge: int) -> None:
    """Same on the gallery port; our own child dies with "Address already in use", which is quoted too."""
    out, took = run_launcher(tiny_models, tmp_path, free_port(), fake_gallery_bridge)
    assert out.returncode == 1, out.stderr[-3000:]
    err = error_text(out.stderr)
    assert (f"error: port {fake_gallery_bridge} is answered by another gallery_bridge (pid 4242), not ours: "
            "stop it or choose --gallery-port") in err
    assert "started nomad" not in out.stderr and "Traceback" not in out.stderr
    assert took < 90


def test_child_that_dies_at_start_is_reported_with_its_last_words(tiny_models: Path, tmp_path: Path) -> None:
    """A non-ZeroMQ listener holds the port: no one answers, our anti_sus exits, the launcher quotes why."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out, took = run_launcher(tiny_models, tmp_path, port, free_port())
    assert out.returncode == 1, out.stderr[-3000:]
    err = error_text(out.stderr)
    assert re.match(r"error: anti_sus exited during start-up with code [1-9]\d*; its last messages:\n", err), err
    assert re.search(r"\n  \| .*Address already in use", err), err
    assert "started gallery_bridge" not in out.stderr and "Traceback" not in out.stderr
    assert took < 60
