"""models.tiny builds a complete, verifiable model directory that honours the artifact contract."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import open_model_dir, verify
from anti_sus.preprocess import PreprocessSpec, clip_input, stack_wire, watermark_input
from anti_sus.stages.gmm import GmmScorer
from models import synth
from models.onnx_export import ort_session

REPO = Path(__file__).resolve().parent.parent


def _manifest_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models.manifest", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_tiny_contract(tiny_models: Path) -> None:
    arts = open_model_dir(tiny_models, required=("clip", "gmm", "gmm_meta", "watermark"))
    clip = arts["clip"].entry
    assert clip["input"] == {"name": "image", "shape": ["N", 3, 224, 224], "dtype": "float32"}
    assert clip["output"]["name"] == "features" and clip["output"]["normalized"] is True
    assert clip["provenance"]["parity"]["cosine"] >= 0.9999
    spec = PreprocessSpec.from_dict(clip["preprocess"])
    images = synth.backgrounds(5, seed=42, size=128)
    wire = stack_wire(images)
    sess = ort_session(arts["clip"].path)
    assert [i.name for i in sess.get_inputs()] == ["image"] and [o.name for o in sess.get_outputs()] == ["features"]
    feats = sess.run(None, {"image": clip_input(wire, spec)})[0]  # batch 5: the batch axis is dynamic
    assert feats.shape == (5, clip["output"]["dim"]) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)

    meta = json.loads(arts["gmm_meta"].path.read_text())
    scorer = GmmScorer.load(arts["gmm"].path)
    assert scorer.dim == meta["feature_dim"] == clip["output"]["dim"]
    assert meta["feature_model_sha256"] == clip["sha256"]
    assert meta["n_train"] >= 64 and meta["n_components"] == scorer.n_components
    scores = scorer.score(feats)
    assert np.isfinite(scores).all()
    p = meta["score_percentiles"]
    assert p["p1"] <= meta["suggested_threshold"] <= p["p99"]

    wm = arts["watermark"].entry
    assert wm["input"]["shape"] == ["N", 3, 512, 512] and wm["output"]["name"] == "logit"
    wsess = ort_session(arts["watermark"].path)
    logits = wsess.run(None, {"image": watermark_input(wire[:2], PreprocessSpec.from_dict(wm["preprocess"]))})[0]
    assert logits.shape == (2, 1) and logits.dtype == np.float32


def test_manifest_cli_verifies_and_names_tampered_and_missing_files(tiny_models: Path, tmp_path: Path) -> None:
    ok = _manifest_cli("verify", str(tiny_models))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout

    copy = tmp_path / "m"
    shutil.copytree(tiny_models, copy)
    data = bytearray((copy / "clip_visual.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    (copy / "clip_visual.onnx").write_bytes(bytes(data))
    (copy / "gmm.json").unlink()
    bad = _manifest_cli("verify", str(copy))
    assert bad.returncode == 1
    assert "clip_visual.onnx" in bad.stdout and "does not match" in bad.stdout
    assert "gmm.json" in bad.stdout and "missing" in bad.stdout
    assert verify(copy) and not verify(tiny_models)


def test_manifest_write_rehashes(tiny_models: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_models, copy)
    before = json.loads((copy / "manifest.json").read_text())
    with open(copy / "gmm.json", "a") as f:
        f.write("\n")
    assert verify(copy)
    res = _manifest_cli("write", str(copy))
    assert res.returncode == 0, res.stderr
    assert verify(copy) == []
    after = json.loads((copy / "manifest.json").read_text())
    assert after["artifacts"]["clip"] == before["artifacts"]["clip"]  # untouched entries keep their metadata
    assert after["artifacts"]["gmm_meta"]["sha256"] != before["artifacts"]["gmm_meta"]["sha256"]


@pytest.mark.slow
def test_tiny_cli_builds_quickly(tmp_path: Path) -> None:
    import time

    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "models.tiny", "--out", str(tmp_path / "t"), "--threads", "1", "--images", "64"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    assert verify(tmp_path / "t") == []
