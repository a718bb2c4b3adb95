"""The models commands' command lines: photocore.settings rules (env per flag, strict booleans, one-line errors)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models import export_clip, export_watermark, fit_gmm, tiny
from models._cli import UserError, run_main
from photocore.errors import UserError as CoreUserError

REPO = Path(__file__).resolve().parent.parent


def test_models_use_the_one_user_error() -> None:
    assert UserError is CoreUserError


def test_bad_boolean_env_fails_instead_of_meaning_off(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # ANTI_SUS_TINY_INT8=enable used to mean "off" without a word.
    monkeypatch.setenv("ANTI_SUS_TINY_INT8", "enable")
    assert run_main(tiny.main, ["--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "ANTI_SUS_TINY_INT8='enable' is invalid" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("ANTI_SUS_TINY_INT8", "yes")
    assert tiny.parser().parse_args(["--out", "x"]).int8 is True
    assert tiny.parser().parse_args(["--out", "x", "--no-int8"]).int8 is False


def test_export_flags_are_shared_and_env_backed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTI_SUS_EXPORT_WATERMARK_WEIGHTS", "/w.safetensors")  # a required flag may come from the env
    monkeypatch.setenv("ANTI_SUS_EXPORT_WATERMARK_MIN_COSINE", "0.5")
    for mod, prefix in ((export_clip, "ANTI_SUS_EXPORT_CLIP_"), (export_watermark, "ANTI_SUS_EXPORT_WATERMARK_")):
        p = mod.parser()
        text = " ".join(p.format_help().split())
        for flag in ("OUT", "OPSET", "MIN_COSINE", "MAX_ABS", "THREADS", "LOG_LEVEL"):
            assert f"[env {prefix}{flag}" in text, (mod.__name__, flag)
    args = export_watermark.parser().parse_args([])
    assert args.weights == Path("/w.safetensors") and args.min_cosine == 0.5


def test_opset_below_14_is_a_one_line_error() -> None:
    r = subprocess.run([sys.executable, "-m", "models.export_clip", "--opset", "13"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "argument --opset: must be >= 14, got 13" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_fit_gmm_sources_from_env_are_exclusive_too(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ANTI_SUS_FIT_GMM_IMAGES", "/imgs")
    monkeypatch.setenv("ANTI_SUS_FIT_GMM_FEATURES", "/f.npy")
    with pytest.raises(SystemExit) as exc:
        fit_gmm.main([])
    assert exc.value.code == 2 and "not both" in capsys.readouterr().err
    monkeypatch.delenv("ANTI_SUS_FIT_GMM_FEATURES")
    assert fit_gmm.parser().parse_args([]).images == Path("/imgs")
