"""``anti-sus learn``: folders and labels.npz in, a cross-validated report, a plot, probe.npz and its manifest entry out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anti_sus.cli import main
from anti_sus.learn import choose_threshold, metrics_at
from anti_sus.modeldir import read_manifest, sha256_file, verify
from anti_sus.stages.probe import ProbeStage

from .test_anti_sus_learn_support import fresh_copy, make_folders, separable_npz

DIM = 32  # models.tiny_onnx's CLIP feature dimension


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folders(tmp_path_factory.mktemp("labels"), 24, 24)


@pytest.fixture
def models(tiny_onnx_models: Path, tmp_path: Path) -> Path:
    return fresh_copy(tiny_onnx_models, tmp_path / "models")


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``anti-sus`` expecting a refusal: exit 2 and exactly one line on stderr; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("anti-sus: error: "), err
    return err


def test_learn_from_folders_reports_plots_and_writes_the_probe(models: Path, folders: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    gmm_before = sha256_file(models / "gmm.npz")
    assert main(["learn", "--labels", str(folders), "--models", str(models), "--folds", "4"]) == 0
    out = capsys.readouterr().out
    assert "labels: 24 good, 24 bad" in out
    assert "4-fold cross-validation at threshold" in out and "precision" in out and "F1" in out
    assert "threshold  precision  recall  kept" in out and "<- chosen" in out
    # The plot is a real PNG next to the report.
    png = models / "probe_pr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((models / "probe_report.json").read_text())
    assert report["n_good"] == 24 and report["folds"] == 4 and len(report["folds_metrics"]) == 4
    assert {"threshold", "precision", "recall", "kept"} <= set(report["table"][0])
    # Plain arrays, no pickle needed; the manifest lists it with its threshold and the directory still verifies.
    with np.load(models / "probe.npz", allow_pickle=False) as z:
        assert z["coef"].shape == (DIM,) and z["coef"].dtype == np.float64
        assert float(z["threshold"]) == report["threshold"]
    entry = read_manifest(models)["artifacts"]["probe"]
    assert entry["sha256"] == sha256_file(models / "probe.npz") and entry["threshold"] == report["threshold"]
    assert entry["input"]["dim"] == DIM and entry["provenance"]["feature_model_sha256"] == read_manifest(models)["artifacts"]["clip"]["sha256"]
    assert verify(models) == []
    # The two families are separable: cross-validation says so, and the GMM is untouched without --refit-gmm.
    assert report["pooled"]["precision"] >= 0.95 and report["pooled"]["recall"] >= 0.9
    assert sha256_file(models / "gmm.npz") == gmm_before


def test_learn_from_labels_npz_file_and_folder(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = separable_npz(tmp_path / "labels.npz", DIM, 30, 40)
    assert main(["learn", "--labels", str(npz), "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert "labels: 30 good, 40 bad" in out and "5-fold cross-validation" in out
    probe = ProbeStage.load(models / "probe.npz")
    with np.load(npz) as z:
        p = probe.prob(z["features"])
    assert (p[:30] >= probe.threshold).mean() > 0.9 and (p[30:] < probe.threshold).mean() > 0.9
    # A folder that holds a labels.npz (what `gallery-bridge labels export DIR` writes) works the same.
    first = sha256_file(models / "probe.npz")
    separable_npz(tmp_path / "labels.npz", DIM, 30, 40, seed=1)
    assert main(["learn", "--labels", str(tmp_path), "--models", str(models), "--threshold", "0.7"]) == 0
    assert "set by --threshold 0.7" in capsys.readouterr().out
    assert ProbeStage.load(models / "probe.npz").threshold == 0.7 and sha256_file(models / "probe.npz") != first


def test_unreadable_images_are_skipped_and_named(models: Path, folders: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    labels = tmp_path / "labels"
    shutil.copytree(folders, labels)
    (labels / "good" / "broken.jpg").write_bytes(b"not a jpeg at all")
    assert main(["learn", "--labels", str(labels), "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert "labels: 24 good, 24 bad" in out and "note: skipped 1 unreadable image(s)" in out


def test_refit_gmm_changes_the_gmm(models: Path, folders: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sha256_file(models / "gmm.npz")
    assert main(["learn", "--labels", str(folders), "--models", str(models), "--refit-gmm", "--gmm-reg-covar", "1e-4"]) == 0
    assert "GMM refitted on 24 good images" in capsys.readouterr().out
    assert sha256_file(models / "gmm.npz") != before
    meta = json.loads((models / "gmm.json").read_text())
    assert meta["n_train"] == 24 and meta["covariance_type"] == "diag"  # the tiny GMM's type is kept
    assert read_manifest(models)["artifacts"]["gmm"]["sha256"] == sha256_file(models / "gmm.npz")
    assert verify(models) == []


def test_refuses_below_the_minimum_per_class(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = (models / "manifest.json").read_bytes()
    npz = separable_npz(tmp_path / "few.npz", DIM, 19, 50)
    err = refused(capsys, ["learn", "--labels", str(npz), "--models", str(models)])
    assert "too few labels: 19 good and 50 bad, need at least 20" in err
    assert not (models / "probe.npz").exists() and (models / "manifest.json").read_bytes() == manifest
    # The minimum is a flag; folds can never exceed the smaller class either.
    assert main(["learn", "--labels", str(npz), "--models", str(models), "--min-per-class", "10"]) == 0
    capsys.readouterr()
    assert "need at least 30" in refused(capsys, ["learn", "--labels", str(npz), "--models", str(models), "--folds", "30"])
    assert "--folds must be at least 2" in refused(capsys, ["learn", "--labels", str(npz), "--models", str(models), "--folds", "1"])
    # Folders are counted before anything is embedded.
    few = make_folders(tmp_path / "few", 3, 25)
    assert "too few labels: 3 good and 25 bad" in refused(capsys, ["learn", "--labels", str(few), "--models", str(models)])


def test_refuses_wrong_dimension_other_clip_pickles_and_empty_folders(models: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    wrong = separable_npz(tmp_path / "wrong.npz", 16, 30, 30)
    assert "dimension 16 but the model directory's CLIP gives 32" in refused(
        capsys, ["learn", "--labels", str(wrong), "--models", str(models)])
    other = separable_npz(tmp_path / "other.npz", DIM, 30, 30, feature_model_sha256=np.array("0" * 64))
    assert "another CLIP model" in refused(capsys, ["learn", "--labels", str(other), "--models", str(models)])
    # An object array would need pickle to load: refused from its header, never unpickled.
    np.savez(tmp_path / "pickled.npz", features=np.array([object()] * 4, dtype=object), labels=np.ones(4, np.int8))
    assert "features must be float" in refused(capsys, ["learn", "--labels", str(tmp_path / "pickled.npz"), "--models", str(models)])
    bad_labels = tmp_path / "labels3.npz"
    np.savez(bad_labels, features=np.zeros((40, DIM), np.float32), labels=np.array([0, 1, 2, 1] * 10))
    assert "labels must be 1 (good) or 0 (bad)" in refused(capsys, ["learn", "--labels", str(bad_labels), "--models", str(models)])
    empty = tmp_path / "empty"
    (empty / "good").mkdir(parents=True)
    (empty / "bad").mkdir()
    assert "has no image files" in refused(capsys, ["learn", "--labels", str(empty), "--models", str(models)])
    assert "does not exist" in refused(capsys, ["learn", "--labels", str(tmp_path / "nowhere"), "--models", str(models)])
    assert not (models / "probe.npz").exists()


def test_threshold_rule() -> None:
    y = np.array([1] * 10 + [0] * 10)
    p = np.concatenate([np.linspace(0.55, 0.95, 10), np.linspace(0.05, 0.6, 10)])
    t, rule = choose_threshold(y, p, 0.95, None)
    assert metrics_at(y, p, t)["precision"] >= 0.95 and "reaches --target-precision 0.95" in rule
    # The best recall among the thresholds reaching the target (0.61..0.63 keep 8 of 10 good, no bad; 0.60 lets a
    # bad one in), and the middle of that tie, not its edge.
    reaching = [metrics_at(y, p, th) for th in np.round(np.arange(0.01, 1.0, 0.01), 2)]
    best = max(r["recall"] for r in reaching if r["kept"] and r["precision"] >= 0.95)
    assert metrics_at(y, p, t)["recall"] == best == 0.8 and t == 0.62
    t2, rule2 = choose_threshold(y, np.full(20, 0.5), 0.95, None)  # nothing separates: best F1, said so
    assert "no threshold reaches" in rule2
    assert choose_threshold(y, p, 0.95, 0.3) == (0.3, "set by --threshold 0.3")


def test_tampered_probe_is_refused_by_the_server_loader(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anti_sus.modeldir import ModelDirError
    from anti_sus.pipeline import Pipeline
    from models.manifest import write

    assert main(["learn", "--labels", str(separable_npz(tmp_path / "l.npz", DIM, 25, 25)), "--models", str(models)]) == 0
    with np.load(models / "probe.npz") as z:
        arrays = dict(z)
    arrays["coef"] = -arrays["coef"]  # flips every decision
    np.savez(models / "probe.npz", **arrays)
    write(models)  # the manifest re-hashed after the edit: only the checksum can tell
    with pytest.raises(ModelDirError, match="checksum does not match"):
        Pipeline.load(models)
