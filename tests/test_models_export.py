"""The export parity gate: passes for a faithful graph, fails (non-zero exit, figures shown) otherwise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.export_clip import export_clip
from models.onnx_export import ParityError, compare, export_onnx, run_onnx
from models.tiny import TINY_EMBED_DIM, TINY_VISION_CFG

REPO = Path(__file__).resolve().parent.parent
SMALL_CFG = {**TINY_VISION_CFG, "layers": 1}


class Flipper(torch.nn.Module):
    """Exports one computation (2x) but runs another in eager torch (-x): a graph that diverges."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return pooled * 2.0
        return -pooled


def test_compare_figures() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert compare(a, a) == (1.0, 0.0)
    cos, mad = compare(a, np.array([[0.0, 1.0], [0.0, 2.0]]))
    assert cos == pytest.approx(0.0) and mad == pytest.approx(1.0)
    # One-column outputs (logits) are compared as one vector.
    cos, _ = compare(np.array([[1.0], [2.0]]), np.array([[2.0], [4.0]]))
    assert cos == pytest.approx(1.0)


def test_gate_passes_and_batch_is_dynamic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models import quantize

    monkeypatch.setattr(quantize, "MIN_SPEEDUP", 0.0)  # int8 is slower than fp32 on a model this small; not tested here
    entries = export_clip(tmp_path, arch="tiny", vision_cfg=SMALL_CFG, embed_dim=TINY_EMBED_DIM, int8=True)
    prov = entries["clip"]["provenance"]
    assert prov["parity"]["cosine"] >= 0.9999 and prov["parity"]["max_abs"] <= 1e-3 and prov["opset"] >= 14
    # No GMM yet at export: the int8 gate checks cosine on procedural images only, and says so.
    gate = entries["clip_int8"]["provenance"]["gate"]
    assert gate["passed"] and gate["cosine_min"] >= 0.995 and gate["decisions_checked"] == [] and "procedural" in gate["images"]
    for n in (1, 5):
        out = run_onnx(tmp_path / "clip_visual.onnx", np.zeros((n, 3, 224, 224), np.float32))
        assert out.shape == (n, TINY_EMBED_DIM)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"clip", "clip_int8"}


def test_gate_fails_on_divergent_graph(tmp_path: Path) -> None:
    with pytest.raises(ParityError) as info:
        export_onnx(Flipper(), tmp_path / "bad.onnx", size=32, output_name="features")
    assert "cosine" in str(info.value) and "max-abs" in str(info.value)
    assert info.value.parity.cosine < 0  # torch says -x, ONNX says 2x
    assert not (tmp_path / "bad.onnx").exists() and not list(tmp_path.glob("*.tmp"))


def test_cli_gate_failure_exits_non_zero_with_figures(tmp_path: Path) -> None:
    # A cosine can never exceed 1, so this gate cannot pass: the CLI must refuse and print the figures.
    # The threshold comes from the environment, which every flag also reads.
    import os

    cmd = [sys.executable, "-m", "models.export_clip", "--out", str(tmp_path), "--pretrained", "none",
           "--arch", "ViT-B-32", "--threads", "1"]
    env = {**os.environ, "ANTI_SUS_EXPORT_CLIP_MIN_COSINE": "1.5"}
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "parity gate failed" in res.stdout and "need >= 1.5" in res.stdout and "max-abs" in res.stdout
    assert not (tmp_path / "clip_visual.onnx").exists()


def test_cli_user_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "models.export_clip", "--out", str(tmp_path), "--arch", "No-Such-Arch"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown open_clip architecture" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "models.export_watermark", "--weights", str(tmp_path / "nope.safetensors"),
                          "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
