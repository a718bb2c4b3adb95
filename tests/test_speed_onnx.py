"""ORT session settings chosen for throughput on a shared CPU (issue 14): intra-op threads do not spin."""
from __future__ import annotations

from pathlib import Path

import pytest

from anti_sus.stages import onnx as stages_onnx
from models import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build(tmp_path_factory.mktemp("tiny_spin"), n_images=32)


def spinning(session: object) -> str:
    return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")  # type: ignore[attr-defined]


def test_served_sessions_do_not_spin_but_a_caller_may_ask_for_ort_s_default(models: Path) -> None:
    assert stages_onnx.ALLOW_SPINNING is False
    assert spinning(stages_onnx.open_session(models / "clip_visual.onnx", 1)) == "0"
    assert spinning(stages_onnx.open_session(models / "clip_visual.onnx", 1, spin=True)) == "1"


def test_the_pipeline_s_stages_use_those_sessions(models: Path) -> None:
    from anti_sus.pipeline import Pipeline

    p = Pipeline.load(models, threads=1)
    assert spinning(p.clip.session) == "0" and p.watermark is not None and spinning(p.watermark.session) == "0"
