"""The whole system end to end: real processes, real ZeroMQ, loopback, tiny models.

A fault-free run over the emulator is the reference. Each fault (kill -9 of
anti_sus, of gallery_bridge during an ingest, of nomad) is injected into an
otherwise identical run; afterwards the gallery must equal the reference (no
loss, no duplicate) and nothing already decided may have been downloaded again.
Two anti_sus workers behind the broker must give the same result too.

Thresholds are the models' own defaults, so anti_sus really rejects some images
(outliers, watermarks) and the gallery holds exactly the ones it accepted.
"""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest

from stack.procs import Service, free_port, python_module, stop_all, wait_until
from stack.emulator import Emulator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NOMAD_FAST = ["--deadline", "3", "--http-retries", "0", "--backoff-max", "1", "--batch-size", "2",
              "--batch-timeout", "1", "--anti-sus-timeout", "5", "--gallery-timeout", "5", "--workers", "2"]


def readonly(path: Path) -> sqlite3.Connection:
    """Read another process's SQLite database without ever creating or writing it."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

# In the fault tests nomad downloads one image at a time and sends single-image
# batches, so the fault lands with work both done and still to do.
ONE_AT_A_TIME = ["--workers", "1", "--batch-size", "1"]


@dataclass
class Run:
    """One run of the system in its own folder, against its own emulator."""

    tmp: Path
    models: Path
    emu: Emulator
    workers: int = 0  # 0: one anti_sus bound directly; N: a broker with N workers
    services: list[Service] = field(default_factory=list)
    anti_sus: list[Service] = field(default_factory=list)
    gallery: Service | None = None
    nomad_extra: tuple[str, ...] = ()
    logs: dict[int, Path] = field(default_factory=dict)  # nomad pid -> its stderr
    nomads: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.a_ep = f"tcp://127.0.0.1:{free_port()}"
        self.g_ep = f"tcp://127.0.0.1:{free_port()}"
        self.gallery_dir = self.tmp / "gallery"
        self.state = self.tmp / "state"

    def start_services(self, gallery_env: dict[str, str] | None = None) -> None:
        if self.workers:
            backend = f"tcp://127.0.0.1:{free_port()}"
            self.services.append(Service("broker", python_module("anti_sus", "broker", "--frontend", self.a_ep, "--backend", backend),
                                         self.tmp / "broker.log").start())
            for i in range(self.workers):
                self.anti_sus.append(Service(f"worker{i}", python_module("anti_sus", "serve", "--models", str(self.models),
                                                                         "--connect", backend, "--threads", "1"),
                                             self.tmp / f"worker{i}.log").start())
        else:
            self.anti_sus.append(Service("anti_sus", python_module("anti_sus", "serve", "--models", str(self.models),
                                                                   "--bind", self.a_ep, "--threads", "1"),
                                         self.tmp / "anti_sus.log").start())
        self.services += self.anti_sus
        self.gallery = Service("gallery_bridge", python_module("gallery_bridge", "serve", "--bind", self.g_ep,
                                                               "--target", f"folder:{self.gallery_dir}"),
                               self.tmp / "gallery.log", env=gallery_env or {}).start()
        self.services.append(self.gallery)

    def nomad(self, *extra: str) -> subprocess.Popen[bytes]:
        """``nomad once`` in the background; its stderr goes to a file the test can read while it runs."""
        cmd = python_module("nomad", "once", *self.emu.nomad_args(), "--state-dir", str(self.state),
                            "--anti-sus", self.a_ep, "--gallery", self.g_ep, *NOMAD_FAST, *self.nomad_extra, *extra)
        log = self.tmp / f"nomad-{len(self.logs)}.log"
        with open(log, "wb") as out:  # the child keeps its own handle
            proc = subprocess.Popen(cmd, env={**os.environ, **self.emu.nomad_env()}, stdout=subprocess.DEVNULL, stderr=out)
        self.logs[proc.pid] = log
        self.nomads.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text("utf-8", "replace")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float = 300) -> str:
        proc.wait(timeout=timeout)
        err = self.log(proc)
        assert proc.returncode == 0, err[-4000:] + "\n".join(s.tail() for s in self.services)
        return err

    def stop(self) -> None:
        """Every service, and any nomad still running (a failed test must not leave one behind)."""
        for proc in self.nomads:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        stop_all(self.services)

    # --- reading the outcome ---------------------------------------------------------
    def nomad_images(self) -> dict[str, tuple[str, str | None, str]]:
        """key -> (state, reason, url) from nomad's state DB."""
        with readonly(self.state / "nomad.sqlite3") as con:
            return {k: (s, r, u) for k, s, r, u in con.execute("SELECT key, state, reason, url FROM images")}

    def catalogue(self) -> tuple[dict[str, str], set[str], list[str]]:
        """(entry key -> sha256 of complete entries, alias keys, states of all entries)."""
        with readonly(self.gallery_dir / "catalogue.sqlite") as con:
            entries = {k: sha for k, sha in con.execute("SELECT key, sha256 FROM entries WHERE state='complete'")}
            aliases = {k for (k,) in con.execute("SELECT key FROM aliases")}
            states = [s for (s,) in con.execute("SELECT state FROM entries")]
        return entries, aliases, states


