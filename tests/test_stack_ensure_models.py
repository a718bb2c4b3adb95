"""The account-less GMM bootstrap: taste images from Wikimedia Commons Featured pictures (emulated),
and one clear line with exit 2 for every way it can fail."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from anti_sus.modeldir import verify
from stack import ensure_models
from stack.procs import free_port, python_module
from stack.emulator import Emulator
from stack.emulator.commons import FEATURED
from tests.test_stack import ensure_args, gmm_source, without_gmm

pytestmark = pytest.mark.timeout(300)

CONTACT = "ops@example.org"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: no reddit/imgur/flickr credentials, no nomad settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDDIT_", "IMGUR_", "FLICKR_", "NOMAD_", "STACK_"))}
    return {**env, **extra}


@pytest.fixture()
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


def taste_flags(emu: Emulator) -> list[str]:
    return [f"--taste-nomad-arg={a}" for a in emu.nomad_args()]


def test_gmm_bootstrapped_from_commons_featured_pictures_without_accounts(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, emu: Emulator
) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    monkeypatch.setattr(os, "environ", clean_env(NOMAD_CONTACT=CONTACT))
    code = ensure_models.main(ensure_args(tmp_path, models, "--min-good-images", "5", *taste_flags(emu)))
    assert code == 0
    records = emu.records()
    # Commons' Featured pictures were read newest first, with the contact in the User-Agent.
    listing = [r for r in records if r.query.get("cmtitle") == [FEATURED]]
    assert listing and all(r.query["cmdir"] == ["older"] for r in listing)
    assert all(f"({CONTACT})" in r.headers["User-Agent"] for r in records if r.host == "commons.wikimedia.org")
    assert not [r for r in records if "reddit" in r.host]
    # Only the featured photos that pass nomad's rules were kept: two thumbnails and one original.
    taste = sorted(p.name for p in ensure_models.find_images(tmp_path / "state" / "taste"))
    assert taste == ["commons_M90000001_0.jpeg", "commons_M90000002_0.jpeg", "commons_M90000006_0.png"]
    downloads = sorted(r.path.rsplit("/", 1)[-1] for r in records if r.host == "upload.wikimedia.org")
    assert downloads == ["1280px-Old_town_portrait.jpg", "1920px-Alpine_lake_at_dawn.jpg", "Harbour_at_night.png"]
    # The image downloads carry the contact too (Wikimedia's rule covers upload.wikimedia.org).
    assert all(f"({CONTACT})" in r.headers["User-Agent"] for r in records if r.host == "upload.wikimedia.org")
    assert verify(models) == []
    assert str(tmp_path / "state" / "taste") in gmm_source(models)


def run_ensure(tmp_path: Path, models: Path, *extra: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(python_module("stack.ensure_models", *ensure_args(tmp_path, models, "--min-good-images", "5", *extra)),
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_python_m_stack_ensure_models_random_clip_then_gmm_from_commons(tmp_path: Path, emu: Emulator) -> None:
    """From an empty model directory, no accounts: CLIP with random weights, then the GMM on Featured pictures."""
    models = tmp_path / "models"
    out = run_ensure(tmp_path, models, *taste_flags(emu), env=clean_env(NOMAD_CONTACT=CONTACT), timeout=800)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Traceback" not in out.stderr and "NO WATERMARK MODEL" in out.stderr
    assert verify(models) == []
    arts = json.loads((models / "manifest.json").read_text())["artifacts"]
    assert arts["clip"]["provenance"]["pretrained"] == "none"  # the random encoder, built here
    taste = sorted(p.name for p in ensure_models.find_images(tmp_path / "state" / "taste"))
    assert taste == ["commons_M90000001_0.jpeg", "commons_M90000002_0.jpeg", "commons_M90000006_0.png"]
    assert str(tmp_path / "state" / "taste") in gmm_source(models)
    listing = [r for r in emu.records() if r.query.get("cmtitle") == [FEATURED]]
    assert listing and not [r for r in emu.records() if "reddit" in r.host]


def assert_one_clear_line(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


def test_without_contact_one_clear_line(tiny_models: Path, tmp_path: Path, emu: Emulator) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    out = run_ensure(tmp_path, models, *taste_flags(emu), env=clean_env())
    assert_one_clear_line(out, "NOMAD_CONTACT")
    assert emu.count(host="commons.wikimedia.org") == 0


def test_commons_unreachable_one_clear_line(tiny_models: Path, tmp_path: Path) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    dead = free_port()  # nothing listens there: connections are refused
    with Emulator() as emu:  # only for its CA bundle and host pins
        flags = [f.replace(f":{emu.port}", f":{dead}") for f in taste_flags(emu)]
        out = run_ensure(tmp_path, models, *flags, env=clean_env(NOMAD_CONTACT=CONTACT))
        assert emu.count() == 0
    assert_one_clear_line(out, "cannot read the newest Wikimedia Commons Featured pictures")


def test_commons_blocked_one_clear_line(tiny_models: Path, tmp_path: Path, emu: Emulator) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    emu.scenario.inject[("commons.wikimedia.org", "/w/api.php")] = [403]
    out = run_ensure(tmp_path, models, *taste_flags(emu), env=clean_env(NOMAD_CONTACT=CONTACT))
    assert_one_clear_line(out, "Wikimedia Commons", "403")


def test_nothing_downloadable_one_clear_line(tiny_models: Path, tmp_path: Path, emu: Emulator) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    # Rules no featured file can meet: nothing is downloaded.
    out = run_ensure(tmp_path, models, *taste_flags(emu), "--taste-nomad-arg=--min-long-side=20000",
                     env=clean_env(NOMAD_CONTACT=CONTACT))
    assert_one_clear_line(out, "no good images", "Wikimedia Commons Featured pictures")
    assert emu.count(host="upload.wikimedia.org") == 0


def test_reddit_taste_without_oauth_one_clear_line(tiny_models: Path, tmp_path: Path, emu: Emulator) -> None:
    models = without_gmm(tiny_models, tmp_path / "models")
    out = run_ensure(tmp_path, models, "--taste-source", "reddit", *taste_flags(emu), env=clean_env())
    assert_one_clear_line(out, "REDDIT_CLIENT_ID")


def test_bad_taste_source_env_exits_2(tmp_path: Path) -> None:
    """A bad STACK_… variable is one line naming it and exit 2, before anything is built (all of them, not only this one)."""
    out = subprocess.run(python_module("stack.ensure_models", "--models", str(tmp_path / "m")), capture_output=True,
                         text=True, timeout=60, env=clean_env(STACK_TASTE_SOURCE="flickr"))
    assert out.returncode == 2 and "STACK_TASTE_SOURCE" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("var,value", [("STACK_TASTE_LIMIT", "many"), ("STACK_MIN_GOOD_IMAGES", "0"), ("STACK_INT8", "maybe")])
def test_every_bad_stack_variable_is_one_line(tmp_path: Path, var: str, value: str) -> None:
    """The model flags share photocore.settings' rules: a bad number or boolean names its variable, no traceback."""
    out = subprocess.run(python_module("stack.ensure_models", "--models", str(tmp_path / "m")), capture_output=True,
                         text=True, timeout=60, env=clean_env(**{var: value}))
    assert out.returncode == 2 and var in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
