"""``models.tiny_onnx``: the demo's tiny models built with the onnx helper API, no torch anywhere.

The directory is built in a subprocess where ``import torch`` raises (a shim package named
``torch`` first on ``PYTHONPATH``), then anti_sus loads it through its manifest and scores
a batch: the graphs must honour the same contract as ``models.export_clip``/``export_watermark``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import open_model_dir, verify
from anti_sus.pipeline import GOOD, OUTLIER, WATERMARK, Pipeline, Task, evaluate
from anti_sus.preprocess import CLIP_SPEC, WATERMARK_SPEC
from tests.conftest import REPO
from tests.test_installed_package import torch_blocker

pytestmark = pytest.mark.timeout(300)


def no_torch_env(tmp: Path) -> dict[str, str]:
    """This environment with a ``torch`` package that refuses to import, ahead of the venv's real one."""
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(torch_blocker(tmp)), str(REPO)])}


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny_onnx")
    out = tmp / "models"
    code = ("import sys\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    sys.exit('torch is importable')\n"
            "from models.tiny_onnx import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", code, "--out", str(out), "--images", "48"], cwd=tmp,
                         env=no_torch_env(tmp), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "built tiny ONNX model directory" in run.stdout
    return out


def test_directory_verifies_with_every_artifact(onnx_models: Path) -> None:
    assert verify(onnx_models) == []
    arts = open_model_dir(onnx_models)
    assert sorted(arts) == ["clip", "clip_text", "clip_vocab", "gmm", "gmm_meta", "watermark"]
    meta = json.loads(arts["gmm_meta"].path.read_text())
    assert meta["feature_model_sha256"] == arts["clip"].sha256
    assert meta["n_train"] == 48 and meta["feature_dim"] == 32
    assert arts["clip"].entry["provenance"]["tool"] == "models.tiny_onnx"


def test_graphs_have_the_served_contract(onnx_models: Path) -> None:
    import onnxruntime as ort

    arts = open_model_dir(onnx_models)
    for name, size, out_name, out_dim in (("clip", CLIP_SPEC.size, "features", 32), ("watermark", WATERMARK_SPEC.size, "logit", 1)):
        sess = ort.InferenceSession(str(arts[name].path), providers=["CPUExecutionProvider"])
        [inp], [out] = sess.get_inputs(), sess.get_outputs()
        assert (inp.name, inp.type, inp.shape[1:]) == ("image", "tensor(float)", [3, size, size])
        assert isinstance(inp.shape[0], str), "the batch axis must be dynamic"
        assert (out.name, out.type, out.shape[1:]) == (out_name, "tensor(float)", [out_dim])
        for n in (1, 3):  # two batch sizes: a batch baked into the graph fails one of them
            y = sess.run(None, {"image": np.random.default_rng(n).standard_normal((n, 3, size, size), dtype=np.float32)})[0]
            assert y.shape == (n, out_dim) and y.dtype == np.float32 and np.isfinite(y).all()
            if name == "clip":
                np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)


def test_anti_sus_loads_and_scores(onnx_models: Path) -> None:
    pipeline = Pipeline.load(onnx_models, threads=1)
    assert pipeline.has_watermark and pipeline.details["clip"]["dim"] == 32
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, (4, 96, 128, 3), dtype=np.uint8)
    [oc] = evaluate(pipeline, [Task(batch, -1e9, 0.5)], watermark_all=True)
    assert oc.problem == ""
    assert oc.gmm.shape == (4,) and np.isfinite(oc.gmm).all()
    assert np.isfinite(oc.watermark).all() and ((oc.watermark > 0) & (oc.watermark < 1)).all()
    assert set(oc.verdicts) <= {GOOD, WATERMARK} and len(oc.verdicts) == 4
    [strict] = evaluate(pipeline, [Task(batch, 1e9, 0.5)])
    assert strict.verdicts == [OUTLIER] * 4
    # Distinct images give distinct features: the random tower is not a constant.
    assert np.ptp(oc.features, axis=0).max() > 1e-3


def test_missing_onnx_is_one_line(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['onnx'] = None  # an install made with --no-deps\n"
            "from models.tiny_onnx import main\nfrom models._cli import run_main\n"
            "raise SystemExit(run_main(main, sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--out", str(tmp_path / "m")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: building the tiny ONNX models needs the onnx package (a dependency of this project): "
        "pip install 'onnx>=1.15'")
