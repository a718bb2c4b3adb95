"""Model artifacts default to var/models; the old models/ folder is still read, with one notice."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from photocore import paths
from photocore.paths import DEFAULT_MODELS_DIR, LEGACY_MODELS_DIR, models_dir
from tests.conftest import REPO


def _manifest(folder: Path, files: tuple[str, ...] = ("clip_visual.onnx",)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arts = {f"a{i}": {"file": f, "sha256": "0" * 64} for i, f in enumerate(files)}
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "artifacts": arts}))


@pytest.fixture(autouse=True)
def _fresh_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "_noticed", set())


def test_the_default_is_a_data_folder_and_the_manifest_name_matches_anti_sus() -> None:
    from anti_sus.modeldir import MANIFEST

    assert DEFAULT_MODELS_DIR == "var/models" and paths.MANIFEST == MANIFEST
    assert models_dir() == Path("var/models")


def test_default_with_nothing_built_is_var_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert models_dir(None, base=tmp_path) == tmp_path / "var/models"
    assert models_dir("var/models", base=tmp_path) == tmp_path / "var/models"
    assert not caplog.records


def test_old_location_is_read_with_one_notice_saying_how_to_move(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _manifest(tmp_path / LEGACY_MODELS_DIR, ("clip_visual.onnx", "gmm.npz"))
    with caplog.at_level(logging.WARNING, logger="photocore.paths"):
        assert models_dir(None, base=tmp_path) == tmp_path / "models"
        assert models_dir("var/models", base=tmp_path) == tmp_path / "models"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1, notices
    assert "old location" in notices[0] and "mkdir -p" in notices[0]
    for name in ("manifest.json", "clip_visual.onnx", "gmm.npz"):
        assert str(tmp_path / "models" / name) in notices[0]


def test_new_location_wins_over_the_old_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _manifest(tmp_path / LEGACY_MODELS_DIR)
    _manifest(tmp_path / DEFAULT_MODELS_DIR)
    assert models_dir(None, base=tmp_path) == tmp_path / "var/models"
    assert not caplog.records


def test_a_folder_given_on_purpose_is_used_as_given(tmp_path: Path) -> None:
    _manifest(tmp_path / LEGACY_MODELS_DIR)
    assert models_dir(tmp_path / "elsewhere", base=tmp_path) == tmp_path / "elsewhere"
    assert models_dir("models") == Path("models")


def test_every_command_defaults_to_var_models() -> None:
    """One default, read by each command that takes a model directory."""
    from stack import up

    assert up.parser().parse_args([]).models == Path(DEFAULT_MODELS_DIR)
    makefile = (REPO / "Makefile").read_text()
    assert f"MODELS ?= {DEFAULT_MODELS_DIR}\n" in makefile
    assert "/var/" in (REPO / ".gitignore").read_text().split()
    for mod, flag in (("anti_sus", "serve"), ("models.fit_gmm", None), ("models.export_clip", None)):
        argv = [sys.executable, "-m", mod, *([flag] if flag else []), "--help"]
        out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "var/models" in out.stdout, (mod, out.stdout)


@pytest.mark.parametrize("where", ["var/models", "models"])
def test_ensure_models_uses_either_location(where: str, tiny_models: Path, tmp_path: Path) -> None:
    """A complete model folder in the new or the old place is found by the default; only the old one gets the notice."""
    shutil.copytree(tiny_models, tmp_path / where)
    out = subprocess.run([sys.executable, "-m", "stack.ensure_models", "--gallery", str(tmp_path / "g"),
                          "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("old location" in out.stderr) == (where == "models"), out.stderr
    # Nothing was built into the other folder: the complete one was used.
    other = "models" if where == "var/models" else "var/models"
    assert not (tmp_path / other / "manifest.json").exists()
