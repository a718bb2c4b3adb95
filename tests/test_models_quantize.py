"""The int8 gate (models.quantize): it accepts a normal tiny model, refuses variants that break cosine or
decision agreement, keeps the fastest passing one, records its report, and anti_sus serves int8 by default."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from anti_sus.modeldir import int8_unusable, read_manifest, verify, write_manifest
from anti_sus.pipeline import Pipeline
from anti_sus.preprocess import PreprocessSpec, model_input, stack_wire
from models import quantize, synth, tiny

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def int8_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory built with the int8 gate (after the GMM fit, as stack.ensure_models does)."""
    return tiny.build(tmp_path_factory.mktemp("tiny_int8"), n_images=96, int8=True)


@pytest.fixture(scope="module")
def inputs(int8_models: Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) CLIP inputs of procedural images, disjoint."""
    spec = PreprocessSpec.from_dict(read_manifest(int8_models)["artifacts"]["clip"]["preprocess"])
    x = model_input(stack_wire(synth.backgrounds(36, seed=5, size=128)), spec)
    calib, held = quantize.split(list(range(len(x))))
    return x[calib], x[held]


def shifted(shift: np.ndarray) -> quantize.Quantizer:
    """A fake quantizer: the fp32 graph with ``shift`` added to its output (a variant built to break parity)."""
    def write(fp32: Path, out: Path, _calibration: quantize.CalibrationFactory) -> None:
        m = onnx.load(str(fp32))
        name = m.graph.output[0].name
        for node in m.graph.node:
            node.output[:] = [o + "_pre" if o == name else o for o in node.output]
        m.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32)[None], "sabotage"))
        m.graph.node.append(helper.make_node("Add", [name + "_pre", "sabotage"], [name]))
        onnx.save(m, str(out))
    return write


def copy_fp32(fp32: Path, out: Path, _calibration: quantize.CalibrationFactory) -> None:
    shutil.copyfile(fp32, out)


def fp32_features(models: Path, x: np.ndarray) -> np.ndarray:
    return quantize.run_model(models / "clip_visual.onnx", x)


def test_gate_accepts_a_normal_tiny_model_and_the_manifest_carries_the_report(int8_models: Path):
    assert verify(int8_models) == []
    arts = read_manifest(int8_models)["artifacts"]
    gate = arts["clip_int8"]["provenance"]["gate"]
    assert gate["passed"] is True and gate["method"] in quantize.QUANTIZERS
    assert gate["cosine_min"] >= quantize.MIN_COSINE and gate["cosine_median"] >= gate["cosine_min"]
    assert gate["agreement"]["gmm"] >= quantize.MIN_AGREEMENT and gate["decisions_checked"] == ["gmm"]
    assert gate["decisions"][0]["gmm_sha256"] == arts["gmm"]["sha256"]
    assert {c["method"] for c in gate["candidates"]} == set(quantize.QUANTIZERS)
    assert gate["speedup"] > 0 and gate["n_held_out"] > 0 and gate["n_calibration"] > 0
    assert arts["clip_int8"]["provenance"]["fp32_sha256"] == arts["clip"]["sha256"]
    assert int8_unusable(arts) == ""
    # The kept file is the chosen candidate, an int8 graph, not a copy of fp32.
    ops = {n.op_type for n in onnx.load(str(int8_models / "clip_visual.int8.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


def test_gate_refuses_a_variant_that_breaks_cosine(int8_models: Path, inputs, tmp_path: Path):
    calib, held = inputs
    dim = fp32_features(int8_models, held[:1]).shape[1]
    big = np.full(dim, 1.0 / np.sqrt(dim))  # as long as the unit features themselves: cosine far below 0.995
    out = tmp_path / "int8.onnx"
    out.write_bytes(b"stale")
    report = quantize.gate(int8_models / "clip_visual.onnx", out, calib, held, [],
                           quantizers={"sabotaged": shifted(big)})
    assert not report.passed and report.chosen is None
    [c] = report.candidates
    assert not c.passed and "cosine" in c.reason and c.cosine_min < quantize.MIN_COSINE
    assert not out.exists()  # a stale variant does not outlive a failed gate
    assert report.to_dict()["rejected"] == [{"method": "sabotaged", "reason": c.reason}]


def test_gate_refuses_a_variant_whose_decisions_disagree_although_cosine_passes(int8_models: Path, inputs, tmp_path: Path):
    calib, held = inputs
    ref = fp32_features(int8_models, held)
    v = np.zeros(ref.shape[1])
    v[0] = 0.02  # a small shift: cosine stays above 0.995 ...
    proj = np.sort(ref[:, 0])
    t = float(proj[len(proj) // 2]) + 0.01  # ... but a probe with its threshold just above one image's score flips it
    probe = quantize.Decision("probe", lambda f: f[:, 0] >= t, {"threshold": t})
    report = quantize.gate(int8_models / "clip_visual.onnx", tmp_path / "int8.onnx", calib, held, [probe],
                           quantizers={"nudged": shifted(v)})
    [c] = report.candidates
    assert c.cosine_min >= quantize.MIN_COSINE
    assert not report.passed and "probe agreement" in c.reason and c.agreement["probe"] < quantize.MIN_AGREEMENT
    assert report.to_dict()["decisions_checked"] == ["probe"]


def test_the_fastest_passing_candidate_is_kept(int8_models: Path, inputs, tmp_path: Path):
    calib, held = inputs
    dim = fp32_features(int8_models, held[:1]).shape[1]
    speeds = {"fp32": 1.0, "slow": 0.5, "fast": 0.2, "broken": 0.01}

    def timer(path: Path, _x: np.ndarray) -> float:
        return speeds[path.stem if path.stem in speeds else "fp32"]

    out = tmp_path / "int8.onnx"
    report = quantize.gate(int8_models / "clip_visual.onnx", out, calib, held, [],
                           quantizers={"slow": copy_fp32, "fast": copy_fp32, "broken": shifted(np.ones(dim))}, timer=timer)
    assert report.chosen == "fast"  # "broken" is faster but fails parity
    assert report.best is not None and report.best.speedup == pytest.approx(5.0)
    assert [r["method"] for r in report.to_dict()["rejected"]] == ["broken"]
    assert out.is_file()


def test_anti_sus_serves_int8_by_default_and_fp32_with_the_flag(int8_models: Path, monkeypatch: pytest.MonkeyPatch):
    from anti_sus.cli import build_parser
    from anti_sus.cli.options import load_pipeline

    clip = Pipeline.load(int8_models).info()["models"]["clip"]
    assert clip["variant"] == "int8" and clip["artifact"] == "clip_int8" and clip["int8_gate"]["method"]
    args = build_parser().parse_args(["serve", "--models", str(int8_models), "--fp32"])
    assert load_pipeline(args).info()["models"]["clip"]["variant"] == "fp32"
    monkeypatch.setenv("ANTI_SUS_FP32", "1")
    args = build_parser().parse_args(["serve", "--models", str(int8_models)])
    assert load_pipeline(args).info()["models"]["clip"]["variant"] == "fp32"
    monkeypatch.delenv("ANTI_SUS_FP32")
    with pytest.raises(Exception, match="contradict"):
        Pipeline.load(int8_models, int8=True, fp32=True)


def test_a_refitted_gmm_makes_the_gate_stale_and_fp32_is_served(int8_models: Path, tmp_path: Path):
    d = tmp_path / "m"
    shutil.copytree(int8_models, d)
    arts = read_manifest(d)["artifacts"]
    arts["clip_int8"]["provenance"]["gate"]["decisions"][0]["gmm_sha256"] = "0" * 64  # as if the GMM was refitted
    write_manifest(d, arts, merge=False)
    p = Pipeline.load(d)
    assert p.info()["models"]["clip"]["variant"] == "fp32"
    assert any("another GMM" in n and "models.quantize" in n for n in p.info()["models"]["notes"])
    # --int8 still means "require int8": served, with a note saying why it is not the default.
    assert Pipeline.load(d, int8=True).info()["models"]["clip"]["variant"] == "int8"


def test_a_failed_gate_removes_the_old_int8_entry(int8_models: Path, inputs, tmp_path: Path):
    calib, held = inputs
    d = tmp_path / "m"
    shutil.copytree(int8_models, d)
    dim = fp32_features(d, held[:1]).shape[1]
    report, entry = quantize.build_int8(d, "clip", calib, held, [], images="test",
                                        quantizers={"sabotaged": shifted(np.ones(dim))})
    assert entry is None and not report.passed
    assert "clip_int8" not in read_manifest(d)["artifacts"] and verify(d) == []
    assert json.loads((d / "manifest.json").read_text())["artifacts"]["clip"]["file"] == "clip_visual.onnx"
    assert Pipeline.load(d).info()["models"]["clip"]["variant"] == "fp32"


def test_stack_ensure_models_runs_the_gate_after_the_gmm_and_can_skip_it(int8_models: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    import argparse

    from PIL import Image

    from stack import ensure_models

    d = tmp_path / "m"
    shutil.copytree(int8_models, d)
    arts = read_manifest(d)["artifacts"]
    del arts["clip_int8"]
    (d / "clip_visual.int8.onnx").unlink()
    write_manifest(d, arts, merge=False)
    taste = tmp_path / "state" / "taste"
    taste.mkdir(parents=True)
    for i, im in enumerate(synth.backgrounds(12, seed=3, size=128)):
        Image.fromarray(np.asarray(im)).save(taste / f"t{i:02d}.png")
    args = argparse.Namespace(models=d, gallery=tmp_path / "gallery", state_dir=tmp_path / "state", min_good_images=200,
                              int8=None)
    monkeypatch.setenv("STACK_INT8", "0")
    ensure_models.ensure_int8(args)
    assert "clip_int8" not in read_manifest(d)["artifacts"]
    monkeypatch.setenv("STACK_INT8", "maybe")
    with pytest.raises(ensure_models.EnsureError, match="STACK_INT8"):
        ensure_models.ensure_int8(args)
    monkeypatch.delenv("STACK_INT8")
    monkeypatch.setattr(quantize, "MIN_SPEEDUP", 0.0)  # int8 is slower than fp32 on the tiny CLIP; this tests the order
    ensure_models.ensure_int8(args)  # default: on
    arts = read_manifest(d)["artifacts"]
    gate = arts["clip_int8"]["provenance"]["gate"]
    assert gate["decisions_checked"] == ["gmm"] and str(taste) in gate["images"] and gate["n_held_out"] == 4
    assert int8_unusable(arts) == "" and verify(d) == []


def test_watermark_export_builds_its_int8_variant_through_the_same_gate(int8_models: Path, tmp_path: Path):
    from models.export_watermark import gate_int8

    d = tmp_path / "m"
    shutil.copytree(int8_models, d)
    report = gate_int8(d, None, min_speedup=0.0)  # int8 is slower than fp32 on the tiny watermark net
    arts = read_manifest(d)["artifacts"]
    assert report.to_dict()["decisions_checked"] == ["watermark"]
    assert report.passed, report.summary()
    gate = arts["watermark_int8"]["provenance"]["gate"]
    assert gate["agreement"]["watermark"] >= quantize.MIN_AGREEMENT and gate["cosine_min"] >= quantize.MIN_COSINE
    assert arts["watermark_int8"]["provenance"]["fp32_sha256"] == arts["watermark"]["sha256"]
    assert verify(d) == []


def test_manifest_show_prints_the_int8_gate(int8_models: Path, capsys: pytest.CaptureFixture[str]):
    from models import manifest

    assert manifest.main(["show", str(int8_models)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("clip_int8")]
    assert "int8 gate passed" in line and "cosine min" in line and '"gmm"' in line


def scaled(factor: float) -> quantize.Quantizer:
    """A fake quantizer: the fp32 graph with its output multiplied by ``factor`` (logits stretched)."""
    def write(fp32: Path, out: Path, _calibration: quantize.CalibrationFactory) -> None:
        m = onnx.load(str(fp32))
        name = m.graph.output[0].name
        for node in m.graph.node:
            node.output[:] = [o + "_pre" if o == name else o for o in node.output]
        m.graph.initializer.append(numpy_helper.from_array(np.array([factor], np.float32), "stretch"))
        m.graph.node.append(helper.make_node("Mul", [name + "_pre", "stretch"], [name]))
        onnx.save(m, str(out))
    return write


@pytest.fixture(scope="module")
def wm_inputs(int8_models: Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) watermark inputs of procedural images."""
    spec = PreprocessSpec.from_dict(read_manifest(int8_models)["artifacts"]["watermark"]["preprocess"])
    x = model_input(stack_wire(synth.backgrounds(18, seed=9, size=128)), spec)
    calib, held = quantize.split(list(range(len(x))))
    return x[calib], x[held]


