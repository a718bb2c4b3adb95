"""The source registry: which listing sources exist and run, their flags, `nomad sources`, URL -> expander."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from nomad.cli import build_crawler, build_parser, main
from nomad.sources import registry
from nomad.sources.base import Candidate, ImageRef, Link, ListingSource, SourceConfigError
from nomad.store import Store

KEYS = ("REDDIT_CLIENT_ID", "REDDIT_CLIENT_SECRET", "IMGUR_CLIENT_ID", "FLICKR_API_KEY", "NOMAD_CONTACT", "NOMAD_SOURCE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)


def args(*argv: str, env: dict[str, str] | None = None) -> Any:
    return build_parser(env or {}).parse_args(["once", *argv])


def test_present_modules_are_found_and_missing_or_incomplete_ones_skipped(monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    half = types.ModuleType("nomad.sources.halfdone")
    half.NAME = "halfdone"  # type: ignore[attr-defined]  # no add_flags/build/available yet
    monkeypatch.setitem(sys.modules, "nomad.sources.halfdone", half)
    with caplog.at_level(logging.DEBUG, logger="nomad.sources.registry"):
        found = registry.listing_modules(("reddit", "nosuchsource", "halfdone", "flickr"))
    assert list(found) == ["reddit", "flickr"]
    text = caplog.text
    assert "no module nomad.sources.nosuchsource" in text and "lacks add_flags, build, available" in text


def test_every_present_module_keeps_the_contract() -> None:
    mods = registry.listing_modules()
    assert {"reddit", "flickr"} <= set(mods)
    for name, mod in mods.items():
        assert mod.NAME == name and callable(mod.build) and callable(mod.available) and callable(mod.add_flags)


def test_default_is_every_available_source_and_source_picks() -> None:
    mods = registry.listing_modules()
    default = registry.selected(args(), {})
    assert default == [n for n, m in mods.items() if m.available(args(), {})] and {"reddit", "flickr"} <= set(default)
    assert registry.selected(args("--source", "flickr", "--source", "reddit"), {}) == ["flickr", "reddit"]
    assert registry.selected(args("--source", "flickr,reddit,flickr"), {}) == ["flickr", "reddit"]
    env = {"NOMAD_SOURCE": "reddit,flickr"}
    assert registry.selected(build_parser(env).parse_args(["once"]), env) == ["reddit", "flickr"]
    with pytest.raises(SourceConfigError, match="unknown source 'myspace'"):
        registry.selected(args("--source", "myspace"), {})


def fake_module(name: str, *, ok: bool, available: bool = True) -> types.ModuleType:
    mod = types.ModuleType(f"fake.{name}")

    class Src(ListingSource):
        pass

    Src.name = name

    def build(a: Any, ctx: Any) -> ListingSource:
        if not ok:
            raise SourceConfigError(f"{name} needs SOMETHING")
        return Src()

    mod.NAME, mod.build, mod.available, mod.add_flags = name, build, lambda a, e: available, lambda f: None  # type: ignore[attr-defined]
    return mod


def test_unavailable_sources_stay_off_and_a_source_that_cannot_build_is_an_error() -> None:
    mods = {"reddit": fake_module("reddit", ok=True), "commons": fake_module("commons", ok=False, available=False)}
    ctx = types.SimpleNamespace(environ={})
    built = registry.build_sources(args(), ctx, mods)  # type: ignore[arg-type]
    assert [s.name for s in built] == ["reddit"]  # commons is not configured: off by default, no error
    with pytest.raises(SourceConfigError, match="source commons: commons needs SOMETHING"):
        registry.build_sources(args("--source", "commons"), ctx, mods)  # type: ignore[arg-type]
    half = {"reddit": fake_module("reddit", ok=False)}  # available, but configured halfway
    with pytest.raises(SourceConfigError, match="source reddit: reddit needs SOMETHING"):
        registry.build_sources(args(), ctx, half)  # type: ignore[arg-type]
    with pytest.raises(SourceConfigError, match="no listing source can run"):
        registry.build_sources(args(), ctx, {"commons": mods["commons"]})  # type: ignore[arg-type]


def test_expanders_by_url() -> None:
    exp = registry.build_expanders(None, args(), {})
    assert exp.for_url("https://imgur.com/a/Xy7Pq2Z").name == "imgur"  # type: ignore[union-attr]
    assert exp.for_url("https://i.imgur.com/Ab1Cd2E.jpg").name == "imgur"  # type: ignore[union-attr]
    for url in ("https://www.flickr.com/photos/u/1/", "https://flic.kr/p/2abc", "https://live.staticflickr.com/1/2_x_b.jpg"):
        assert exp.for_url(url).name == "flickr"  # type: ignore[union-attr]
    for url in ("https://i.redd.it/a.jpg", "https://notimgur.com/a.jpg", "not a url", ""):
        assert exp.for_url(url) is None


def test_crawler_expands_through_the_registry_and_applies_rules_per_source(tmp_path: Path) -> None:
    a = args("--source", "reddit", "--source", "flickr", "--state-dir", str(tmp_path), "--save-dir", str(tmp_path / "out"))
    crawler = build_crawler(a, threading.Event(), environ={})
    try:
        calls: list[str] = []

        class Photos:
            def expand(self, link: Link, prefix: str, start: int) -> list[ImageRef]:
                calls.append(link.url)
                return [ImageRef(f"{prefix}:{start}", "https://cdn.photos.example/full.jpg", 2000, 1500)]

        crawler.expanders.expanders.insert(0, registry.Expander("photos", ("photos.example",), Photos()))
        post = Candidate("reddit", "t3_x", links=[Link("https://photos.example/p/1"), Link("https://i.redd.it/b.jpg")])
        refs = crawler.expand(post)
        assert calls == ["https://photos.example/p/1"]
        assert [r.url for r in refs] == ["https://cdn.photos.example/full.jpg", "https://i.redd.it/b.jpg"]
        assert [r.key for r in refs] == ["reddit:t3_x:0", "reddit:t3_x:1"]
        # 1024x683: too small for reddit's 1280x1024, the flickr feed's best size by its own rule.
        assert crawler.rules_for("reddit:t3_x:0").check_size(1024, 683) == "too_small"
        assert crawler.rules_for("flickr:flickr_1:0").check_size(1024, 683) is None
        assert crawler.rules_for("flickr:flickr_1:0").check_size(1024, 400) == "too_small"
        assert [s.name for s in crawler.sources] == ["reddit", "flickr"]
    finally:
        crawler.close()
        crawler.store.close()


def test_flickr_size_rule_flags() -> None:
    a = args("--flickr-min-long-side", "800", env={"NOMAD_FLICKR_MIN_SHORT_SIDE": "500"})
    assert registry.size_rules(a, ["reddit", "flickr"]) == {"flickr": (800, 500)}


def test_nomad_sources_prints_each_source_with_its_last_status(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with Store(tmp_path) as s:
        s.set_source_status("reddit", "blocked", "anonymous JSON answers reddit's 403 block page", time.time())
        s.set_source_status("flickr", "rate_limited", "HTTP 429 from flickr", time.time())
    assert main(["sources", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(registry.LISTING_MODULES) <= set(lines)
    assert "on  (default)" in lines["reddit"] and "none (anonymous: Atom feeds)" in lines["reddit"]
    assert "last: blocked at " in lines["reddit"] and "block page" in lines["reddit"]
    assert "last: rate_limited at " in lines["flickr"]
    monkeypatch.setenv("REDDIT_CLIENT_ID", "id")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", "secret")
    assert main(["sources", "--state-dir", str(tmp_path), "--source", "reddit", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["reddit"]["on"] and rows["reddit"]["credentials"].startswith("REDDIT_CLIENT_ID")
    assert not rows["flickr"]["on"] and rows["flickr"]["why"] == "not in --source"
    assert rows["reddit"]["status"]["state"] == "blocked"


def test_nomad_sources_refuses_an_unknown_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sources", "--state-dir", str(tmp_path), "--source", "myspace"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nomad: error: unknown source 'myspace'") and err.count("\n") == 1
