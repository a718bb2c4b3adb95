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


@pytest.fixture
def models(tiny_onnx_models: Path, tmp_path: Path) -> Path:
    return fresh_copy(tiny_onnx_models, tmp_path / "models")


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


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def judge(models: Path, order: list[str] | None, **thresholds: float) -> tuple[Pipeline, list[dict]]:
    write_pipeline(models, order)
    p = Pipeline.load(models, **{k: v for k, v in thresholds.items() if k in ("gmm_threshold", "watermark_threshold")})
    imgs = images()
    task = Task(imgs, p.gmm_threshold, p.watermark_threshold)
    return p, evaluate(p, [task])[0].results()


def test_the_list_order_decides_which_stage_rejects(models: Path) -> None:
    # Every image fails both stages: the GMM (threshold above any score) and the watermark (threshold 0).
    strict = {"gmm_threshold": 1e9, "watermark_threshold": 0.0}
    p, res = judge(models, ["clip", "gmm", "watermark"], **strict)
    assert [r["verdict"] for r in res] == ["outlier"] * 3 and {r["rejected_by"] for r in res} == {"gmm"}
    assert all(r["watermark"] is None for r in res)  # the watermark model saw only the GMM's survivors: none
    p, res = judge(models, ["clip", "watermark", "gmm"], **strict)
    assert [r["verdict"] for r in res] == ["watermark"] * 3 and {r["rejected_by"] for r in res} == {"watermark"}
    assert all(r["gmm"] is not None and r["watermark"] is not None for r in res)  # every stage's score is there
    info = p.info()
    assert [s["name"] for s in info["stages"]] == ["clip", "watermark", "gmm"]
    assert info["stages"][1]["threshold"] == 0.0 and info["stages"][2]["threshold"] == 1e9


def test_a_stage_left_out_does_not_run(models: Path) -> None:
    p, res = judge(models, ["clip", "watermark"], gmm_threshold=1e9, watermark_threshold=1.0)
    assert p.gmm is None and [s["name"] for s in p.info()["stages"]] == ["clip", "watermark"]
    assert all(r["gmm"] is None and r["verdict"] == "good" and r["rejected_by"] is None for r in res)
    assert "gmm" not in p.info()["thresholds"]
    p, res = judge(models, ["clip"], gmm_threshold=1e9, watermark_threshold=0.0)
    assert not p.has_watermark and all(r["verdict"] == "good" and r["watermark"] is None for r in res)
    # Without the list the default order runs (GMM before the watermark), as before lists existed.
    p, res = judge(models, None, gmm_threshold=1e9, watermark_threshold=0.0)
    assert p.order[:2] == ["clip", "gmm"] and {r["rejected_by"] for r in res} == {"gmm"}


def test_a_directory_without_the_gmm_loads_when_the_list_omits_it(models: Path) -> None:
    m = read_manifest(models)
    for name in ("gmm", "gmm_meta"):
        (models / m["artifacts"].pop(name)["file"]).unlink()
    m["pipeline"] = ["clip", "watermark"]
    (models / "manifest.json").write_text(json.dumps(m))
    p = Pipeline.load(models)
    assert p.order == ["clip", "watermark"]
    # Naming the GMM again makes its missing files a refusal with the command that builds them.
    write_pipeline(models, ["clip", "gmm", "watermark"])
    with pytest.raises(ModelDirError, match="gmm: missing from manifest.json; build it with"):
        Pipeline.load(models)


def test_an_unknown_stage_is_refused_at_load(models: Path) -> None:
    m = read_manifest(models)
    m["pipeline"] = ["clip", "gmm", "sparkle"]
    (models / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match="unknown pipeline stage.*'sparkle'"):
        Pipeline.load(models)
    m["pipeline"] = ["gmm", "watermark"]
    (models / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelDirError, match="must start with \"clip\""):
        Pipeline.load(models)
    # Registered by name but with no implementation in this server: refused too, not silently skipped.
    register_stage("sparkle")
    try:
        m["pipeline"] = ["clip", "sparkle"]
        (models / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(ModelDirError, match="cannot run pipeline stage"):
            Pipeline.load(models)
    finally:
        del STAGES["sparkle"]


def test_the_legacy_protocol_is_judged_by_the_list(models: Path) -> None:
    import zmq

    from anti_sus.server import FilterServer, ServerConfig
    from anti_sus.wire import Limits

    from .test_anti_sus_support import LOOPBACK, running

    frame = np.random.default_rng(3).integers(0, 256, (2, 512, 512, 3), dtype=np.uint8).tobytes()
    ctx = zmq.Context()
    try:
        for order, good in ((None, []), (["clip"], [0, 1])):
            write_pipeline(models, order)
            server = FilterServer(Pipeline.load(models, gmm_threshold=1e9), ServerConfig(binds=[LOOPBACK], limits=Limits(4, 512 * 512)))
            with running(server) as ep:
                req = ctx.socket(zmq.REQ)
                req.setsockopt(zmq.LINGER, 0)
                req.connect(ep)
                req.send(frame)
                assert req.poll(30000)
                assert np.frombuffer(req.recv(), dtype="<i4").tolist() == good
                req.close(0)
    finally:
        ctx.term()
