"""``gallery-bridge labels export`` -> ``anti-sus learn``: the exported labels.npz and the exported folders both learn.

Labels are given through a real gallery server (review items labelled good or bad), exported with the CLI, then
learnt from the npz (its stored features) and from the folders (embedded with the model directory's CLIP).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anti_sus.cli import main
from anti_sus.modeldir import read_manifest
from anti_sus.stages.probe import ProbeStage
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.cli import main as gb_main
from gallery_bridge.client import IngestClient
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from tests import gallery_helpers as T

from .test_anti_sus_learn_support import cool_checkerboard, fresh_copy

pytestmark = pytest.mark.timeout(600)
DIM = 32
N = 6  # per class


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of N good and N bad review labels, features separable along one axis."""
    root = tmp_path_factory.mktemp("gallery")
    target = FolderTarget(root / "gallery")
    ingester = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", label_copies=100)).start()
    client = IngestClient(server.endpoint, timeout=30, retries=0)
    rng = np.random.default_rng(3)
    axis = rng.normal(size=DIM)
    try:
        for i in range(N):
            good = (axis + 0.3 * rng.normal(size=DIM)).astype(np.float32)
            rid = client.review(f"good:{i}", {}, T.encode(T.photo(100 + i, size=(384, 288))), {"gmm": -5.0}, "gmm", good)
            client.label(f"r{rid['review_id']}", "good")
            bad = (-axis + 0.3 * rng.normal(size=DIM)).astype(np.float32)
            board = Image.fromarray(cool_checkerboard(rng)).resize((288, 288), Image.NEAREST)
            rid = client.review(f"bad:{i}", {}, _jpeg(board), {"watermark": 0.9}, "watermark", bad)
            client.label(f"r{rid['review_id']}", "bad")
        out = root / "export"
        assert gb_main(["labels", "export", str(out), "--gallery", str(root / "gallery")]) == 0
    finally:
        client.close()
        server.close()
        ingester.close()
    return out


@pytest.mark.parametrize("source", ["labels.npz", "folders"])
def test_learn_reads_what_labels_export_writes(exported: Path, tiny_onnx_models: Path, tmp_path: Path, source: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    models = fresh_copy(tiny_onnx_models, tmp_path / "models")
    labels = exported / "labels.npz" if source == "labels.npz" else exported
    assert main(["learn", "--labels", str(labels), "--models", str(models), "--min-per-class", "3", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert f"labels: {N} good, {N} bad" in out and "3-fold cross-validation" in out
    probe = ProbeStage.load(models / "probe.npz")
    assert read_manifest(models)["artifacts"]["probe"]["threshold"] == probe.threshold
    if source == "labels.npz":
        # The stored features were learnt as they are: the probe separates them.
        with np.load(exported / "labels.npz", allow_pickle=False) as z:
            p, y = probe.prob(z["features"]), z["labels"]
        assert ((p >= probe.threshold) == (y == 1)).mean() >= 0.9
    else:
        assert f"{N} good + {N} bad images under {exported}" in out
