"""The product stands without the repository: ``pip install .`` then ``python -m stack.demo``.

The project is installed (``pip install --target``) from a copy of its packages, then the
offline demo runs from an empty folder with only that install on ``PYTHONPATH`` (third-party
libraries come from this venv). ``tests`` must not be importable there, every product
package must load from the install, not from this checkout, and ``torch`` must not be
importable at all (a shim package named ``torch`` that raises ImportError comes first on
``PYTHONPATH``): the runtime install has no torch, so the demo builds its tiny models with
``models.tiny_onnx``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(420)


def product_packages() -> list[str]:
    """Top-level packages the wheel ships (pyproject's find-include patterns, resolved against the tree)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    names = {p.rstrip("*").rstrip(".") for p in patterns}
    return sorted(n for n in names if (REPO / n / "__init__.py").is_file())


def install(tmp: Path) -> Path:
    """``pip install --no-deps --target`` of a copy of the sources (pip builds in the source tree: not in ours)."""
    src, target = tmp / "src", tmp / "site"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.onnx", "*.onnx.data", "*.npz", "*.pt")
    for pkg in product_packages():
        shutil.copytree(REPO / pkg, src / pkg, ignore=skip)
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--disable-pip-version-check", "--target", str(target), str(src)],
                         capture_output=True, text=True, timeout=180, cwd=tmp)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return target


def torch_blocker(tmp: Path) -> Path:
    """A folder holding a ``torch`` package whose import fails, as in a venv without the models extra."""
    shim = tmp / "no_torch"
    (shim / "torch").mkdir(parents=True)
    (shim / "torch" / "__init__.py").write_text('raise ImportError("No module named torch (blocked by the test)")\n')
    return shim


@pytest.mark.e2e  # pip install plus the whole demo: left out of `make test-fast`
def test_demo_runs_from_the_installed_package(tmp_path: Path) -> None:
    target = install(tmp_path)
    assert not (target / "tests").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDDIT_", "IMGUR_", "FLICKR_"))}
    # Only the install (not the checkout, not tests/), behind a torch that cannot be imported.
    env["PYTHONPATH"] = os.pathsep.join([str(torch_blocker(tmp_path)), str(target)])

    # Where everything loads from, in that environment: the install, and no tests package anywhere.
    probe = (
        "import importlib, importlib.util, json, sys\n"
        f"pkgs = {product_packages()!r} + ['stack.demo', 'stack.emulator', 'stack.emulator.photos']\n"
        "files = {p: importlib.import_module(p).__file__ for p in pkgs}\n"
        "try:\n    import torch\n    torch_ok = True\nexcept ImportError:\n    torch_ok = False\n"
        "import onnx\n"
        "print(json.dumps({'files': files, 'tests': importlib.util.find_spec('tests') is not None, 'torch': torch_ok}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout)
    assert seen["tests"] is False, "the tests package is importable next to the installed product"
    assert seen["torch"] is False, "torch is importable: the demo would not prove it runs without it"
    outside = {p: f for p, f in seen["files"].items() if not Path(f).resolve().is_relative_to(target.resolve())}
    assert not outside, f"loaded from outside the install: {outside}"

    # The demo itself, building its tiny models without torch.
    work = empty / "demo"
    demo = subprocess.run([sys.executable, "-m", "stack.demo", "--workdir", str(work), "--timeout", "180"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr[-4000:]
    assert "built tiny ONNX models" in demo.stdout and "nomad finished" in demo.stdout
    assert "Traceback" not in demo.stdout + demo.stderr
    delivered = sorted((work / "gallery" / "images").iterdir())
    assert delivered, demo.stdout[-4000:]
    assert re.search(rf"^  gallery +{len(delivered)} image\(s\) in ", demo.stdout, re.M), demo.stdout[-2000:]
    assert sorted(p.name for p in empty.iterdir()) == ["demo"], "the demo wrote outside its --workdir"


def test_demo_without_onnx_says_how_to_get_it(tmp_path: Path) -> None:
    """An install made with ``--no-deps`` may lack onnx: the demo says what to install in one line, exit 2."""
    code = ("import sys; sys.modules['onnx'] = None  # as in an install without the project's dependencies\n"
            "from stack.demo import main; raise SystemExit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "--workdir", str(tmp_path / "demo")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: building the tiny ONNX models needs the onnx package (a dependency of this project): "
        "pip install 'onnx>=1.15'"]
