"""Prompt checks: export writes prompts.npz, the server scores and rejects with prompt:<check>, overrides,
``anti-sus prompts`` without torch, ``anti-sus tune --prompt``, refusals, no pickle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from anti_sus.cli import main
from anti_sus.client import AntiSusError, FilterClient
from anti_sus.modeldir import ModelDirError, read_manifest, verify, write_manifest
from anti_sus.pipeline import Pipeline, Task, evaluate
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.stages.prompts import CheckSpec, PromptChecks, PromptFileError, load_dir
from anti_sus.wire import Limits, parse_request
from photocore.protocol import ProtocolError

from .test_anti_sus_learn_support import make_folders, wire_batch
from .test_anti_sus_support import LOOPBACK, running

KEEP_ALL_GMM = -1e30  # every verdict below is the prompt stage's, not the GMM's


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight open_clip model directory built by models.export_clip (torch), prompts included."""
    from models import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny_prompts"))


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch-free tiny model directory (models.tiny_onnx): text tower, no prompts.npz."""
    from models import tiny_onnx

    return tiny_onnx.build(tmp_path_factory.mktemp("tiny_onnx_prompts"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folders(tmp_path_factory.mktemp("prompt_labels"), 6, 6)


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "models"))


def serve(models: Path) -> FilterServer:
    pipeline = Pipeline.load(models, gmm_threshold=KEEP_ALL_GMM, threads=1)
    return FilterServer(pipeline, ServerConfig(binds=[LOOPBACK], limits=Limits(max_images=16, max_pixels=512 * 512)))


def test_export_writes_default_checks_as_plain_arrays(exported: Path) -> None:
    entry = read_manifest(exported)["artifacts"]["prompts"]
    assert entry["file"] == "prompts.npz" and entry["kind"] == "prompts" and verify(exported) == []
    with np.load(exported / "prompts.npz", allow_pickle=False) as z:  # loads without pickle, nothing is an object
        assert all(z[k].dtype != object for k in z.files)
        assert z["texts"].dtype.kind == "U" and z["names"].dtype.kind == "U"
        assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape[1] == 32
    checks = load_dir(exported)
    assert checks is not None and checks.names == ("nsfw", "screenshot", "text-meme", "illustration")
    # Random weights: every check present, none on (their scores mean nothing).
    assert not checks.enabled.any()
    assert checks.feature_model_sha256 == read_manifest(exported)["artifacts"]["clip"]["sha256"]
    assert checks.text_model_sha256 == read_manifest(exported)["artifacts"]["clip_text"]["sha256"]
    # The stored embeddings are the text tower's features of the stored prompts.
    from anti_sus.text.encoder import TextEncoder

    enc = TextEncoder.from_dir(exported, variant="fp32")
    np.testing.assert_allclose(checks.embeddings, enc.encode(list(checks.texts)), atol=1e-5)


def test_server_scores_rejects_and_overrides(exported: Path, folders: Path) -> None:
    batch = np.concatenate([wire_batch(folders / "good", 2), wire_batch(folders / "bad", 2)])
    with running(serve(exported)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        info = client.info()
        assert info["prompt_stage"] is True
        assert [c["name"] for c in info["prompt_checks"]] == ["nsfw", "screenshot", "text-meme", "illustration"]
        assert info["thresholds"]["prompts"] == {"nsfw": None, "screenshot": None, "text-meme": None, "illustration": None}
        assert info["prompt_checks"][0] == {"name": "nsfw", "enabled": False, "threshold": 0.6, "reject_prompts": 5,
                                            "accept_prompts": 6, "verdict": "prompt:nsfw"}
        res = client.filter(batch)
        assert [r.verdict for r in res.results] != [] and all(not r.verdict.startswith("prompt:") for r in res.results)
        for r in res.results:  # every check's score, on or off
            assert r.prompts is not None and set(r.prompts) == {"nsfw", "screenshot", "text-meme", "illustration"}
            assert all(0.0 <= v <= 1.0 for v in r.prompts.values())
        # A threshold of 0 turns the check on for this request and rejects everything; the first check wins.
        low = client.filter(batch, prompt_thresholds={"screenshot": 0.0, "illustration": 0.0})
        assert [r.verdict for r in low.results] == ["prompt:screenshot"] * 4 and low.good == []
        assert low.thresholds is not None and low.thresholds["prompts"]["screenshot"] == 0.0
        assert low.thresholds["prompts"]["nsfw"] is None
        # Just above one image's score: only the images at or above it are rejected.
        scores = [r.prompts["nsfw"] for r in res.results]
        cut = sorted(scores)[2]
        mid = client.filter(batch, prompt_thresholds={"nsfw": cut})
        assert [r.verdict == "prompt:nsfw" for r in mid.results] == [s >= cut for s in scores]
        with pytest.raises(AntiSusError) as err:
            client.filter(batch, prompt_thresholds={"no-such-check": 0.5})
        assert err.value.code == "bad_header" and "no-such-check" in str(err.value)


def test_enabled_check_rejects_without_any_option(exported: Path, tmp_path: Path, folders: Path) -> None:
    models = copy(exported, tmp_path)
    assert main(["prompts", "set", "illustration", "--threshold", "0", "--models", str(models)]) == 0
    assert main(["prompts", "enable", "illustration", "--models", str(models)]) == 0
    p = Pipeline.load(models, gmm_threshold=KEEP_ALL_GMM, threads=1)
    oc = evaluate(p, [Task(wire_batch(folders / "good", 2), KEEP_ALL_GMM, 0.5)])[0]
    assert oc.verdicts == ["prompt:illustration"] * 2
    assert np.isnan(oc.watermark).all()  # rejected before the watermark stage: it never ran on them
    # A request may still turn the check off (null).
    oc = evaluate(p, [Task(wire_batch(folders / "good", 2), KEEP_ALL_GMM, 1.0, prompt_thresholds={"illustration": None})])[0]
    assert oc.verdicts == ["good"] * 2
    assert p.info()["thresholds"]["prompts"]["illustration"] == 0.0


def test_prompts_add_without_torch_and_served(onnx_dir: Path, tmp_path: Path, folders: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    models = copy(onnx_dir, tmp_path)
    assert main(["prompts", "list", "--models", str(models)]) == 0
    assert "no prompt checks" in capsys.readouterr().out
    assert main(["prompts", "add", "gradients", "--reject", "a smooth colour gradient", "--reject", "a soft blur",
                 "--accept", "a checkerboard", "--threshold", "0", "--models", str(models)]) == 0
    assert verify(models) == []
    checks = load_dir(models)
    assert checks is not None and checks.names == ("gradients",) and checks.enabled.tolist() == [True]
    assert checks.specs()[0].reject == ("a smooth colour gradient", "a soft blur")
    batch = wire_batch(folders / "good", 2)
    with running(serve(models)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        assert [c["name"] for c in client.info()["prompt_checks"]] == ["gradients"]
        assert [r.verdict for r in client.filter(batch).results] == ["prompt:gradients"] * 2
        assert [r.verdict for r in client.filter(batch, prompt_thresholds={"gradients": None}).results] == ["good"] * 2
    # Adding a second check keeps the first one's embeddings; remove drops it.
    assert main(["prompts", "add", "cats", "--reject", "a cat", "--accept", "a dog", "--no-enabled",
                 "--models", str(models)]) == 0
    after = load_dir(models)
    assert after is not None and after.names == ("gradients", "cats") and after.enabled.tolist() == [True, False]
    np.testing.assert_array_equal(after.embeddings[:3], checks.embeddings)
    assert main(["prompts", "remove", "gradients", "--models", str(models)]) == 0
    assert load_dir(models).names == ("cats",)  # type: ignore[union-attr]


def test_prompts_refusals(onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = copy(onnx_dir, tmp_path)
    assert main(["prompts", "add", "x", "--reject", " ", "--accept", "a dog", "--models", str(models)]) == 2
    assert main(["prompts", "add", "x", "--reject", "a cat", "--models", str(models)]) == 2
    assert main(["prompts", "enable", "nothing", "--models", str(models)]) == 2
    assert main(["prompts", "add", "Bad Name!", "--reject", "a", "--accept", "b", "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert "non-empty --reject" in err and "no check 'nothing'" in err and "check name" in err
    assert "Traceback" not in err and all(line.startswith("anti-sus: error:") for line in err.strip().splitlines())
    assert main(["prompts", "add", "cats", "--reject", "a cat", "--accept", "a dog", "--models", str(models)]) == 0
    assert main(["prompts", "add", "cats", "--reject", "a cat", "--accept", "a dog", "--models", str(models)]) == 2
    assert "--replace" in capsys.readouterr().err
    # No text tower: one line naming the command that builds it.
    arts = read_manifest(models)["artifacts"]
    write_manifest(models, {k: v for k, v in arts.items() if k not in ("clip_text", "clip_vocab", "clip_text_int8")},
                   merge=False)
    assert main(["prompts", "add", "dogs", "--reject", "a dog", "--accept", "a cat", "--models", str(models)]) == 2
    err = capsys.readouterr().err
    assert "no CLIP text tower" in err and len(err.strip().splitlines()) == 1


def test_prompts_tied_to_their_clip(onnx_dir: Path, exported: Path, tmp_path: Path) -> None:
    """prompts.npz encoded for another CLIP (or with another dimension) is refused at load with the fix."""
    models = copy(onnx_dir, tmp_path)
    assert main(["prompts", "add", "cats", "--reject", "a cat", "--accept", "a dog", "--models", str(models)]) == 0
    checks = load_dir(models)
    assert checks is not None
    other = PromptChecks(checks.names, checks.thresholds, checks.enabled, checks.embeddings, checks.check, checks.reject,
                         checks.texts, checks.logit_scale, "0" * 64, checks.text_model_sha256)
    from anti_sus.stages.prompts import save_dir

    save_dir(models, other, "test")
    with pytest.raises(ModelDirError, match="another CLIP model"):
        Pipeline.load(models, threads=1)
    with pytest.raises(ModelDirError, match="unknown prompt check"):
        Pipeline.load(exported, threads=1, prompt_thresholds={"nope": 0.5})


def test_scores_are_clip_zero_shot_softmax() -> None:
    """P(reject) = softmax(logit_scale * cosine) summed over the reject prompts, per check."""
    e = np.eye(4, dtype=np.float32)
    checks = PromptChecks.encode([CheckSpec("a", ("r1", "r2"), ("k1",), 0.5, True), CheckSpec("b", ("r3",), ("k1",), 0.9)],
                                 lambda ts: e[[{"r1": 0, "r2": 1, "k1": 2, "r3": 3}[t] for t in ts]], logit_scale=10.0)
    f = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 1, 1]], np.float32)
    s = checks.scores(f)
    logits = 10.0 * (f / np.linalg.norm(f, axis=1, keepdims=True)) @ e.T
    ex = np.exp(logits[:, [0, 1, 2]])
    np.testing.assert_allclose(s["a"], ex[:, :2].sum(1) / ex.sum(1), rtol=1e-6)
    np.testing.assert_allclose(s["b"], np.exp(logits[:, 3]) / (np.exp(logits[:, 3]) + np.exp(logits[:, 2])), rtol=1e-6)
    assert s["a"][0] > 0.99 and s["a"][1] < 0.01
    assert checks.threshold_of() == {"a": 0.5, "b": None}
    # A large logit scale takes the per-check log-sum-exp path (the shared-max one would underflow): same numbers.
    sharp = PromptChecks(checks.names, checks.thresholds, checks.enabled, checks.embeddings, checks.check,
                         checks.reject, checks.texts, 400.0)
    f2 = np.array([[0.8, 0.6, 0.0, 0.0], [0.0, 0.1, 0.9, 0.4]], np.float32)
    l2 = 400.0 * (f2 / np.linalg.norm(f2, axis=1, keepdims=True)).astype(np.float64) @ e.T.astype(np.float64)
    want = 1 / (1 + np.exp(l2[:, 2] - np.logaddexp(l2[:, 0], l2[:, 1])))
    np.testing.assert_allclose(sharp.scores(f2)["a"], want, rtol=1e-3)  # float32 features: logits to ~1e-5
    mild = PromptChecks(checks.names, checks.thresholds, checks.enabled, checks.embeddings, checks.check,
                        checks.reject, checks.texts, 100.0)
    np.testing.assert_allclose(mild.scores(f2)["b"], 1 / (1 + np.exp((l2[:, 2] - l2[:, 3]) / 4)), rtol=1e-3)
    back = PromptChecks.load(_write(checks))
    assert back.names == checks.names and back.texts == checks.texts
    np.testing.assert_array_equal(back.embeddings, checks.embeddings)


def _write(checks: PromptChecks) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "prompts.npz"
    path.write_bytes(checks.to_bytes())
    return path


def test_bad_prompt_files_and_options_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "prompts.npz"
    np.savez(path, names=np.array(["a"], dtype=object))
    with pytest.raises(PromptFileError):
        PromptChecks.load(path)
    checks = PromptChecks.encode([CheckSpec("a", ("r",), ("k",))], lambda ts: np.eye(2, dtype=np.float32)[: len(ts)])
    with np.load(_write(checks)) as z:
        arrays = dict(z)
    arrays["thresholds"] = np.array([1.5])
    np.savez(path, **arrays)
    with pytest.raises(PromptFileError, match="within 0..1"):
        PromptChecks.load(path)
    for bad in ({"nsfw": 1.5}, {"nsfw": "x"}, ["nsfw"], {"": 0.5}):
        header = json.dumps({"v": 1, "op": "filter", "shape": [1, 2, 2, 3], "options": {"prompt_thresholds": bad}}).encode()
        with pytest.raises(ProtocolError, match="prompt_thresholds"):
            parse_request([header, b"\0" * 12], Limits())
    ok = json.dumps({"v": 1, "op": "filter", "shape": [1, 2, 2, 3],
                     "options": {"prompt_thresholds": {"nsfw": None, "x": 0}}})
    req = parse_request([ok.encode(), b"\0" * 12], Limits())
    assert req.prompt_thresholds == {"nsfw": None, "x": 0.0}  # type: ignore[union-attr]


def test_tune_suggests_and_applies_a_prompt_threshold(exported: Path, tmp_path: Path, folders: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    models = copy(exported, tmp_path)
    report = tmp_path / "tune.json"
    assert main(["tune", "--models", str(models), "--prompt", "screenshot", "--flagged", str(folders / "bad"),
                 "--unflagged", str(folders / "good"), "--plot", str(tmp_path / "tune.png"), "--json", str(report),
                 "--apply-prompt", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "== prompt:screenshot: flagged n=6, unflagged n=6" in out and (tmp_path / "tune.png").is_file()
    rep = json.loads(report.read_text())[0]
    suggested = rep["suggested"]["threshold"]
    assert rep["stage"] == "prompt:screenshot" and rep["current"] == 0.6
    checks = load_dir(models)
    assert checks is not None and dict(zip(checks.names, checks.thresholds.tolist()))["screenshot"] == pytest.approx(suggested)
    assert verify(models) == []
    assert main(["tune", "--models", str(models), "--prompt", "nope", "--flagged", str(folders / "bad"),
                 "--unflagged", str(folders / "good")]) == 2
    assert "no such check" in capsys.readouterr().err


def test_stage_cost_benchmark_reads_the_directory_checks(exported: Path) -> None:
    """bench/stage_cost.py scores the directory's own prompt checks and reports their share of CLIP's time."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_cost", Path(__file__).parent.parent / "bench" / "stage_cost.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.run(mod.parser().parse_args(["--models", str(exported), "--images", "4", "--rounds", "1", "--repeats", "5"]))
    assert out["prompt_checks"] == 4 and out["prompts"] == 37
    assert 0 < float(out["stages_share_of_clip"]) < 1


