"""anti_sus model stages under a memory budget: sub-batch sizes, identical scores, the flag, the arena handing memory back."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anti_sus.cli import build_parser
from anti_sus.defaults import DEFAULT_MEMORY_BUDGET
from anti_sus.pipeline import Pipeline, Task, evaluate
from anti_sus.stages import onnx as onnx_stage
from anti_sus.stages.clip import ClipStage
from anti_sus.stages.onnx import sub_batch_size
from anti_sus.stages.watermark import WatermarkStage
from photocore.errors import UserError

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent


def test_sub_batch_follows_the_budget_not_the_request():
    mb = 1 << 20
    assert sub_batch_size(100 * mb, 30 * mb, 32) == 3  # what fits the budget
    assert sub_batch_size(10 * mb, 30 * mb, 32) == 1  # never below one image
    assert sub_batch_size(10_000 * mb, 30 * mb, 32) == 32  # never above --max-batch
    assert sub_batch_size(None, 30 * mb, 32) == 32  # no budget: --max-batch at a time


def _calls(stage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the number of images of each ``session.run`` of ``stage``."""
    seen: list[int] = []
    real = stage.session.run

    def run(outputs, feeds, options=None):
        seen.append(len(next(iter(feeds.values()))))
        assert options is onnx_stage.SHRINK_ARENA  # every call hands the arena's peak back
        return real(outputs, feeds, options)

    monkeypatch.setattr(stage, "session", type("S", (), {"run": staticmethod(run)})())
    return seen


def test_stages_run_in_budgeted_sub_batches(tiny_models: Path, monkeypatch: pytest.MonkeyPatch):
    wm = WatermarkStage(tiny_models / "watermark.onnx", max_batch=32)
    per_image = wm.activation_bytes
    # 512² float input is 3 MiB per image; the estimate scales it by the stage's factor
    assert per_image == int(3 * 512 * 512 * 4 * WatermarkStage.ACTIVATION_FACTOR)
    small = WatermarkStage(tiny_models / "watermark.onnx", max_batch=32, memory_budget=3 * per_image + 1)
    assert small.sub_batch == 3
    clip = ClipStage(tiny_models / "clip_visual.onnx", max_batch=32, memory_budget=2 * ClipStage(
        tiny_models / "clip_visual.onnx").activation_bytes)
    assert clip.sub_batch == 2
    seen = _calls(small, monkeypatch)
    x = np.random.default_rng(0).standard_normal((8, 3, 512, 512), dtype=np.float32)
    small.run(x)
    assert seen == [3, 3, 2]


def test_budgeted_scores_equal_one_big_batch(tiny_models: Path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (12, 96, 80, 3), np.uint8)
    tasks = [Task(images[:7], float("-inf"), 0.5), Task(images[7:], float("-inf"), 0.5)]
    whole = Pipeline.load(tiny_models, memory_budget=None)
    split = Pipeline.load(tiny_models, memory_budget=1)  # one image per call in both models
    assert whole.clip.sub_batch == 32 and split.clip.sub_batch == 1 and split.watermark.sub_batch == 1
    a = evaluate(whole, tasks, watermark_all=True)
    b = evaluate(split, tasks, watermark_all=True)
    for x, y in zip(a, b):
        # each image is computed on its own in both runs: the same floats, not merely close ones
        assert np.array_equal(x.features, y.features)
        assert np.array_equal(x.gmm, y.gmm) and np.array_equal(x.watermark, y.watermark)
        assert x.verdicts == y.verdicts
    info = split.info()["models"]
    assert info["watermark"]["memory"] == {"sub_batch": 1, "memory_budget": 1,
                                           "activation_bytes_per_image": split.watermark.activation_bytes}


def test_memory_budget_flag_and_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    for cmd in (["serve"], ["score", "x.jpg"], ["tune"]):  # every command that loads the models
        assert build_parser().parse_args(cmd).memory_budget == DEFAULT_MEMORY_BUDGET == 192 << 20
    assert build_parser().parse_args(["serve", "--memory-budget", "64M"]).memory_budget == 64 << 20
    monkeypatch.setenv("ANTI_SUS_MEMORY_BUDGET", "1.5G")
    assert build_parser().parse_args(["serve"]).memory_budget == 3 << 29
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--memory-budget", "plenty"])
    assert exc.value.code == 2
    assert "--memory-budget" in capsys.readouterr().err
    monkeypatch.setenv("ANTI_SUS_MEMORY_BUDGET", "0")  # the CLI prints a UserError as one line, exit 2
    with pytest.raises(UserError, match="ANTI_SUS_MEMORY_BUDGET='0' is invalid: must be >= 1 byte"):
        build_parser().parse_args(["serve"])


ARENA_CHILD = r"""
import json, sys
import numpy as np
from anti_sus.stages import onnx as onnx_stage
from anti_sus.stages.watermark import WatermarkStage

def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

if sys.argv[2] == "keep":  # the old behaviour: the arena keeps its peak
    onnx_stage.SHRINK_ARENA = None
stage = WatermarkStage(sys.argv[1], threads=1, memory_budget=None)
x = np.random.default_rng(0).standard_normal((24, 3, 512, 512), dtype=np.float32)
stage.run(x[:1])
before = kb("VmRSS:")
stage.run(x)
print(json.dumps({"peak": kb("VmHWM:") - before, "kept": kb("VmRSS:") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_arena_hands_a_big_batch_back(tiny_models: Path):
    def child(mode: str) -> dict:
        r = subprocess.run([sys.executable, "-c", ARENA_CHILD, str(tiny_models / "watermark.onnx"), mode], cwd=REPO,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    keep, shrink = child("keep"), child("shrink")
    assert keep["kept"] > 50 << 20, keep  # the batch's activations: without shrinking they stay
    assert shrink["peak"] > 50 << 20, shrink  # the same work was done
    assert shrink["kept"] < keep["kept"] / 4, (shrink, keep)  # and handed back
