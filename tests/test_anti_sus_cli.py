"""anti-sus command line: env-var defaults, flag parsing, keygen, clear errors without tracebacks."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from anti_sus.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_env_vars_are_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ANTI_SUS_BIND", "tcp://127.0.0.1:1, tcp://127.0.0.1:2")
    monkeypatch.setenv("ANTI_SUS_MAX_BATCH", "8")
    monkeypatch.setenv("ANTI_SUS_NO_WATERMARK", "1")
    monkeypatch.setenv("ANTI_SUS_MODELS", "/srv/models")
    args = build_parser().parse_args(["serve"])
    assert args.bind == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    assert args.max_batch == 8 and args.no_watermark is True and args.models == "/srv/models"
    args = build_parser().parse_args(["serve", "--bind", "tcp://127.0.0.1:3", "--bind", "ipc:///tmp/x", "--max-batch", "4"])
    assert args.bind == ["tcp://127.0.0.1:3", "ipc:///tmp/x"] and args.max_batch == 4
    monkeypatch.delenv("ANTI_SUS_BIND")
    assert build_parser().parse_args(["serve"]).bind == ["tcp://127.0.0.1:7777"]


def test_every_flag_has_an_env_var_in_its_help():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.option_strings == ["-h", "--help"]:
                continue
            assert "[env ANTI_SUS_" in (action.help or ""), (name, action.option_strings)
            checked += 1
    assert checked > 50


def test_bad_values_exit_cleanly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("ANTI_SUS_MAX_BATCH", "lots")
    assert main(["serve"]) == 2
    assert "ANTI_SUS_MAX_BATCH" in capsys.readouterr().err
    monkeypatch.delenv("ANTI_SUS_MAX_BATCH")
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--watermark-threshold", "1.5"])
    assert exc.value.code == 2
    assert main(["serve", "--curve-allow", "/tmp"]) == 2
    assert "--curve-allow needs --curve-secret-key" in capsys.readouterr().err
    assert main(["serve", "--connect", "tcp://127.0.0.1:7778", "--curve-secret-key", "/tmp/k"]) == 2
    assert "is a CURVE client, not a server" in capsys.readouterr().err  # it takes --curve-server-key/--curve-client-key


def test_keygen_writes_loadable_keys(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "anti_sus", "keygen", str(tmp_path), "--name", "srv"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    public, secret = zmq.auth.load_certificate(str(tmp_path / "srv.key_secret"))
    assert len(public) == 40 and secret is not None and len(secret) == 40
    assert zmq.auth.load_certificate(str(tmp_path / "srv.key"))[1] is None
    assert (tmp_path / "srv.key_secret").stat().st_mode & 0o077 == 0


def test_missing_key_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["ping", "--curve-server-key", str(tmp_path / "nope.key"), "--timeout", "0.2", "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "nope.key not found" in err and "Traceback" not in err


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "anti_sus", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv, expected", [
    (["serve", "--bind", "127.0.0.1:7790"], "argument --bind: 127.0.0.1:7790: a ZeroMQ endpoint needs a transport: "
                                            "did you mean tcp://127.0.0.1:7790?"),
    (["serve", "--connect", "broker:7779"], "argument --connect: broker:7779: a ZeroMQ endpoint needs a transport: "
                                            "did you mean tcp://broker:7779?"),
    (["ping", "--server", "localhost"], "argument --server: localhost: a ZeroMQ endpoint needs a transport, e.g. tcp://host:port"),
    (["broker", "--frontend", "tcp://127.0.0.1:7777", "--backend", "tpc://10.0.0.5:7779"],
     "argument --backend: tpc://10.0.0.5:7779: unknown transport"),
    (["broker", "--frontend", "tcp://127.0.0.1", "--backend", "tcp://127.0.0.1:7779"],
     "argument --frontend: tcp://127.0.0.1: a tcp endpoint needs HOST:PORT"),
    (["info", "--server", "tcp://127.0.0.1:99999"], "argument --server: tcp://127.0.0.1:99999: port '99999' is not a number within 1-65535"),
    (["score", "x.png", "--server", "127.0.0.1:7777"], "argument --server: 127.0.0.1:7777: a ZeroMQ endpoint needs a transport"),
])
def test_bad_endpoints_are_named_at_start(argv: list[str], expected: str):
    r = run_cli(*argv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr and "Invalid argument" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, no usage block


def test_endpoint_from_env_is_checked_too():
    r = run_cli("serve", env={"ANTI_SUS_BIND": "127.0.0.1:7790"})
    assert r.returncode == 2 and "ANTI_SUS_BIND='127.0.0.1:7790' is invalid" in r.stderr, r.stderr
    assert "did you mean tcp://127.0.0.1:7790?" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["maybe", "2", "enable"])
def test_bad_boolean_env_fails_instead_of_meaning_off(value: str, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch):
    # It used to become False silently: ANTI_SUS_INT8=enable ran the float32 model.
    monkeypatch.setenv("ANTI_SUS_INT8", value)
    assert main(["ping"]) == 2
    err = capsys.readouterr().err
    assert f"ANTI_SUS_INT8={value!r} is invalid" in err and len(err.strip().splitlines()) == 1


def test_strict_boolean_env_values_and_the_negated_flag(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ANTI_SUS_INT8", "on")
    monkeypatch.setenv("ANTI_SUS_NO_WATERMARK", "off")
    args = build_parser().parse_args(["serve"])
    assert args.int8 is True and args.no_watermark is False
    assert build_parser().parse_args(["serve", "--no-int8", "--no-watermark"]).int8 is False


def test_watermark_threshold_has_one_default():
    from anti_sus.defaults import DEFAULT_WATERMARK_THRESHOLD
    from anti_sus.pipeline import DEFAULT_WATERMARK_THRESHOLD as in_pipeline

    assert build_parser().parse_args(["serve"]).watermark_threshold == DEFAULT_WATERMARK_THRESHOLD == in_pipeline
    assert build_parser().parse_args(["score", "x.png"]).watermark_threshold is None  # the server's, or the default
    for path in ("anti_sus/cli/options.py", "anti_sus/pipeline.py", "nomad/config.py"):
        assert "0.5" not in (REPO / path).read_text(), path  # the value is written once, in anti_sus/defaults.py


def test_suggest_honours_a_target_precision_or_recall():
    import numpy as np

    from anti_sus.tune import suggest

    pos, neg = np.array([0.9, 0.8, 0.7, 0.4]), np.array([0.6, 0.3, 0.2, 0.1])
    choice, why = suggest(pos, neg, target_precision=1.0)
    assert choice is not None and choice.threshold == 0.7 and "highest recall with precision >= 1.0" == why
    choice, why = suggest(pos, neg, target_recall=1.0)
    assert choice is not None and choice.threshold == 0.4 and choice.recall == 1.0 and why == "highest precision with recall >= 1.0"
    choice, why = suggest(pos, neg, target_recall=1.01)
    assert choice is None and why == "no threshold reaches recall 1.01"


def test_good_endpoints_pass_the_check():
    from photocore.settings import endpoint_problem

    for ep in ("tcp://127.0.0.1:7777", "tcp://*:7777", "tcp://[::1]:7777", "ipc:///tmp/anti-sus.sock", "inproc://x",
               "tcp://10.0.0.5:7779"):
        assert endpoint_problem(ep, binds=True) is None, ep
    assert endpoint_problem("tcp://127.0.0.1:*", binds=True) is None
    assert endpoint_problem("tcp://127.0.0.1:*", binds=False) is not None  # connecting needs a real port


def test_score_exits_1_when_every_file_failed(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    (tmp_path / "b.jpg").write_bytes(b"")
    # No server is ever contacted: nothing could be decoded.
    r = run_cli("score", str(tmp_path), "--server", "tcp://127.0.0.1:9", "--timeout", "1")
    assert r.returncode == 1, r.stderr
    assert "none of the 2 files could be scored" in r.stderr and "a.png" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout.count(",error,") == 2  # the rows are still written


def test_score_with_some_readable_files_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from PIL import Image

    from .test_anti_sus_support import fake_server, running

    Image.new("RGB", (40, 30), (150, 150, 150)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with running(fake_server()) as ep:
        assert main(["score", str(tmp_path), "--server", ep]) == 0
    out = capsys.readouterr().out
    assert "good.png" in out and "bad.png" in out


def test_tune_names_the_folder_that_is_missing_or_empty(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "x.png").write_bytes(b"")
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    cases = [
        (["--good", "/nope", "--bad", str(ok)], "--good /nope: folder does not exist"),
        (["--good", str(ok), "--bad", str(empty)], f"--bad {empty}: no image files in it"),
        (["--watermarked", str(a_file), "--clean", str(ok)], f"--watermarked {a_file}: not a folder"),
    ]
    for argv, expected in cases:
        r = run_cli("tune", *argv, "--models", str(tmp_path / "no-models"))
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)


def test_tune_says_which_folder_had_only_unreadable_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    from PIL import Image

    from anti_sus.cli import options

    from .test_anti_sus_support import FakeStages

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    Image.new("RGB", (16, 16), (150, 150, 150)).save(good / "g.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    stages = FakeStages()
    stages.details = {"gmm": {"suggested_threshold": 100.0}}  # type: ignore[attr-defined]
    monkeypatch.setattr(options, "load_pipeline", lambda *a, **k: stages)
    assert main(["tune", "--good", str(good), "--bad", str(bad), "--plot", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert f"--bad {bad}: none of its 1 image files could be read" in err and "broken.jpg" in err


def test_broker_backend_default_differs_from_gallery_bridge():
    from gallery_bridge.cli import build_parser as gallery_parser

    backend = build_parser().parse_args(["broker"]).backend
    assert backend == ["tcp://127.0.0.1:7779"]
    gallery_bind = gallery_parser().parse_args(["serve"]).bind
    ports = {ep.rsplit(":", 1)[1] for ep in (backend[0], gallery_bind, build_parser().parse_args(["serve"]).bind[0])}
    assert len(ports) == 3, ports  # anti_sus, gallery_bridge and the broker backend never collide by default
    doc = (REPO / "docs" / "anti_sus.md").read_text()
    assert "7779" in doc
    # A backend on every interface is shown only with CURVE on it (workers then authenticate).
    for m in re.finditer(r"--backend tcp://0\.0\.0\.0", doc):
        assert "--backend-curve-secret-key" in doc[m.end():m.end() + 200], doc[m.start():m.end() + 200]