def test_review_sampler_ranks_prompt_rejects_by_margin() -> None:
    from anti_sus.client import ImageResult
    from nomad.delivery.review import margin, pick

    results = [ImageResult(0, 1.0, None, "prompt:nsfw", prompts={"nsfw": 0.95}),
               ImageResult(1, 1.0, None, "prompt:nsfw", prompts={"nsfw": 0.62}),
               ImageResult(2, 1.0, None, "good", prompts={"nsfw": 0.1})]
    thresholds = {"gmm": 0.0, "watermark": 0.5, "prompts": {"nsfw": 0.6}}
    assert margin(results[1], thresholds) == pytest.approx(0.02)
    assert [p.index for p in pick(results, thresholds, 2)] == [1, 0]
    assert margin(results[0], None) == pytest.approx(0.95)  # no thresholds: a lower P(reject) is nearer


def test_write_defaults_enables_nsfw_for_a_trained_clip_and_keeps_added_checks(onnx_dir: Path, tmp_path: Path) -> None:
    """What export does after a pretrained text tower: nsfw on, the others off, the model's logit scale; checks
    added earlier keep their settings (re-encoded with the current tower)."""
    from anti_sus.stages.prompts import write_defaults

    models = copy(onnx_dir, tmp_path)
    assert main(["prompts", "add", "cats", "--reject", "a cat", "--accept", "a dog", "--threshold", "0.7",
                 "--models", str(models)]) == 0
    write_defaults(models, enable=True, logit_scale=50.0)
    checks = load_dir(models)
    assert checks is not None and verify(models) == []
    assert checks.names == ("cats", "nsfw", "screenshot", "text-meme", "illustration")
    assert checks.threshold_of() == {"cats": 0.7, "nsfw": 0.6, "screenshot": None, "text-meme": None, "illustration": None}
    assert checks.logit_scale == 50.0
    assert Pipeline.load(models, threads=1).info()["thresholds"]["prompts"]["nsfw"] == 0.6