def test_watermark_gate_refuses_a_variant_whose_scores_drift_although_decisions_and_cosine_hold(
        int8_models: Path, wm_inputs, tmp_path: Path):
    calib, held = wm_inputs
    fp32 = int8_models / "watermark.onnx"
    logits = quantize.run_model(fp32, held)[:, 0]
    # Stretch the logits so the largest probability moves by > 0.05: the sign (the decision at 0.5) and the
    # one-column cosine stay exactly the same, only the scores drift.
    factor = 1.0 + 0.5 / max(float(np.abs(logits).max()), 1e-3) * 2
    decision = quantize.watermark_decision(0.5)
    report = quantize.gate(fp32, tmp_path / "wm.onnx", calib, held, [decision], quantizers={"stretched": scaled(factor)},
                           min_speedup=0.0)
    [c] = report.candidates
    assert c.cosine_min >= quantize.MIN_COSINE and c.agreement["watermark"] == 1.0
    assert c.prob_diff_max > quantize.MAX_PROB_DIFF and "probability differs" in c.reason
    assert not report.passed and not (tmp_path / "wm.onnx").exists()
    # The same fake with a tiny stretch passes: the check is about closeness, not about any change at all.
    ok = quantize.gate(fp32, tmp_path / "wm.onnx", calib, held, [decision], quantizers={"near": scaled(1.001)}, min_speedup=0.0)
    assert ok.passed and ok.to_dict()["prob_diff_max"] <= quantize.MAX_PROB_DIFF


