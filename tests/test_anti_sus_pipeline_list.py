"""The manifest's ordered stage list: checked at load, kept by tools that rewrite the manifest, edited by models.manifest."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import (STAGES, ModelDirError, pipeline_of, pipeline_required, read_manifest, register_stage,
                               write_manifest, write_pipeline)
from anti_sus.pipeline import Pipeline, Task, evaluate
from models import manifest as manifest_cli

from .test_anti_sus_learn_support import fresh_copy


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import tiny_onnx

    return tiny_onnx.build(tmp_path_factory.mktemp("tiny_onnx"))


@pytest.fixture
def models(tiny_dir: Path, tmp_path: Path) -> Path:
    return fresh_copy(tiny_dir, tmp_path / "models")


def test_pipeline_of_checks_names_clip_first_and_repeats() -> None:
    assert pipeline_of({"artifacts": {}}) is None  # no list: the default order
    assert pipeline_of({"pipeline": ["clip", "watermark"]}) == ["clip", "watermark"]
    with pytest.raises(ModelDirError, match="unknown pipeline stage.*'nope'"):
        pipeline_of({"pipeline": ["clip", "nope"]})
    with pytest.raises(ModelDirError, match="must start with \"clip\""):
        pipeline_of({"pipeline": ["gmm", "watermark"]})
    with pytest.raises(ModelDirError, match="must start with \"clip\""):
        pipeline_of({"pipeline": ["gmm", "clip"]})
    with pytest.raises(ModelDirError, match="listed twice"):
        pipeline_of({"pipeline": ["clip", "gmm", "gmm"]})
    with pytest.raises(ModelDirError, match="list of stage names"):
        pipeline_of({"pipeline": "clip gmm"})
    # Only the listed stages' artifacts are required.
    assert pipeline_required(["clip", "watermark"]) == ("clip", "watermark")
    assert pipeline_required(None) == ("clip", "gmm", "gmm_meta")


def test_a_registered_stage_may_be_listed() -> None:
    with pytest.raises(ModelDirError):
        pipeline_of({"pipeline": ["clip", "test_only_stage"]})
    register_stage("test_only_stage", ("test_only_artifact",))
    try:
        assert pipeline_of({"pipeline": ["clip", "test_only_stage"]}) == ["clip", "test_only_stage"]
        assert pipeline_required(["clip", "test_only_stage"]) == ("clip", "test_only_artifact")
    finally:
        del STAGES["test_only_stage"]
    with pytest.raises(ValueError):
        register_stage("bad name")


def test_manifest_cli_sets_prints_and_resets_the_list(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manifest_cli.main(["pipeline", str(models)]) == 0
    assert "default order" in capsys.readouterr().out
    assert manifest_cli.main(["pipeline", str(models), "clip", "watermark", "gmm"]) == 0
    assert capsys.readouterr().out.strip() == "clip watermark gmm"
    assert read_manifest(models)["pipeline"] == ["clip", "watermark", "gmm"]
    # A bad list is refused and the manifest keeps the old one.
    assert manifest_cli.main(["pipeline", str(models), "clip", "bogus"]) == 1
    assert "unknown pipeline stage" in capsys.readouterr().out
    assert read_manifest(models)["pipeline"] == ["clip", "watermark", "gmm"]
    # Tools that add or rewrite artifacts (learn, fit_gmm, models.manifest write) keep the list.
    write_manifest(models, {})
    assert manifest_cli.main(["write", str(models)]) == 0
    assert read_manifest(models)["pipeline"] == ["clip", "watermark", "gmm"]
    assert manifest_cli.main(["pipeline", str(models), "default"]) == 0
    assert "pipeline" not in read_manifest(models)
    assert manifest_cli.main(["verify", str(models), "clip"]) == 2  # stage names only go with pipeline
