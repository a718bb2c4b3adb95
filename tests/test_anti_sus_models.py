"""anti_sus with the real (tiny) models: pipeline, model-directory checks, CLI processes, scale-out, tools."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from anti_sus.client import FilterClient
from anti_sus.modeldir import ModelDirError, artifact_entry, read_manifest, write_manifest
from anti_sus.pipeline import Pipeline, Task, evaluate
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import LEGACY_IMAGE_BYTES

from .test_anti_sus_support import LOOPBACK, running

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anti_sus", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def spawn(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "anti_sus", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_ping(endpoint: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    with FilterClient(endpoint, timeout=1, retries=0) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                c.ping()
                return
            except Exception:
                continue
    raise AssertionError(f"{endpoint} never answered")


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def photos(n: int, seed: int = 0, size: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, 1, 1, 3))
    noise = rng.integers(-30, 30, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pipeline(tiny_models: Path) -> Pipeline:
    return Pipeline.load(tiny_models)


def copy_models(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pipeline_loads_tiny_models_and_scores(pipeline: Pipeline, tiny_models: Path):
    meta = json.loads((tiny_models / "gmm.json").read_text())
    assert pipeline.gmm_threshold == pytest.approx(meta["suggested_threshold"])
    assert pipeline.has_watermark
    b = photos(5)
    [oc] = evaluate(pipeline, [Task(b, -1e9, 0.5)], watermark_all=False)
    assert oc.features.shape == (5, pipeline.clip.dim)
    assert np.linalg.norm(oc.features, axis=1) == pytest.approx(1.0, abs=1e-4)  # CLIP features arrive L2-normalised
    assert np.all(~np.isnan(oc.watermark)) and np.all((oc.watermark > 0) & (oc.watermark < 1))
    # a batch of several tasks gives the same numbers as each task alone
    [a, c] = evaluate(pipeline, [Task(b[:2], -1e9, 0.5), Task(b[2:], 1e9, 0.5)])
    assert np.allclose(np.r_[a.gmm, c.gmm], oc.gmm, atol=1e-3)
    assert c.verdicts == ["outlier"] * 3 and np.isnan(c.watermark).all()


def test_server_with_tiny_models_matches_in_process(pipeline: Pipeline):
    b = photos(6, seed=1)
    [ref] = evaluate(pipeline, [Task(b, -1e9, 0.5)])
    threshold = float(np.median(ref.gmm))
    server = FilterServer(pipeline, ServerConfig(binds=[LOOPBACK]))
    with running(server) as ep, FilterClient(ep, timeout=30) as c:
        r = c.filter(b, gmm_threshold=threshold, watermark_threshold=1.0, return_features=True)
        expected_good = [i for i, g in enumerate(ref.gmm) if g >= threshold]
        assert r.good == expected_good and 0 < len(r.good) < 6
        assert [x.gmm for x in r.results] == pytest.approx(ref.gmm.tolist(), abs=1e-3)
        assert r.features is not None and np.allclose(r.features, ref.features[expected_good], atol=1e-4)
        info = c.info()
        assert info["models"]["clip"]["sha256"] == read_manifest(pipeline.details["models_dir"])["artifacts"]["clip"]["sha256"]
        # another image size goes through the same preprocessing contract
        small = photos(2, seed=2, size=300)
        assert len(c.filter(small).results) == 2


def test_legacy_client_with_tiny_models(pipeline: Pipeline):
    import zmq

    b = photos(3, seed=3)
    [ref] = evaluate(pipeline, [Task(b, pipeline.gmm_threshold, pipeline.watermark_threshold)])
    ctx = zmq.Context()
    try:
        with running(FilterServer(pipeline, ServerConfig(binds=[LOOPBACK]))) as ep:
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(ep)
            req.send(b.tobytes())
            assert req.poll(30000)
            reply = req.recv_multipart()
        assert len(reply) == 1 and len(b.tobytes()) == 3 * LEGACY_IMAGE_BYTES
        assert np.frombuffer(reply[0], "<i4").tolist() == ref.good
    finally:
        ctx.destroy(linger=0)


def test_model_dir_problems_stop_the_server_with_the_build_command(tiny_models: Path, tmp_path: Path):
    r = cli("serve", "--models", str(tmp_path / "nowhere"), "--bind", "tcp://127.0.0.1:*")
    assert r.returncode == 2 and "python -m models" in r.stderr and "Traceback" not in r.stderr
    bad = copy_models(tiny_models, tmp_path / "tampered")
    with open(bad / "clip_visual.onnx", "ab") as f:
        f.write(b"\0")
    r = cli("serve", "--models", str(bad), "--bind", "tcp://127.0.0.1:*")
    assert r.returncode == 2 and "does not match the manifest" in r.stderr and "models.export_clip" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("serve", "--models", str(tiny_models), "--int8", "--bind", "tcp://127.0.0.1:*")
    assert r.returncode == 2 and "clip_int8" in r.stderr and "--int8" in r.stderr


def test_gmm_fitted_on_another_clip_is_refused(tiny_models: Path, tmp_path: Path):
    d = copy_models(tiny_models, tmp_path / "other")
    meta = json.loads((d / "gmm.json").read_text())
    meta["feature_model_sha256"] = "0" * 64
    (d / "gmm.json").write_text(json.dumps(meta))
    write_manifest(d, {"gmm_meta": artifact_entry(d, "gmm.json", kind="json")})
    with pytest.raises(ModelDirError, match="another CLIP model"):
        Pipeline.load(d)


def test_int8_and_missing_watermark_are_reported(tiny_models: Path, tmp_path: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = copy_models(tiny_models, tmp_path / "int8")
    quantize_dynamic(str(d / "clip_visual.onnx"), str(d / "clip_visual.int8.onnx"), weight_type=QuantType.QInt8)
    clip_entry = read_manifest(d)["artifacts"]["clip"]
    entry = artifact_entry(d, "clip_visual.int8.onnx", **{k: v for k, v in clip_entry.items() if k not in ("file", "sha256", "bytes")})
    manifest = read_manifest(d)["artifacts"]
    manifest.pop("watermark")
    manifest["clip_int8"] = entry
    write_manifest(d, manifest, merge=False)
    p = Pipeline.load(d, int8=True)
    info = p.info()
    assert info["models"]["clip"]["artifact"] == "clip_int8"
    assert not p.has_watermark and info["watermark_stage"] is False
    notes = " ".join(info["models"]["notes"])
    assert "fp32" in notes and "no watermark model" in notes
    [oc] = evaluate(p, [Task(photos(2), -1e9, 0.5)])
    assert oc.verdicts == ["good", "good"] and np.isnan(oc.watermark).all()
    assert Pipeline.load(tiny_models, no_watermark=True).has_watermark is False


def test_serve_process_ping_info_metrics_json_logs_and_sigterm(tiny_models: Path):
    port, mport = free_port(), free_port()
    ep = f"tcp://127.0.0.1:{port}"
    proc = spawn("serve", "--bind", ep, "--metrics-port", str(mport), "--log-format", "json", "--threads", "1",
                 env={"ANTI_SUS_MODELS": str(tiny_models), "ANTI_SUS_WATERMARK_THRESHOLD": "0.7",
                      "ANTI_SUS_INSTANCE": "launcher-token-1"})
    try:
        wait_ping(ep, proc)
        assert cli("ping", "--server", ep).returncode == 0
        r = cli("info", "--server", ep)
        assert r.returncode == 0 and json.loads(r.stdout)["thresholds"]["watermark"] == 0.7  # env var read
        # a launcher can tell its own server: the pid and the token it passed
        assert json.loads(r.stdout)["pid"] == proc.pid and json.loads(r.stdout)["instance"] == "launcher-token-1"
        with FilterClient(ep, timeout=30) as c:
            c.filter(photos(2))
        text = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
        assert 'anti_sus_requests_total{op="filter",outcome="ok"} 1.0' in text
        assert "anti_sus_images_total" in text and 'anti_sus_stage_seconds_count{stage="clip"}' in text
    finally:
        code, err = stop(proc)
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("serving on" in x["msg"] for x in lines) and any("stopped" in x["msg"] for x in lines)
    r = cli("ping", "--server", ep, "--timeout", "0.3", "--retries", "0")
    assert r.returncode == 1 and "no reply" in r.stderr


def test_broker_two_worker_processes_kill_one_mid_stream(tiny_models: Path):
    front, back = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = {"ANTI_SUS_MODELS": str(tiny_models), "ANTI_SUS_THREADS": "1"}
    broker = spawn("broker", "--frontend", front, "--backend", back)
    workers = [spawn("serve", "--connect", back, env=env) for _ in range(2)]
    try:
        b = photos(2, seed=5)
        with FilterClient(front, timeout=3, retries=5) as c:
            wait_ping(front, broker)
            ref = c.filter(b, gmm_threshold=-1e9).results
            # both workers must announce themselves before the stream starts
            deadline = time.monotonic() + 60
            seen: set[int] = set()
            answered = 0
            killed = False
            while answered < 16:
                assert time.monotonic() < deadline, "stream did not finish"
                r = c.filter(b, gmm_threshold=-1e9)
                assert [x.gmm for x in r.results] == pytest.approx([x.gmm for x in ref], abs=1e-3)
                answered += 1
                if answered == 6 and not killed:
                    workers[0].kill()  # dies whenever: the next request it holds is retried by the client
                    killed = True
        assert killed and answered == 16
        assert workers[1].poll() is None
    finally:
        for w in workers:
            stop(w)
        code, err = stop(broker)
    assert code == 0, err
    # the broker's last line counts requests per worker: both workers had a share of the stream
    counts = [int(x.split("=")[1]) for x in err.split("requests forwarded per worker:")[1].split()]
    assert len(counts) == 2 and min(counts) >= 3, err


def test_score_in_process_and_through_server(tiny_models: Path, tmp_path: Path):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, arr in enumerate(photos(3, seed=7, size=64)):
        Image.fromarray(arr).save(imgs / f"{i}.jpg")
    (imgs / "broken.jpg").write_bytes(b"not a jpeg")
    r = cli("score", str(imgs), "--models", str(tiny_models), "--gmm-threshold=-1e9")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [Path(x["path"]).name for x in rows] == ["0.jpg", "1.jpg", "2.jpg", "broken.jpg"]
    assert rows[3]["verdict"] == "error" and rows[3]["error"]
    assert all(x["verdict"] in ("good", "watermark") for x in rows[:3])
    local = [float(x["gmm"]) for x in rows[:3]]
    port = free_port()
    proc = spawn("serve", "--bind", f"tcp://127.0.0.1:{port}", "--models", str(tiny_models), "--threads", "1")
    try:
        wait_ping(f"tcp://127.0.0.1:{port}", proc)
        r = cli("score", str(imgs), "--server", f"tcp://127.0.0.1:{port}", "--format", "json", "--gmm-threshold=-1e9")
    finally:
        stop(proc)
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    assert [x["gmm"] for x in remote[:3]] == pytest.approx(local, abs=1e-3)


def test_tune_reports_thresholds_and_writes_histogram(tiny_models: Path, tmp_path: Path):
    from PIL import Image

    from models import synth

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    for i, im in enumerate(synth.backgrounds(8, seed=11, size=128)):
        im.save(good / f"{i}.png")
    for i, arr in enumerate(photos(8, seed=12, size=128)):
        Image.fromarray(arr).save(bad / f"{i}.png")
    png, rep = tmp_path / "tune.png", tmp_path / "tune.json"
    r = cli("tune", "--models", str(tiny_models), "--good", str(good), "--bad", str(bad), "--watermarked", str(bad),
            "--clean", str(good), "--plot", str(png), "--json", str(rep), "--target-recall", "0.9")
    assert r.returncode == 0, r.stderr
    assert "suggested threshold" in r.stdout and png.stat().st_size > 1000
    report = json.loads(rep.read_text())
    gmm = report[0]
    assert gmm["stage"] == "gmm" and gmm["suggested"]["recall"] >= 0.9 and gmm["good"]["n"] == 8
    assert report[1]["stage"] == "watermark" and len(report[1]["table"]) >= 3
    r = cli("tune", "--models", str(tiny_models), "--good", str(good))
    assert r.returncode == 2 and "--bad" in r.stderr
