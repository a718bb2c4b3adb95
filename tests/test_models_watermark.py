"""The watermark training loop learns: a small model on synthetic data, judged on images it never saw.

Exact settings (documented in docs/models.md): training data = 700 clear/watermarked
pairs at 128 px (`watermark_data --style bold --seed 0`), held-out data = 100 pairs
from a different seed (`--seed 1`, different backgrounds and marks), timm
`test_resnet` from scratch at `--size 128`, 18 epochs, batch 32, AdamW one-cycle
lr 3e-3, `--augment light`, 2 threads. Must reach >= 90% held-out accuracy.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import verify
from anti_sus.preprocess import PreprocessSpec, load_image, stack_wire, to_wire, watermark_input
from models.onnx_export import run_onnx
from models.watermark_data import generate

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"models.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_generator_layout_and_pairs(tmp_path: Path) -> None:
    w = generate(tmp_path / "d", 10, size=96, seed=3, progress=False)
    assert (w.watermark, w.clear) == (5, 5)
    clear = sorted((tmp_path / "d" / "clear").glob("*.jpg"))
    marked = sorted((tmp_path / "d" / "watermark").glob("*.jpg"))
    assert [p.name for p in clear] == [p.name for p in marked]
    # Each pair is the same picture; the mark is the difference.
    a = to_wire(load_image(str(clear[0])), 96).astype(int)
    b = to_wire(load_image(str(marked[0])), 96).astype(int)
    assert np.abs(a - b).mean() > 0.5
    generate(tmp_path / "u", 6, size=64, seed=3, paired=False, progress=False)
    assert len(list((tmp_path / "u").rglob("*.jpg"))) == 6


def test_train_watermark_user_errors(tmp_path: Path) -> None:
    res = _run("train_watermark", "--data", str(tmp_path), "--out", str(tmp_path / "w.safetensors"))
    assert res.returncode == 2 and "watermark/ and clear/" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_training_reaches_90_percent_on_held_out_images(tmp_path: Path) -> None:
    train, val = tmp_path / "train", tmp_path / "val"
    generate(train, 1400, size=128, seed=0, style="bold", progress=False)
    generate(val, 200, size=128, seed=1, style="bold", progress=False)
    weights = tmp_path / "wm.safetensors"
    res = _run("train_watermark", "--data", str(train), "--val-data", str(val), "--out", str(weights),
               "--arch", "test_resnet", "--size", "128", "--epochs", "18", "--batch-size", "32", "--lr", "3e-3",
               "--augment", "light", "--threads", "2", "--seed", "0", timeout=540)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads(weights.with_name(weights.name + ".metrics.json").read_text())
    assert metrics["n_val"] == 200 and metrics["n_train"] == 1400
    assert sum(map(sum, metrics["confusion_matrix"])) == 200
    assert metrics["accuracy"] >= 0.90, metrics

    # The trained weights export through the parity gate and the ONNX graph agrees with the report.
    models = tmp_path / "models"
    res = _run("export_watermark", "--weights", str(weights), "--out", str(models), "--threads", "2")
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert verify(models, required=("watermark",)) == []
    entry = json.loads((models / "manifest.json").read_text())["artifacts"]["watermark"]
    spec = PreprocessSpec.from_dict(entry["preprocess"])
    assert spec.size == 128 and entry["output"]["name"] == "logit"
    files = sorted((val / "watermark").glob("*.jpg"))[:20] + sorted((val / "clear").glob("*.jpg"))[:20]
    logits = run_onnx(models / "watermark.onnx", watermark_input(stack_wire([load_image(str(p)) for p in files]), spec))
    acc = float(np.mean((logits[:, 0] >= 0) == np.array([1] * 20 + [0] * 20)))
    assert acc >= 0.8