def test_watermark_gate_refuses_a_variant_that_flips_decisions(int8_models: Path, wm_inputs, tmp_path: Path):
    calib, held = wm_inputs
    fp32 = int8_models / "watermark.onnx"
    logits = np.sort(quantize.run_model(fp32, held)[:, 0])
    t = float(1 / (1 + np.exp(-(logits[len(logits) // 2] + 1e-4))))  # a threshold just above the median image's P
    report = quantize.gate(fp32, tmp_path / "wm.onnx", calib, held, [quantize.watermark_decision(t)],
                           quantizers={"nudged": shifted(np.array([2e-4]))}, min_speedup=0.0)
    [c] = report.candidates
    assert not report.passed and "watermark agreement" in c.reason


def test_gate_refuses_a_variant_slower_than_fp32(int8_models: Path, inputs, tmp_path: Path):
    calib, held = inputs
    speeds = {"fp32": 1.0, "slower": 1.25}

    def timer(path: Path, _x: np.ndarray) -> float:
        return speeds.get(path.stem, 1.0)

    out = tmp_path / "int8.onnx"
    report = quantize.gate(int8_models / "clip_visual.onnx", out, calib, held, [], quantizers={"slower": copy_fp32},
                           timer=timer)
    [c] = report.candidates
    assert c.cosine_min >= quantize.MIN_COSINE  # parity holds: only the speed rule rejects it
    assert not report.passed and "not faster than fp32" in c.reason and not out.exists()
    assert report.to_dict()["min_speedup"] == quantize.MIN_SPEEDUP
    assert quantize.gate(int8_models / "clip_visual.onnx", out, calib, held, [], quantizers={"slower": copy_fp32},
                         timer=timer, min_speedup=0.5).passed


def test_anti_sus_serves_the_int8_watermark_by_default_and_fp32_refuses_it(int8_models: Path, tmp_path: Path):
    arts = read_manifest(int8_models)["artifacts"]
    assert int8_unusable(arts, "watermark_int8", "watermark") == ""
    wm = Pipeline.load(int8_models).info()["models"]["watermark"]
    assert wm["variant"] == "int8" and wm["artifact"] == "watermark_int8" and wm["file"] == "watermark.int8.onnx"
    assert wm["int8_gate"]["method"] in quantize.QUANTIZERS
    p = Pipeline.load(int8_models, fp32=True)
    assert p.info()["models"]["watermark"]["variant"] == "fp32"
    assert "fp32 watermark model served (--fp32)" in p.info()["models"]["notes"]
    # int8 and fp32 watermark probabilities on the same images stay within the gate's bound.
    images = stack_wire(synth.backgrounds(4, seed=11, size=512))
    p8 = Pipeline.load(int8_models)
    a = p8.watermark_prob(p8.watermark_input(images))
    b = p.watermark_prob(p.watermark_input(images))
    assert np.abs(a - b).max() <= quantize.MAX_PROB_DIFF
    # A watermark model re-exported since the gate makes its int8 stale: fp32 is served, with the fix.
    d = tmp_path / "m"
    shutil.copytree(int8_models, d)
    arts = read_manifest(d)["artifacts"]
    arts["watermark_int8"]["provenance"]["fp32_sha256"] = "0" * 64
    write_manifest(d, arts, merge=False)
    p = Pipeline.load(d)
    assert p.info()["models"]["watermark"]["variant"] == "fp32"
    assert any("another watermark" in n and "--target watermark" in n for n in p.info()["models"]["notes"])
