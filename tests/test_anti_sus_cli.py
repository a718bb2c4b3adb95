"""anti-sus command line: env-var defaults, flag parsing, keygen, clear errors without tracebacks."""
from __future__ import annotations

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
    assert "secure the broker's frontend" in capsys.readouterr().err


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