def check_invariants(run: Run) -> dict[str, object]:
    """Every post decided; the gallery holds exactly what anti_sus accepted, once each, no orphans."""
    images = run.nomad_images()
    scenario_posts = {p["id"] for p in run.emu.scenario.posts}
    with readonly(run.state / "nomad.sqlite3") as con:
        post_states = {pid.removeprefix("t3_"): s for pid, s in con.execute("SELECT post_id, state FROM posts")}
    undecided_posts = scenario_posts - {p for p, s in post_states.items() if s in ("expanded", "rejected")}
    assert not undecided_posts, f"posts without a decided outcome: {undecided_posts}"
    open_images = {k: v for k, v in images.items() if v[0] in ("pending", "accepted")}
    assert not open_images, f"images not decided or not delivered: {open_images}"

    accepted = {k for k, (state, _r, _u) in images.items() if state == "delivered"}
    entries, aliases, states = run.catalogue()
    assert all(s == "complete" for s in states), f"half-written entries left: {states}"
    assert set(entries) | aliases == accepted, "the gallery must hold exactly the images anti_sus accepted"
    assert len(set(entries.values())) == len(entries), "the same content twice"
    files = sorted(p.name for p in (run.gallery_dir / "images").iterdir())
    assert len(files) == len(entries), f"orphan or missing files: {files}"
    assert not [p for p in run.gallery_dir.rglob("*") if p.is_file() and re.search(r"\.(tmp|part)$|^\.", p.name)], "temporary files left"
    return {
        "accepted": sorted(accepted),
        "gallery": sorted(entries.values()),
        "rejected": sorted((k, r) for k, (s, r, _u) in images.items() if s == "rejected"),
    }


Fault = Callable[[Run, "subprocess.Popen[bytes]"], "subprocess.Popen[bytes]"]


def run_system(tmp: Path, models: Path, *, workers: int = 0, fault: Fault | None = None,
               gallery_env: dict[str, str] | None = None, nomad_extra: tuple[str, ...] = ()) -> Run:
    """One whole run over a fresh emulator; ``fault(run, nomad)`` is injected mid-run and
    returns the nomad process to wait for (the same one, or a restarted one)."""
    with Emulator() as emu:
        run = Run(tmp, models, emu, workers, nomad_extra=nomad_extra)
        try:
            run.start_services(gallery_env)
            proc = run.nomad(*ONE_AT_A_TIME) if fault else run.nomad()
            if fault:
                proc = fault(run, proc)
            run.finish(proc)
        finally:
            run.stop()
    return run


def run_clean(tmp: Path, models: Path, workers: int = 0) -> tuple[dict[str, object], Run]:
    run = run_system(tmp, models, workers=workers)
    return check_invariants(run), run


