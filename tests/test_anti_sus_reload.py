"""Hot reload: the ``reload`` op and SIGHUP load the model directory beside the old models and swap between batches."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from anti_sus.client import AntiSusError, FilterClient
from anti_sus.cli import main
from anti_sus.modeldir import manifest_hash, write_pipeline
from anti_sus.pipeline import Pipeline
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits
from photocore.curve import keygen

from .test_anti_sus_learn_support import fresh_copy
from .test_anti_sus_models import free_port, spawn, stop, wait_ping
from .test_anti_sus_support import LOOPBACK, running


@pytest.fixture
def models(tiny_onnx_models: Path, tmp_path: Path) -> Path:
    return fresh_copy(tiny_onnx_models, tmp_path / "models")


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def server_for(models: Path, **cfg: object) -> FilterServer:
    def loader() -> Pipeline:
        return Pipeline.load(models, gmm_threshold=1e9)  # every image an outlier while the GMM is listed

    return FilterServer(loader(), ServerConfig(binds=[LOOPBACK], limits=Limits(16, 512 * 512), loader=loader, **cfg))  # type: ignore[arg-type]


def test_reload_swaps_to_the_new_directory_and_info_shows_it(models: Path) -> None:
    server = server_for(models)
    with running(server) as ep, FilterClient(ep, timeout=30, retries=0) as c:
        before = c.info()
        assert before["generation"] == 1 and before["manifest_sha256"] == manifest_hash(models)
        assert {r.verdict for r in c.filter(images()).results} == {"outlier"}
        write_pipeline(models, ["clip"])  # the new directory judges by CLIP alone: every image good
        reply = c.reload()
        assert reply["generation"] == 2 and reply["manifest_sha256"] == manifest_hash(models) != before["manifest_sha256"]
        after = c.info()
        assert after["generation"] == 2 and after["manifest_sha256"] == reply["manifest_sha256"]
        assert [s["name"] for s in after["stages"]] == ["clip"]
        assert {r.verdict for r in c.filter(images()).results} == {"good"}


def test_a_bad_directory_keeps_the_old_models_and_answers_an_error(models: Path) -> None:
    server = server_for(models)
    with running(server) as ep, FilterClient(ep, timeout=30, retries=0) as c:
        first = c.info()["manifest_sha256"]
        (models / "gmm.npz").write_bytes(b"tampered")  # fails the sha256 check, as at startup
        with pytest.raises(AntiSusError) as err:
            c.reload()
        assert err.value.code == "reload_failed"
        assert "old models keep serving" in str(err.value) and "gmm" in str(err.value)
        info = c.info()
        assert info["generation"] == 1 and info["manifest_sha256"] == first
        assert {r.verdict for r in c.filter(images()).results} == {"outlier"}  # still the old models


def test_reload_cli_prints_one_line_and_fails_cleanly(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = server_for(models)
    with running(server) as ep:
        assert main(["reload", "--server", ep, "--timeout", "30"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"reloaded {ep}: generation 2, manifest ") and out.count("\n") == 1
        (models / "manifest.json").write_text("{")  # not JSON: refused like at startup
        assert main(["reload", "--server", ep, "--timeout", "30", "--retries", "0"]) != 0
        err = capsys.readouterr().err
        assert "reload failed" in err and "Traceback" not in err


def test_only_admin_keys_may_reload_with_curve(models: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    server_pub, server_secret = keygen(keys, "server")
    admin_pub, admin_secret = keygen(keys, "admin")
    _, user_secret = keygen(keys, "user")
    from anti_sus.cli.serve import admin_keys

    server = server_for(models, curve_secret_key=server_secret, admin_keys=admin_keys(admin_pub))
    with running(server) as ep:
        with FilterClient(ep, timeout=30, retries=0, curve_server_key=server_pub, curve_client_keys=user_secret) as c:
            assert c.filter(images(1)).results  # an ordinary client may filter…
            with pytest.raises(AntiSusError) as err:  # …but not reload
                c.reload()
            assert err.value.code == "forbidden" and "--admin-allow" in str(err.value)
            assert c.info()["generation"] == 1
        with FilterClient(ep, timeout=30, retries=0, curve_server_key=server_pub, curve_client_keys=admin_secret) as c:
            assert c.reload()["generation"] == 2


def test_sighup_reloads_and_a_bad_directory_logs_one_line(models: Path) -> None:
    ep = f"tcp://127.0.0.1:{free_port()}"
    proc = spawn("serve", "--models", str(models), "--bind", ep, "--gmm-threshold", "1e9", "--log-level", "INFO")
    try:
        wait_ping(ep, proc)
        with FilterClient(ep, timeout=30, retries=0) as c:
            assert c.info()["generation"] == 1
            write_pipeline(models, ["clip"])
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while c.info()["generation"] != 2:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.2)
            assert {r.verdict for r in c.filter(images()).results} == {"good"}
            (models / "gmm.npz").unlink()
            write_pipeline(models, ["clip", "gmm"])  # names a stage whose files are gone
            proc.send_signal(signal.SIGHUP)
            time.sleep(3)
            assert c.info()["generation"] == 2 and proc.poll() is None  # old models kept, server alive
            assert {r.verdict for r in c.filter(images()).results} == {"good"}
    finally:
        code, err = stop(proc)
    failed = [line for line in err.splitlines() if "reload failed" in line]
    assert len(failed) == 1 and "still serving generation 2" in failed[0], err


def test_the_batch_in_flight_finishes_on_the_old_models() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from .test_anti_sus_support import FakeStages, image

    old, new = FakeStages(gmm_threshold=100.0, delay=1.5), FakeStages(gmm_threshold=10.0)
    server = FilterServer(old, ServerConfig(binds=[LOOPBACK], limits=Limits(16, 512 * 512), loader=lambda: new))
    batch = np.stack([image(50)])  # GMM score 50: an outlier for the old threshold, good for the new one
    with running(server) as ep, ThreadPoolExecutor(1) as pool, FilterClient(ep, timeout=30, retries=0) as c:
        def send() -> object:
            with FilterClient(ep, timeout=30, retries=0) as other:
                return other.filter(batch)

        in_flight = pool.submit(send)
        deadline = time.monotonic() + 10
        while not old.batches:  # the old pipeline has the batch in hand
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert c.reload()["generation"] == 2  # answered while the old batch is still computing
        first = in_flight.result(timeout=30)
        assert first.thresholds == {"gmm": 100.0, "watermark": 0.5} and [r.verdict for r in first.results] == ["outlier"]
        second = c.filter(batch)
        assert second.thresholds is not None and second.thresholds["gmm"] == 10.0
        assert [r.verdict for r in second.results] == ["good"] and new.batches == [1]


def test_admin_allow_needs_curve_and_public_keys(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pub, secret = keygen(tmp_path / "keys", "admin")
    for argv, says in ((["--admin-allow", str(pub)], "--admin-allow needs --curve-secret-key"),
                       (["--admin-allow", str(secret)], "holds a secret key")):
        assert main(["serve", "--models", str(models), "--bind", "tcp://127.0.0.1:*", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
