"""The whole-system glue: model bootstrap, the local launcher (make up) and the offline demo."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from anti_sus.modeldir import read_manifest, verify, write_manifest
from stack import ensure_models
from stack.procs import Service, free_port, python_module, wait_until
from tests.conftest import REPO
from stack.emulator import Emulator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def without_gmm(tiny_models: Path, dest: Path, drop: tuple[str, ...] = ("gmm", "gmm_meta")) -> Path:
    """A copy of the tiny model directory with some artifacts removed from it and its manifest."""
    shutil.copytree(tiny_models, dest)
    manifest = read_manifest(dest)
    for name in drop:
        (dest / manifest["artifacts"][name]["file"]).unlink()
        del manifest["artifacts"][name]
    (dest / "manifest.json").unlink()
    write_manifest(dest, manifest["artifacts"], merge=False)
    return dest


def ensure_args(tmp: Path, models: Path, *extra: str) -> list[str]:
    return ["--models", str(models), "--gallery", str(tmp / "gallery"), "--state-dir", str(tmp / "state"),
            "--pretrained", "none", "--components", "2", *extra]


def gmm_source(models: Path) -> str:
    meta = json.loads((models / read_manifest(models)["artifacts"]["gmm_meta"]["file"]).read_text())
    return json.dumps(meta)


def test_gmm_bootstrapped_from_taste_subreddit_through_nomad(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    with Emulator() as emu:
        for k, v in emu.nomad_env().items():
            monkeypatch.setenv(k, v)
        nomad_flags = [f"--taste-nomad-arg={a}" for a in emu.nomad_args()]
        code = ensure_models.main(ensure_args(tmp_path, models, "--taste-source", "reddit", "--taste-subreddits", "EarthPorn",
                                              "--min-good-images", "5", *nomad_flags))
        assert code == 0
        # The taste posts were read from reddit's top listing and their images downloaded.
        assert emu.count(host="www.reddit.com") >= 1 or emu.count(host="oauth.reddit.com") >= 1
        assert any("/r/EarthPorn/top" in r.path for r in emu.requests)
    taste = ensure_models.find_images(tmp_path / "state" / "taste")
    assert len(taste) >= 2, taste
    assert verify(models) == []
    assert str(tmp_path / "state" / "taste") in gmm_source(models)


def test_gmm_fitted_on_the_gallery_when_it_is_big_enough(tiny_models: Path, tmp_path: Path) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    images = tmp_path / "gallery" / "images"
    images.mkdir(parents=True)
    rng = __import__("numpy").random.default_rng(0)
    for i in range(12):
        arr = (rng.random((64, 96, 3)) * 255).astype("uint8")
        Image.fromarray(arr).resize((320, 240)).save(images / f"{i}.jpg")
    assert ensure_models.main(ensure_args(tmp_path, models, "--min-good-images", "10")) == 0
    assert verify(models) == []
    assert "12 images" in gmm_source(models) and str(images) in gmm_source(models)


def test_missing_watermark_model_is_said_loudly(tiny_models: Path, tmp_path: Path) -> None:
    models = without_gmm(tiny_models, tmp_path / "models", drop=("watermark",))
    code = subprocess.run(python_module("stack.ensure_models", *ensure_args(tmp_path, models)),
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr
    assert "NO WATERMARK MODEL" in code.stderr and "watermark stage is OFF" in code.stderr


def test_missing_models_without_internet_fail_clearly(tmp_path: Path) -> None:
    """An empty model directory and an unreachable hub: one clear line, exit 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run(python_module("stack.ensure_models", "--models", str(tmp_path / "m"), "--pretrained", "openai",
                                       "--state-dir", str(tmp_path / "s"), "--gallery", str(tmp_path / "g")),
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2
    assert "could not export CLIP" in out.stderr and "make demo" in out.stderr
    assert "Traceback" not in out.stderr


def test_launcher_starts_four_services_and_one_ctrl_c_stops_them(tiny_models: Path, tmp_path: Path) -> None:
    web_port = free_port()
    with Emulator() as emu:
        argv = python_module("stack.up", "--models", str(tiny_models), "--gallery", str(tmp_path / "gallery"),
                             "--state-dir", str(tmp_path / "state"), "--anti-sus-port", str(free_port()),
                             "--gallery-port", str(free_port()), "--web-port", str(web_port), "--",
                             *emu.nomad_args(), "--interval", "3600", "--deadline", "3", "--http-retries", "0")
        up = Service("up", argv, tmp_path / "up.log", env=emu.nomad_env()).start()
        try:
            images = tmp_path / "gallery" / "images"
            wait_until(lambda: (images.is_dir() and any(images.iterdir())) or not up.running, 240, 1.0,
                       "the first image to reach the gallery under the launcher")
            assert up.running, up.tail(60)
            assert (tmp_path / "gallery" / "index.html").is_file()
            # The web app serves what the gallery holds (it starts before nomad; give it the same time).
            api = f"http://127.0.0.1:{web_port}/api/images?limit=1"
            wait_until(lambda: _total(api) > 0 or not up.running, 60, 0.5, "the web app to show the gallery")
            up.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
            assert up.proc.wait(timeout=120) == 0, up.tail(60)
        finally:
            up.stop()
    log = up.tail(400)
    for name in ("anti_sus", "gallery_bridge", "nomad", "web"):
        assert f"started {name}" in log
    # No child outlives the launcher.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "state") not in ps and str(tmp_path / "gallery") not in ps


def _total(url: str) -> int:
    """``total`` of the web app's /api/images, 0 while it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(json.load(r)["total"])
    except OSError:
        return 0


def test_offline_demo(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "stack.demo", "--workdir", str(tmp_path / "demo")], cwd=REPO,
                         capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "summary" in out.stdout and "accepted by anti_sus" in out.stdout and "rejected" in out.stdout
    for name in ("reddit", "commons", "flickr", "bluesky"):  # every key-less source ran, without credentials
        assert re.search(rf"^  {name} +on .*last: ok at ", out.stdout, re.M), out.stdout[-3000:]
    index = tmp_path / "demo" / "gallery" / "index.html"
    assert index.as_uri() in out.stdout and index.is_file()
    # The web app ran beside the services and saw every image the gallery holds.
    shown = re.search(r"^browse the gallery: http://127\.0\.0\.1:\d+/  \((\d+) images, (\d+) rejected images to review",
                      out.stdout, re.M)
    assert shown, out.stdout[-2000:]
    assert int(shown.group(1)) == len(list((tmp_path / "demo" / "gallery" / "images").iterdir())) > 0
    assert int(shown.group(2)) > 0, "the demo's review page is empty: anti_sus rejected nothing nomad could send"
