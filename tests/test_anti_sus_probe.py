"""The probe stage in a serving pipeline: verdict "probe", its score in replies, info, per-request threshold, old clients."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zmq

from anti_sus.cli import main
from anti_sus.client import FilterClient
from anti_sus.pipeline import Pipeline
from anti_sus.server import FilterServer, ServerConfig
from anti_sus.wire import Limits, parse_request
from photocore.protocol import ProtocolError

from .test_anti_sus_learn_support import fresh_copy, make_folders, wire_batch
from .test_anti_sus_support import LOOPBACK, raw_socket, recv_within, running

# The tiny GMM was fitted on procedural backgrounds, not on these two families: keep everything it would
# drop, so each verdict below is the probe's.
KEEP_ALL_GMM = -1e30


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model dir with a probe learnt from the folders, the same model dir without one, the labelled folders)."""
    from models import tiny_onnx

    plain = tiny_onnx.build(tmp_path_factory.mktemp("tiny_onnx"))
    labels = make_folders(tmp_path_factory.mktemp("labels"), 24, 24)
    models = fresh_copy(plain, tmp_path_factory.mktemp("with_probe") / "models")
    assert main(["learn", "--labels", str(labels), "--models", str(models)]) == 0
    return models, plain, labels


def serve(models: Path) -> FilterServer:
    pipeline = Pipeline.load(models, gmm_threshold=KEEP_ALL_GMM, threads=1)
    return FilterServer(pipeline, ServerConfig(binds=[LOOPBACK], limits=Limits(max_images=16, max_pixels=512 * 512)))


def test_server_rejects_what_the_probe_calls_bad(learnt: tuple[Path, Path, Path]) -> None:
    models, _, labels = learnt
    good, bad = wire_batch(labels / "good", 3), wire_batch(labels / "bad", 3)
    batch = np.concatenate([good, bad])
    with running(serve(models)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        res = client.filter(batch)
        assert [r.verdict for r in res.results] == ["good"] * 3 + ["probe"] * 3
        assert res.good == [0, 1, 2]
        threshold = client.info()["thresholds"]["probe"]
        assert all(r.probe is not None and r.probe >= threshold for r in res.results[:3])
        assert all(r.probe is not None and r.probe < threshold for r in res.results[3:])
        assert res.thresholds is not None and res.thresholds["probe"] == threshold
        # Per-request override: 0 keeps everything the probe scores, 1 keeps nothing.
        assert [r.verdict for r in client.filter(batch, probe_threshold=0.0).results] == ["good"] * 6
        low = client.filter(batch, probe_threshold=1.0)
        assert [r.verdict for r in low.results] == ["probe"] * 6 and low.thresholds["probe"] == 1.0
        info = client.info()
        assert info["probe_stage"] is True and info["models"]["probe"]["stored_threshold"] == threshold
        assert info["models"]["probe"]["dim"] == 32


def test_old_clients_keep_working(learnt: tuple[Path, Path, Path], ctx: zmq.Context) -> None:
    """A header without the probe option and the legacy single-frame format are judged by the stored threshold."""
    models, _, labels = learnt
    batch = np.concatenate([wire_batch(labels / "good", 2), wire_batch(labels / "bad", 2)])
    with running(serve(models)) as ep:
        sock = raw_socket(ctx, ep)
        header = {"v": 1, "op": "filter", "id": "old", "shape": list(batch.shape), "dtype": "uint8",
                  "options": {"gmm_threshold": KEEP_ALL_GMM}}
        sock.send_multipart([b"", json.dumps(header).encode(), batch.tobytes()])
        reply = json.loads(recv_within(sock, 60)[1])
        assert reply["good"] == [0, 1] and [r["verdict"] for r in reply["results"]] == ["good", "good", "probe", "probe"]
        sock.send_multipart([b"", batch.tobytes()])  # upstream's legacy frame: int32 indexes of the good images
        assert np.frombuffer(recv_within(sock, 60)[1], dtype="<i4").tolist() == [0, 1]
        sock.close(0)


def test_without_a_probe_nothing_changes(learnt: tuple[Path, Path, Path]) -> None:
    _, plain, labels = learnt
    batch = np.concatenate([wire_batch(labels / "good", 2), wire_batch(labels / "bad", 2)])
    with running(serve(plain)) as ep, FilterClient(ep, timeout=60, retries=0) as client:
        res = client.filter(batch, probe_threshold=0.9)  # accepted, and ignored without a probe
        assert [r.verdict for r in res.results] == ["good"] * 4 and all(r.probe is None for r in res.results)
        info = client.info()
        assert info["probe_stage"] is False and "probe" not in info["thresholds"] and info["models"]["probe"] is None


def test_probe_threshold_option_is_validated() -> None:
    header = {"v": 1, "op": "filter", "shape": [1, 8, 8, 3], "dtype": "uint8"}
    ok = parse_request([json.dumps({**header, "options": {"probe_threshold": 0.25}}).encode(), b"\0" * 192], Limits())
    assert ok.probe_threshold == 0.25  # type: ignore[union-attr]
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ProtocolError, match="probe_threshold") as exc:
            parse_request([json.dumps({**header, "options": {"probe_threshold": bad}}).encode(), b"\0" * 192], Limits())
        assert exc.value.code == "bad_header"


@pytest.fixture
def ctx() -> zmq.Context:
    c = zmq.Context()
    yield c
    c.term()


def test_serve_and_score_take_a_probe_threshold(learnt: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--probe-threshold`` / ``ANTI_SUS_PROBE_THRESHOLD`` replace the stored threshold for a whole server or score run."""
    from anti_sus.cli import build_parser, options

    models, _, labels = learnt
    args = build_parser().parse_args(["serve", "--models", str(models), "--probe-threshold", "0.99", "--threads", "1"])
    pipeline = options.load_pipeline(args, KEEP_ALL_GMM, args.watermark_threshold)
    assert pipeline.probe_threshold == 0.99 and pipeline.info()["thresholds"]["probe"] == 0.99
    monkeypatch.setenv("ANTI_SUS_PROBE_THRESHOLD", "0.2")
    assert build_parser().parse_args(["serve"]).probe_threshold == 0.2
    monkeypatch.delenv("ANTI_SUS_PROBE_THRESHOLD")

    bad = sorted((labels / "bad").iterdir())[:2]
    common = ["score", *map(str, bad), "--models", str(models), "--gmm-threshold=-1e30", "--format", "json", "--threads", "1"]
    assert main(common) == 0
    assert [r["verdict"] for r in json.loads(capsys.readouterr().out)] == ["probe", "probe"]
    assert main([*common, "--probe-threshold", "0"]) == 0
    assert [r["verdict"] for r in json.loads(capsys.readouterr().out)] == ["good", "good"]


def test_remote_score_passes_the_probe_threshold(learnt: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    models, _, labels = learnt
    bad = [str(p) for p in sorted((labels / "bad").iterdir())[:2]]
    with running(serve(models)) as ep:
        for extra, verdict in (([], "probe"), (["--probe-threshold", "0"], "good")):
            assert main(["score", *bad, "--server", ep, "--format", "json", *extra]) == 0
            assert [r["verdict"] for r in json.loads(capsys.readouterr().out)] == [verdict] * 2
