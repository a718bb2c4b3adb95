"""The loop, end to end with tiny models: label images, ``anti-sus learn``, reload a running server, new decisions.

A client streams requests through the swap; none may fail or go unanswered.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anti_sus.cli import main
from anti_sus.client import FilterClient
from anti_sus.pipeline import Pipeline
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits

from .test_anti_sus_learn_support import fresh_copy, make_folders, wire_batch
from .test_anti_sus_models import free_port, spawn, stop, wait_ping
from .test_anti_sus_support import LOOPBACK, running


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folders(tmp_path_factory.mktemp("labels"), 20, 20)


@pytest.fixture
def models(tiny_onnx_models: Path, tmp_path: Path) -> Path:
    return fresh_copy(tiny_onnx_models, tmp_path / "models")


class Stream:
    """A client sending small requests back to back in a thread until stopped; counts answers and failures."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ok = 0
        self.failures: list[str] = []
        self.answered_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        with FilterClient(self.endpoint, timeout=60, retries=0) as c:
            while not self._stop.is_set():
                batch = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
                try:
                    res = c.filter(batch)
                    assert len(res.results) == 3
                    self.ok += 1
                    self.answered_at.append(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - every failure is what the test reports
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=90)
        assert not self._thread.is_alive()


def test_label_learn_reload_op_new_decisions_nothing_dropped(models: Path, folders: Path) -> None:
    good, bad = wire_batch(folders / "good", 6), wire_batch(folders / "bad", 6)

    def loader() -> Pipeline:  # the GMM lets everything through, no watermark: only a learnt probe can reject
        return Pipeline.load(models, gmm_threshold=-1e9, no_watermark=True)

    server = FilterServer(loader(), ServerConfig(binds=[LOOPBACK], limits=Limits(16, 512 * 512), loader=loader))
    with running(server) as ep, FilterClient(ep, timeout=60, retries=0) as c:
        assert {r.verdict for r in c.filter(bad).results} == {"good"}  # decided one way: the bad ones pass
        assert main(["learn", "--labels", str(folders), "--models", str(models), "--folds", "4"]) == 0
        assert {r.verdict for r in c.filter(bad).results} == {"good"}  # learnt, not yet reloaded
        with Stream(ep) as stream:
            time.sleep(0.5)
            swapped_at = time.monotonic()
            reply = c.reload()
            time.sleep(1.0)
        assert reply["generation"] == 2 and c.info()["probe_stage"] is True
        assert stream.failures == [] and stream.ok > 0
        assert any(t < swapped_at for t in stream.answered_at) and any(t > swapped_at for t in stream.answered_at)
        # Now decided as labelled: the bad ones by the probe, the good ones kept.
        res = c.filter(bad)
        assert {(r.verdict, r.rejected_by) for r in res.results} == {("probe", "probe")}
        assert {r.verdict for r in c.filter(good).results} == {"good"}


def test_label_export_learn_sighup_new_decisions(models: Path, folders: Path, tmp_path: Path) -> None:
    """The same loop from a labels.npz (the gallery's `labels export` layout) and SIGHUP to a real `anti-sus serve`."""
    good, bad = wire_batch(folders / "good", 6), wire_batch(folders / "bad", 6)
    p = Pipeline.load(models, no_watermark=True)
    everything = np.concatenate([wire_batch(folders / "good", 20), wire_batch(folders / "bad", 20)])
    feats = p.embed(p.clip_input(everything))
    labels = tmp_path / "labels.npz"
    np.savez(labels, features=feats.astype(np.float32), labels=np.array([1] * 20 + [0] * 20, np.int8),
             keys=np.array([f"g{i}" for i in range(40)]), feature_model_sha256=np.array(p.details["clip"]["sha256"]))
    ep = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn("serve", "--models", str(models), "--bind", ep, "--gmm-threshold=-1e9", "--no-watermark")
    try:
        wait_ping(ep, proc)
        with FilterClient(ep, timeout=60, retries=0) as c:
            assert {r.verdict for r in c.filter(bad).results} == {"good"}
            assert main(["learn", "--labels", str(labels), "--models", str(models), "--folds", "4"]) == 0
            with Stream(ep) as stream:
                time.sleep(0.5)
                proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 60
                while c.info()["generation"] != 2:
                    assert time.monotonic() < deadline, "SIGHUP did not reload"
                    time.sleep(0.2)
                time.sleep(0.5)
            assert stream.failures == [] and stream.ok > 0
            assert {r.verdict for r in c.filter(bad).results} == {"probe"}
            assert {r.verdict for r in c.filter(good).results} == {"good"}
    finally:
        code, err = stop(proc)
    assert code == 0, err
