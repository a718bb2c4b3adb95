"""The watermark export gives timm's TF-"same" convolutions fixed pads for the served size (issue 14: the
watermark model is the server's bottleneck; run-time padding kept ONNX Runtime from fusing the pads)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("timm")

from anti_sus.preprocess import PreprocessSpec  # noqa: E402
from models.export_watermark import export_watermark, static_same_padding  # noqa: E402
from models.onnx_export import run_onnx  # noqa: E402
from models.watermark_net import build  # noqa: E402

SIZE = 96  # small for speed; the rule is the same at 512


def test_static_pads_give_the_same_outputs_at_the_served_size() -> None:
    import torch

    model = build("tf_efficientnetv2_b0").eval()
    before = copy.deepcopy(model)
    assert static_same_padding(model, SIZE) == 5  # its five stride-2 convolutions
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(before(x), model(x), atol=1e-6)
    assert static_same_padding(model, SIZE) == 0  # nothing dynamic left


def test_the_exported_graph_has_no_run_time_padding_and_keeps_parity(tmp_path: Path) -> None:
    model = build("tf_efficientnetv2_b0").eval()
    spec = PreprocessSpec("watermark", SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    entry = export_watermark(model, tmp_path, arch="tf_efficientnetv2_b0", spec=spec, write=False)
    ops = [n.op_type for n in onnx.load(str(tmp_path / entry["file"])).graph.node]
    # Run-time "same" padding exports as Shape -> ... -> Pad with computed pads; fixed pads need no Shape at all.
    assert "Shape" not in ops and ops.count("Pad") == 5
    assert entry["provenance"]["parity"]["cosine"] >= 0.9999
    out = run_onnx(tmp_path / entry["file"], np.zeros((2, 3, SIZE, SIZE), np.float32))
    assert out.shape == (2, 1)