def test_probe_and_prompts_round_trip_on_an_exported_random_weight_clip(exported: Path, tmp_path: Path,
                                                                         folders: Path) -> None:
    """Issue 12's round trip on a real open_clip export: prompts from export, a probe from `anti-sus learn`, both
    in the manifest, served, listed by info in pipeline order, and scored on every image."""
    from .test_anti_sus_learn_support import separable_npz

    models = copy(exported, tmp_path)
    batch = np.concatenate([wire_batch(folders / "good", 2), wire_batch(folders / "bad", 2)])
    with running(serve(models)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        dim = client.filter(batch, return_features="all").features.shape[1]
    npz = separable_npz(tmp_path / "labels.npz", dim, 30, 30)
    assert main(["learn", "--labels", str(npz), "--models", str(models)]) == 0
    manifest = read_manifest(models)
    assert {"probe", "prompts"} <= set(manifest["artifacts"]) and verify(models) == []
    with running(serve(models)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        info = client.info()
        assert info["probe_stage"] is True and info["prompt_stage"] is True
        order = [s["name"] for s in info["stages"]]
        assert order.index("gmm") < order.index("probe") < order.index("prompts") < order.index("watermark")
        res = client.filter(batch)
        assert all(r.probe is not None and 0.0 <= r.probe <= 1.0 for r in res.results)
        assert all(r.prompts is not None and set(r.prompts) == {"nsfw", "screenshot", "text-meme", "illustration"}
                   for r in res.results)
