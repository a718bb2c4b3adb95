"""models.fit_gmm: fits through the ONNX encoder and the preprocessing contract; clear errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import verify
from anti_sus.preprocess import CLIP_SPEC, clip_input, load_image, stack_wire, to_wire
from anti_sus.stages.gmm import GmmScorer
from models import synth
from models.fit_gmm import ClipModel, encode_paths, find_images
from models.onnx_export import run_onnx

REPO = Path(__file__).resolve().parent.parent


def _fit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "models.fit_gmm", "--threads", "1", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def models_copy(tiny_models: Path, tmp_path: Path) -> Path:
    d = tmp_path / "models"
    shutil.copytree(tiny_models, d)
    return d


@pytest.fixture(scope="module")
def good_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, img in enumerate(synth.backgrounds(30, seed=7, size=96)):
        folder = [root, root / "sub", root / "sub" / "deeper"][i % 3]
        img.save(folder / f"img{i}.{['jpg', 'png', 'webp'][i % 3]}")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_features_follow_the_contract(tiny_models: Path, good_images: Path) -> None:
    clip = ClipModel.from_dir(tiny_models)
    paths = find_images(good_images)
    assert len(paths) == 31  # 30 images + broken.jpg, recursive, txt ignored
    enc = encode_paths(paths, clip, batch_size=8, progress=False)
    assert [Path(p).name for p, _ in enc.failed] == ["broken.jpg"]
    good = [p for p in paths if p.name != "broken.jpg"]
    want = run_onnx(clip.path, clip_input(np.stack([to_wire(load_image(str(p))) for p in good[:4]]), CLIP_SPEC))
    np.testing.assert_allclose(enc.features[:4], want, atol=1e-5)


def test_fit_from_images_with_selection(models_copy: Path, good_images: Path) -> None:
    res = _fit("--models", str(models_copy), "--images", str(good_images), "--components", "2,3,40",
               "--select", "bic", "--covariance-type", "diag", "--threshold-percentile", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 1 unreadable" in res.stdout and "broken.jpg" in res.stdout
    meta = json.loads((models_copy / "gmm.json").read_text())
    assert meta["n_train"] == 30 and meta["n_skipped"] == 1
    assert [r["n_components"] for r in meta["selection"]] == [2, 3]  # 40 > 30 samples: left out
    best = min(meta["selection"], key=lambda r: r["bic"])["n_components"]
    assert meta["n_components"] == best and meta["covariance_type"] == "diag"
    assert meta["threshold_percentile"] == 10 and meta["suggested_threshold"] == pytest.approx(meta["score_percentiles"]["p10"])
    assert (models_copy / "gmm_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert verify(models_copy) == []
    GmmScorer.load(models_copy / "gmm.npz")


def test_fit_from_features_npy(models_copy: Path, tmp_path: Path) -> None:
    clip = ClipModel.from_dir(models_copy)
    wire = stack_wire(synth.backgrounds(20, seed=3, size=64))
    feats = run_onnx(clip.path, clip_input(wire, clip.spec))
    np.save(tmp_path / "f.npy", feats)
    res = _fit("--models", str(models_copy), "--features", str(tmp_path / "f.npy"), "--components", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    scorer = GmmScorer.load(models_copy / "gmm.npz")
    assert scorer.n_components == 2 and scorer.dim == feats.shape[1]
    np.save(tmp_path / "wrong.npy", np.zeros((20, 7), np.float32))
    res = _fit("--models", str(models_copy), "--features", str(tmp_path / "wrong.npy"))
    assert res.returncode == 2 and "expected features [N, 32]" in res.stderr


def test_error_cases(models_copy: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    res = _fit("--models", str(models_copy), "--images", str(empty))
    assert res.returncode == 2 and "no images" in res.stderr and "Traceback" not in res.stderr

    res = _fit("--models", str(models_copy), "--images", str(tmp_path / "missing"))
    assert res.returncode == 2 and "does not exist" in res.stderr

    few = tmp_path / "few"
    few.mkdir()
    for i, img in enumerate(synth.backgrounds(3, seed=1, size=64)):
        img.save(few / f"{i}.png")
    (few / "bad.png").write_bytes(b"garbage")
    res = _fit("--models", str(models_copy), "--images", str(few), "--components", "16")
    assert res.returncode == 2 and "only 3 images" in res.stderr and "skipped 1 unreadable" in res.stdout

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"nope")
    res = _fit("--models", str(models_copy), "--images", str(only_bad))
    assert res.returncode == 2 and "could be read" in res.stderr

    res = _fit("--models", str(tmp_path / "nomodels"), "--images", str(few))
    assert res.returncode == 2 and "manifest.json" in res.stderr

    res = _fit("--models", str(models_copy), "--images", str(few), "--components", "2,3")
    assert res.returncode == 2 and "--select" in res.stderr
