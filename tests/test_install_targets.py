"""The install targets: CPU-only torch for users, PyPI only for CI, a torch-free demo (``make -n``: nothing installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def dry_run(target: str, tmp: Path, *assignments: str) -> str:
    """The commands ``make TARGET`` would run for a fresh venv in ``tmp`` (``-n``: none is run)."""
    # Under `make test` (as in CI) the parent make's variables (MAKEFLAGS carries `TORCH_INDEX=`) and its
    # level (which adds "Entering directory" lines) would leak into this make: start it as a user would.
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "TORCH_INDEX", "VENV", "MODELS"}}
    out = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={tmp / 'venv'}", *assignments],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.replace(str(tmp), "TMP")  # the test's own folder name must not match what is looked for


def test_setup_takes_torch_from_the_cpu_index_by_default(tmp_path: Path) -> None:
    [install] = [line for line in dry_run("setup", tmp_path).splitlines() if "[models,test]" in line]
    assert f"--extra-index-url {CPU_INDEX}" in install


def test_ci_reaches_pypi_only(tmp_path: Path) -> None:
    """.ci/run empties TORCH_INDEX: its machines reach PyPI, not download.pytorch.org."""
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test TORCH_INDEX=\n" in ci
    commands = dry_run("setup", tmp_path, "TORCH_INDEX=")
    assert "download.pytorch.org" not in commands and "--extra-index-url" not in commands
    assert "[models,test]" in commands


def test_demo_installs_no_torch(tmp_path: Path) -> None:
    commands = dry_run("demo", tmp_path)
    assert "[models" not in commands and "torch" not in commands and "download.pytorch.org" not in commands
    assert commands.strip().splitlines()[-1].endswith("-m stack.demo")


def test_models_image_uses_the_same_cpu_index() -> None:
    text = (REPO / "Dockerfile").read_text()
    models = text.split("AS models", 1)[1]
    assert f"ARG TORCH_INDEX={CPU_INDEX}" in models and '${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}' in models