@pytest.fixture(scope="module")
def reference(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    result, _ = run_clean(tmp_path_factory.mktemp("e2e_reference"), tiny_models)
    # The run must be a real test of the filter: some accepted, some judged bad by anti_sus.
    assert len(result["accepted"]) >= 3
    assert any(r in ("outlier", "watermark") for _k, r in result["rejected"])
    return result


def wait_for(check, what: str, timeout: float = 120) -> None:
    wait_until(check, timeout, 0.2, what)


def judged_count(run: Run) -> int:
    """Images anti_sus has given a verdict on so far (0 before nomad's DB exists)."""
    try:
        return sum(1 for s, r, _u in run.nomad_images().values()
                   if s in ("accepted", "delivered") or r in ("outlier", "watermark"))
    except sqlite3.Error:
        return 0


def test_fault_free_run_is_complete_and_exact(reference: dict[str, object]) -> None:
    # The reference fixture already checked the invariants; a second clean run must agree with it.
    # The scenario's images are all distinct pictures: one gallery entry per accepted image, no alias.
    assert reference["gallery"] and len(reference["gallery"]) == len(reference["accepted"])


def wait_for_first_verdict(run: Run, proc: subprocess.Popen[bytes]) -> None:
    wait_for(lambda: judged_count(run) >= 1, "anti_sus's first verdict")
    assert proc.poll() is None, "nomad finished before the fault could be injected"


def test_kill9_anti_sus_mid_run(reference: dict[str, object], tiny_models: Path, tmp_path: Path) -> None:
    unavailable = "anti_sus unavailable"

    def fault(run: Run, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        wait_for_first_verdict(run, proc)
        before = run.log(proc).count(unavailable)
        run.anti_sus[0].kill9()
        # nomad's client has spent its own retries on the dead anti_sus; its patience must take over.
        wait_for(lambda: run.log(proc).count(unavailable) > before or proc.poll() is not None, "nomad to find anti_sus away")
        assert proc.poll() is None, "nomad gave up while anti_sus was away"
        run.anti_sus[0].start()
        return proc

    # Two 2 s attempts instead of two 5 s ones: the outage is noticed in ~4 s (single-image batches
    # of tiny models are answered in milliseconds).
    run = run_system(tmp_path, tiny_models, fault=fault, nomad_extra=("--anti-sus-timeout", "2"))
    assert check_invariants(run) == reference


def test_kill9_gallery_bridge_during_ingest(reference: dict[str, object], tiny_models: Path, tmp_path: Path) -> None:
    def fault(run: Run, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        wait_for(lambda: not run.gallery.running, "gallery_bridge to die inside an ingest")
        assert run.gallery.proc.returncode == -9
        assert proc.poll() is None, "nomad gave up while gallery_bridge was away"
        run.gallery.env = {}
        run.gallery.start()
        return proc

    # The test hook SIGKILLs gallery_bridge inside its first ingest, after the image
    # file is written but before the catalogue commit: the worst moment.
    run = run_system(tmp_path, tiny_models, fault=fault, gallery_env={"GALLERY_BRIDGE_TEST_CRASH_AT": "image"})
    assert check_invariants(run) == reference


def test_kill9_nomad_and_restart_downloads_nothing_twice(reference: dict[str, object], tiny_models: Path, tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def fault(run: Run, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        wait_for_first_verdict(run, proc)
        proc.kill()
        proc.wait(timeout=30)
        seen["killed_at"] = time.time()
        seen["decided"] = {k: v for k, v in run.nomad_images().items() if v[0] in ("delivered", "rejected")}
        assert seen["decided"]
        return run.nomad()

    run = run_system(tmp_path, tiny_models, fault=fault)
    decided_paths = {(urlsplit(u).hostname, urlsplit(u).path) for _s, _r, u in seen["decided"].values() if u}
    refetched = [(rec.host, rec.path) for rec in list(run.emu.requests)
                 if rec.time >= seen["killed_at"] and (rec.host, rec.path) in decided_paths]
    assert not refetched, f"decided images downloaded again after the restart: {refetched}"
    assert check_invariants(run) == reference


def test_two_workers_behind_the_broker_give_the_same_result(reference: dict[str, object], tiny_models: Path, tmp_path: Path) -> None:
    result, run = run_clean(tmp_path, tiny_models, workers=2)
    assert result == reference
    served = []
    for w in run.anti_sus:
        m = re.search(r"stopped after (\d+) images", w.tail(400))
        served.append(int(m.group(1)) if m else 0)
    assert all(n > 0 for n in served), f"every worker should have served work: {served}"
