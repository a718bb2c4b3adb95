"""``--provider cuda``: ONNX Runtime's CUDA provider when it can run, else the CPU with one warning.

This machine has no GPU and the CPU-only onnxruntime, so the tests cover the
two ways CUDA is missing: a build without the provider, and a build that has it
but cannot start it (simulated by reporting the provider as available).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from anti_sus.cli import build_parser, main
from anti_sus.cli import options
from anti_sus.stages import onnx as stage_onnx

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import tiny_onnx

    out = tmp_path_factory.mktemp("tiny_onnx")
    tiny_onnx.build(out)
    return out


@pytest.fixture(autouse=True)
def fresh_provider_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: CPU chosen, no warning given yet."""
    monkeypatch.setattr(stage_onnx, "_provider", "cpu")
    monkeypatch.setattr(stage_onnx, "_fallback_warned", False)


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--provider cuda" in r.getMessage()]


def stage_providers(pipeline) -> list[list[str]]:
    return [stage.session.get_providers() for stage in (pipeline.clip, pipeline.watermark)]


def test_cuda_without_the_provider_runs_on_cpu_with_one_warning(onnx_models: Path, caplog: pytest.LogCaptureFixture):
    assert "CUDAExecutionProvider" not in ort.get_available_providers(), "this test describes a machine without CUDA"
    args = build_parser().parse_args(["serve", "--models", str(onnx_models), "--provider", "cuda"])
    with caplog.at_level(logging.WARNING):
        pipeline = options.load_pipeline(args)
    assert stage_providers(pipeline) == [["CPUExecutionProvider"]] * 2
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1, warnings  # two models fell back, one line said so
    assert "onnxruntime-gpu" in warnings[0]
    batch = np.full((2, 64, 64, 3), 120, np.uint8)
    assert len(pipeline.clip.run_chunks(pipeline.clip.preprocess(batch))[0]) == 2  # and it computes


def test_cuda_provider_that_cannot_start_falls_back_with_one_warning(onnx_models: Path, caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """onnxruntime-gpu on a node without a GPU: the provider is listed, the session comes up on the CPU."""
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    stage_onnx.use_provider("cuda")
    assert stage_onnx.session_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning):  # onnxruntime's own warning about CUDA
        sessions = [stage_onnx.open_session(onnx_models / "clip_visual.onnx") for _ in range(2)]
    assert [s.get_providers() for s in sessions] == [["CPUExecutionProvider"]] * 2
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1 and "did not start" in warnings[0], warnings


def test_cpu_is_the_default_and_says_nothing(onnx_models: Path, caplog: pytest.LogCaptureFixture):
    args = build_parser().parse_args(["serve", "--models", str(onnx_models)])
    assert args.provider == "cpu"
    with caplog.at_level(logging.WARNING):
        pipeline = options.load_pipeline(args)
    assert stage_providers(pipeline) == [["CPUExecutionProvider"]] * 2
    assert fallback_warnings(caplog) == []


def test_provider_from_the_environment_and_bad_values(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("ANTI_SUS_PROVIDER", "cuda")
    assert build_parser().parse_args(["serve"]).provider == "cuda"
    assert build_parser().parse_args(["serve", "--provider", "cpu"]).provider == "cpu"  # the flag wins
    for command in ("serve", "score", "tune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "ANTI_SUS_PROVIDER" in capsys.readouterr().out
    monkeypatch.setenv("ANTI_SUS_PROVIDER", "tpu")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "ANTI_SUS_PROVIDER" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="unknown execution provider"):
        stage_onnx.use_provider("tpu")
