"""Wikimedia Commons listing source: thumb sizes, licence fields, cursors, politeness, hostile answers.

Parsers are checked against tests/fixtures/commons_*.json (real API shapes);
the rest runs against the emulator's Commons (stack/emulator/commons.py)
through nomad's own HttpClient, with the SSRF guard on.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from nomad.config import _Flags
from nomad.http import HttpClient, HttpConfig
from nomad.rules import Rules
from nomad.sources import commons
from nomad.sources.api import SiteApi, SourceContext
from nomad.sources.base import SourceError
from nomad.sources.commons import CommonsSource, Entry, plain_text, thumb_step, user_agent
from nomad.store import Store
from tests.conftest import FIXTURES, REPO
from tests.nomad_fakes import Cursors
from stack.emulator import Emulator

CONTACT = "ops@example.org"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())



@pytest.fixture()
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


class Waits:
    """A SiteApi sleep that records instead of sleeping (never asks to stop)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> bool:
        self.calls.append(seconds)
        return False


def make_source(emu: Emulator, *, ua: str | None = None, interval: float = 0.0, sleep: Any = None, **kw: Any) -> CommonsSource:
    http = HttpClient(HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, retries=0))
    api = SiteApi(http, "commons", min_interval=interval, headers={"User-Agent": ua or user_agent(CONTACT)},
                  sleep=sleep if sleep is not None else Waits(), backoff=0.01)
    return CommonsSource(api, api_url=emu.url("commons.wikimedia.org", "w/api.php"), **kw)


def api_requests(emu: Emulator) -> list[Any]:
    return [r for r in emu.records() if r.host == "commons.wikimedia.org"]


# --- pure parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,step", [
    ((4000, 3000), 1920),   # 4:3 needs 1366 wide for a 1024 short side; 1280 would give 960
    ((3000, 4500), 1280),   # portrait: 1280 x 1920
    ((6000, 6000), 1280),   # square
    ((2400, 1600), 1920),
    ((8000, 2700), 3840),   # ~3:1 needs 3034 wide
    ((1600, 1200), None),   # next step (1920) is not below the original: take the original
    ((1000, 750), None),    # too small anyway
    ((9000, 2000), None),   # would need 4608: no step is that big
])
def test_thumb_step_meets_the_size_rules(size: tuple[int, int], step: int | None) -> None:
    assert thumb_step(*size, 1280, 1024) == step
    if step is not None:
        w, h = size
        assert Rules().check_size(step, round(h * step / w)) is None  # the thumb itself passes


def test_user_agent_and_contact() -> None:
    ua = user_agent(CONTACT)
    assert ua.startswith("nomad-photo-miner/") and f"({CONTACT})" in ua and " urllib3/" in ua
    for bad in ("", "   ", None, "a\nb", "x (y)"):
        with pytest.raises(ValueError, match="NOMAD_CONTACT"):
            commons.check_contact(bad)


def test_plain_text_strips_html() -> None:
    assert plain_text('<a href="//x">Ann &amp; <b>Bo</b></a>\n  <bdi>Jo&#233;</bdi>') == "Ann & Bo Joé"
    assert plain_text(None) == "" and plain_text(42) == ""


def test_candidate_from_fixture_carries_licence_and_picks_sizes() -> None:
    src = CommonsSource(SiteApi(HttpClient(), "commons"))
    pages = {p["pageid"]: p for p in fixture("commons_imageinfo.json")["query"]["pages"]}
    members = fixture("commons_categorymembers.json")["query"]["categorymembers"]
    by_id = {m["pageid"]: Entry(m["pageid"], m["title"], m["timestamp"]) for m in members}
    src._apply_pages(list(pages.values()), by_id, 1920)
    king = src.candidate(by_id[147990318], "featured")
    assert king.post_id == "M147990318" and king.source == "commons"
    assert king.extra["license"] == "CC BY-SA 4.0"
    assert king.extra["license_url"] == "https://creativecommons.org/licenses/by-sa/4.0"
    assert king.extra["artist"] == "Example Birder & Joé Sample" and king.author == king.extra["artist"]
    assert king.extra["credit"] == "Own work"
    assert king.extra["description_url"] == "https://commons.wikimedia.org/wiki/File:Kingfisher_(Alcedo_atthis)_on_a_branch.jpg"
    assert king.title == "Kingfisher (Alcedo atthis) on a branch"
    assert king.created_utc is not None
    (link,) = king.links
    assert "/thumb/" in link.url and link.url.endswith("/1920px-Kingfisher_%28Alcedo_atthis%29_on_a_branch.jpg")
    assert (link.width, link.height) == (1920, 1280)
    # 1600x1200: the 1920 step is not below the original, so the original is fetched.
    lake = src.candidate(by_id[148101552], "featured")
    assert lake.links[0].url == pages[148101552]["imageinfo"][0]["url"] and lake.links[0].width == 1600
    assert lake.extra["license"] == "CC0" and lake.extra["artist"] == "Alp Walker"
    # Everything a candidate carries reaches the gallery through meta().
    assert {"license", "license_url", "artist", "credit", "description_url"} <= set(king.meta())


def test_allimages_fixture_order_and_types() -> None:
    src = CommonsSource(SiteApi(HttpClient(), "commons"))
    pages = fixture("commons_allimages.json")["query"]["pages"]
    by_id = {p["pageid"]: Entry(p["pageid"], p["title"], p["imageinfo"][0]["timestamp"]) for p in pages}
    src._apply_pages(pages, by_id, 1920)
    tif = src.candidate(by_id[181200398], "uploads")
    assert tif.links == [] and Rules().check_post(tif) == "no_image"  # TIFF: never downloaded
    webp = src.candidate(by_id[181200417], "uploads")
    assert webp.links[0].url.endswith("1920px-Harbour_cranes_at_dusk.webp")


# --- against the emulator ------------------------------------------------------------------------------


def outcome(post: Any, rules: Rules) -> str:
    """The scenario label for a candidate, judged by nomad's own rules on the reported size."""
    reason = rules.check_post(post)
    if reason:
        return {"no_image": "skip_not_image", "video": "skip_video", "removed": "skip_removed"}.get(reason, reason)
    from nomad.sources.base import direct_ref

    ref = direct_ref(f"{post.source}:{post.post_id}:0", post.links[0])
    reason = rules.check_ref(ref)
    return {None: "accept_candidate", "too_small": "skip_small", "too_wide": "skip_aspect",
            "animated": "skip_animated"}.get(reason, str(reason))


def test_poll_every_listing_right_outcomes_then_nothing_again(emu: Emulator) -> None:
    src = make_source(emu)
    cur, seen = Cursors(), set()
    posts = []
    for post in src.poll(cur, seen.__contains__):
        posts.append(post)
        seen.add(post.post_id)  # what the crawler records before asking for the next one
    got = {p.post_id: outcome(p, Rules()) for p in posts}
    assert got == emu.scenario.commons.expected
    assert len(posts) == len(got)  # the file in both Featured and Quality came once
    by_id = {p.post_id: p for p in posts}
    assert by_id["M90000002"].links[0].url.endswith("/1280px-Old_town_portrait.jpg")
    assert by_id["M90000008"].links[0].url.endswith("/1920px-Forest_stream.webp")
    assert "/thumb/" not in by_id["M90000006"].links[0].url  # original PNG
    assert by_id["M90000001"].extra["commons_listing"] == "featured"
    # Every listed thumbnail or original exists on the emulated upload host.
    for p in posts:
        for link in p.links:
            assert ("upload.wikimedia.org", link.url.split(f":{emu.port}", 1)[1]) in emu.scenario.files
    first = len(api_requests(emu))
    assert list(src.poll(cur, seen.__contains__)) == []
    again = api_requests(emu)[first:]
    # One listing request per listing, no imageinfo for files already handled.
    assert len(again) == 3 and not any("pageids" in r.query for r in again)


def test_every_request_is_polite(emu: Emulator) -> None:
    src = make_source(emu, interval=0.3, sleep=lambda s: __import__("time").sleep(s) or False)
    list(src.poll(Cursors(), lambda _pid: False))
    reqs = api_requests(emu)
    assert len(reqs) >= 5
    for r in reqs:
        assert r.query["maxlag"] == ["5"] and r.query["formatversion"] == ["2"] and r.query["format"] == ["json"]
        assert r.headers["User-Agent"] == user_agent(CONTACT)
    gaps = [b.time - a.time for a, b in zip(reqs, reqs[1:])]
    # Serial and paced (unpaced requests come a few ms apart; the server sees arrival times, hence the margin).
    assert min(gaps) >= 0.2


def test_generic_user_agent_is_blocked(emu: Emulator) -> None:
    src = make_source(emu, ua="python-urllib3/2.0", listings=["featured"])
    with pytest.raises(SourceError) as ei:
        list(src.poll(Cursors(), lambda _pid: False))
    assert ei.value.reason == "blocked" and src.api.status.state == "blocked"


def test_continue_token_sent_back_verbatim_and_limit_per_cycle(emu: Emulator) -> None:
    src = make_source(emu, listings=["featured"], limit=2)
    cur, seen = Cursors(), set()
    rounds = []
    for _ in range(10):
        got = [p.post_id for p in src.poll(cur, seen.__contains__)]
        seen.update(got)
        rounds.append(got)
        if not got:
            break
    assert all(len(r) <= 2 for r in rounds)
    assert sum(map(len, rounds)) == 7 and len(seen) == 7  # 7 files; the subcategory is no file
    lists = [r for r in api_requests(emu) if r.query.get("list") == ["categorymembers"]]
    assert all(r.query["cmnamespace"] == ["6"] and r.query["cmsort"] == ["timestamp"] for r in lists)
    tokens = [r.query["cmcontinue"][0] for r in lists if "cmcontinue" in r.query]
    assert tokens, "paging must use the API's continue token"
    assert all(r.query["cmstart"] == lists[0].query["cmstart"] for r in lists[: len(tokens) + 1])


def test_maxlag_error_is_waited_out(emu: Emulator) -> None:
    waits = Waits()
    src = make_source(emu, listings=["featured"], sleep=waits)
    emu.scenario.commons.maxlag_next = 2
    statuses: list[str] = []
    src.api._on_status = lambda _name, st: statuses.append(st.state)
    posts = list(src.poll(Cursors(), lambda _pid: False))
    assert len(posts) == 7
    assert len([w for w in waits.calls if w >= 1.0]) >= 2  # Retry-After: 1, twice
    assert "rate_limited" in statuses and statuses[-1] == "ok"


def test_maxlag_that_does_not_end_is_a_transient_error(emu: Emulator) -> None:
    src = make_source(emu, listings=["featured"])
    emu.scenario.commons.maxlag_next = 100
    with pytest.raises(SourceError) as ei:
        list(src.poll(Cursors(), lambda _pid: False))
    assert ei.value.reason == "maxlag" and ei.value.transient


def test_429_with_retry_after(emu: Emulator) -> None:
    waits = Waits()
    src = make_source(emu, listings=["featured"], sleep=waits)
    emu.scenario.inject[("commons.wikimedia.org", "/w/api.php")] = [429, 429]
    assert len(list(src.poll(Cursors(), lambda _pid: False))) == 7
    assert len([w for w in waits.calls if w >= 1.0]) >= 2


def test_truncated_answer_fails_that_listing_only_and_loses_nothing(emu: Emulator) -> None:
    src = make_source(emu, listings=["featured", "uploads"])
    cur, seen = Cursors(), set()
    emu.scenario.commons.truncate_next = 1  # the first request: featured's listing page
    got = []
    with pytest.raises(SourceError) as ei:
        for p in src.poll(cur, seen.__contains__):
            got.append(p.post_id)
            seen.add(p.post_id)
    assert ei.value.reason == "bad_answer"
    assert sorted(got) == ["M90000010", "M90000011"]  # uploads still had its turn
    assert not cur.get("featured:continue")
    again = [p.post_id for p in src.poll(cur, seen.__contains__)]
    assert len(again) == 7 and all(pid.startswith("M9") for pid in again)


def test_first_poll_starts_lookback_hours_back(emu: Emulator) -> None:
    src = make_source(emu, listings=["featured", "uploads"], lookback=1200.0)  # 20 minutes
    got = [p.post_id for p in src.poll(Cursors(), lambda _pid: False)]
    assert got == []  # every emulated file joined or was uploaded longer ago
    src = make_source(emu, listings=["featured", "uploads"], lookback=48 * 3600.0)
    cur = Cursors()
    got = [p.post_id for p in src.poll(cur, lambda _pid: False)]
    assert len(got) == 9
    # uploads never start more than an hour back (a day of Commons uploads is tens of thousands)
    starts = {r.query.get("list", r.query.get("generator"))[0]: commons.epoch((r.query.get("cmstart") or r.query["gaistart"])[0])
              for r in api_requests(emu) if "cmstart" in r.query or "gaistart" in r.query}
    assert starts["allimages"] - starts["categorymembers"] >= 47 * 3600


def test_newest_first_for_the_bootstrap(emu: Emulator) -> None:
    src = make_source(emu)
    ids = [p.post_id for p in src.newest("featured", 3)]
    assert ids == ["M90000012", "M90000006", "M90000005"]
    assert [p.post_id for p in src.newest("featured", 100)][-1] == "M90000001"


# --- cursors in the store, across a kill -9 ------------------------------------------------------------

CHILD = r"""
import os, signal, sys
from nomad.http import HttpClient, HttpConfig
from nomad.sources.api import SiteApi
from nomad.sources.commons import CommonsSource, user_agent
from nomad.store import Store
from nomad.sources.base import Candidate

state, api_url, ca, kill_after, *resolve = sys.argv[1:]
store = Store(state)
http = HttpClient(HttpConfig(resolve=resolve, ca_bundle=ca, retries=0))
src = CommonsSource(SiteApi(http, "commons", headers={"User-Agent": user_agent("ops@example.org")}),
                    api_url=api_url, listings=["featured"], limit=3)
n = 0
for _cycle in range(5):
    for post in src.poll(store.cursors_of("commons"), store.seen_post):
        store.record_post(post, "expanded")
        n += 1
        if n == int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_cursors_survive_kill_9(emu: Emulator, tmp_path: Path) -> None:
    state = tmp_path / "state"
    argv = [sys.executable, "-c", CHILD, str(state), emu.url("commons.wikimedia.org", "w/api.php"), emu.ca_bundle]
    # Killed in the middle of its second cycle (limit 3: cycles of 3, 3, 1 files).
    child = subprocess.run(argv + ["5", *emu.resolve_entries()], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Store(state) as store:
        cur = store.cursors_of("commons")
        assert cur.get("featured:continue")  # the first page was finished and moved past
        src = make_source(emu, listings=["featured"], limit=50)
        seen_before = {f"M{i}" for i in range(90000000, 90000020) if store.seen_post(f"M{i}")}
        assert len(seen_before) == 5
        rest = []
        for post in src.poll(cur, store.seen_post):
            store.record_post(post, "expanded")
            rest.append(post.post_id)
        assert len(rest) == 2 and not set(rest) & seen_before  # nothing twice, nothing lost
        assert list(src.poll(cur, store.seen_post)) == []


# --- the registry's module interface ---------------------------------------------------------------------


def parser_with_flags(environ: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    commons.add_flags(_Flags(p, environ))
    return p


def test_flags_env_and_build(emu: Emulator) -> None:
    env = {"NOMAD_COMMONS_LIMIT": "7", "NOMAD_COMMONS_LISTING": "featured,category:Pictures of the day"}
    p = parser_with_flags(env)
    args = p.parse_args(["--commons-interval", "2.5"])
    help_text = p.format_help()
    for flag in ("--commons-api-url", "--commons-listing", "--commons-limit", "--commons-interval", "--commons-lookback"):
        assert flag in help_text
    assert "NOMAD_CONTACT" in help_text
    ctx = SourceContext(http=HttpClient(), user_agent="x", environ={}, sleep=lambda s: False)
    assert not commons.available(args, {}) and commons.available(args, {"NOMAD_CONTACT": CONTACT})
    assert "NOMAD_CONTACT is unset" in commons.credentials({}) and CONTACT in commons.credentials({"NOMAD_CONTACT": CONTACT})
    with pytest.raises(ValueError, match="NOMAD_CONTACT"):
        commons.build(args, ctx)
    ctx.environ = {"NOMAD_CONTACT": CONTACT}
    src = commons.build(args, ctx)
    assert src.limit == 7 and src.listings == ["featured", "category:Pictures_of_the_day"]
    assert src.api.min_interval == 2.5 and src.api.headers["User-Agent"] == user_agent(CONTACT)
    assert src.api_url == commons.DEFAULT_API
    with pytest.raises(SystemExit):
        parser_with_flags({}).parse_args(["--commons-listing", "everything"])


# --- the emulator's answers have the fixtures' shape ---------------------------------------------------


def test_emulated_answers_match_the_fixtures(emu: Emulator) -> None:
    src = make_source(emu)
    members = src.query({"list": "categorymembers", "cmtitle": commons.CATEGORIES["featured"], "cmnamespace": 6,
                         "cmsort": "timestamp", "cmdir": "newer", "cmprop": "ids|title|timestamp", "cmlimit": 2})
    fx = fixture("commons_categorymembers.json")
    assert set(members) == set(fx) and set(members["continue"]) == set(fx["continue"])
    assert set(members["query"]["categorymembers"][0]) == set(fx["query"]["categorymembers"][0])
    info = src.query({**src._info_params(), "pageids": "90000001"})
    fx_page = fixture("commons_imageinfo.json")["query"]["pages"][0]
    page = info["query"]["pages"][0]
    assert set(page) == set(fx_page)
    missing = set(fx_page["imageinfo"][0]) - set(page["imageinfo"][0]) - {"responsiveUrls"}
    assert not missing, missing
    assert set(page["imageinfo"][0]["extmetadata"]) >= {"LicenseShortName", "LicenseUrl", "Artist", "Credit"}
    uploads = src.query({"generator": "allimages", "gaisort": "timestamp", "gaidir": "newer", "gailimit": 1,
                         "gaistart": "2000-01-01T00:00:00Z", **src._info_params()})
    fx_up = fixture("commons_allimages.json")
    assert set(uploads["continue"]) == set(fx_up["continue"]) and set(uploads["query"]["pages"][0]) == set(fx_up["query"]["pages"][0])
    emu.scenario.commons.maxlag_next = 1
    resp = src.api.http.get(emu.url("commons.wikimedia.org", "w/api.php"), params={"action": "query", "maxlag": 5},
                            headers={"User-Agent": user_agent(CONTACT)})
    assert set(resp.json()["error"]) == set(fixture("commons_maxlag.json")["error"])
    assert resp.headers["Retry-After"] and resp.status == 200


# --- `nomad once --source commons`, no credentials at all ---------------------------------------------

LABELS = {"no_image": "skip_not_image", "video": "skip_video", "removed": "skip_removed", "too_small": "skip_small",
          "too_wide": "skip_aspect", "too_tall": "skip_aspect", "animated": "skip_animated"}


def stored_outcome(store: Store, post_id: str) -> str:
    state = store.post_state(post_id)
    if state is None:
        return "unseen"
    if state[0] != "expanded":
        return LABELS.get(state[1] or "", f"post_{state[0]}_{state[1]}")
    (_key, st, reason), = store.images_of(post_id)
    if st in ("accepted", "delivered"):
        return "accept_candidate"
    return LABELS.get(reason or "", f"{st}_{reason}")


@pytest.mark.timeout(300)
def test_nomad_once_source_commons_keeps_the_right_images_and_fetches_nothing_twice(tiny_models: Path, tmp_path: Path) -> None:
    from stack.procs import Service, free_port, python_module

    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDDIT_", "IMGUR_", "FLICKR_", "NOMAD_"))}
    env["NOMAD_CONTACT"] = CONTACT
    a_ep = f"tcp://127.0.0.1:{free_port()}"
    anti = Service("anti_sus", python_module("anti_sus", "serve", "--models", str(tiny_models), "--bind", a_ep, "--threads", "1"),
                   log_path=tmp_path / "anti_sus.log")
    saved = tmp_path / "saved"
    with Emulator() as emu:
        argv = python_module("nomad", "once", "--source", "commons", *emu.nomad_args(), "--anti-sus", a_ep,
                             "--gmm-threshold=-1e30", "--watermark-threshold=1.0",  # tiny random models: let all through
                             "--state-dir", str(tmp_path / "state"), "--save-dir", str(saved), "--anti-sus-timeout", "10",
                             "--backoff-max", "1", "--http-retries", "0", "--batch-size", "4")
        anti.start()
        try:
            first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=200)
            assert first.returncode == 0, first.stderr[-4000:] + anti.tail()
            after_first = len(emu.records())
            second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=200)
            assert second.returncode == 0, second.stderr[-4000:]
        finally:
            anti.stop()
        expected = emu.scenario.commons.expected
        first_run, later = emu.records()[:after_first], emu.records()[after_first:]
    # Wikimedia's User-Agent rule holds for its file servers too: the downloads carry the contact.
    downloads = [r for r in first_run if r.host == "upload.wikimedia.org"]
    assert downloads and all(r.headers.get("User-Agent") == user_agent(CONTACT) for r in downloads)
    with Store(tmp_path / "state") as store:
        got = {pid: stored_outcome(store, pid) for pid in expected}
    assert got == expected
    # The second run asked each listing once and downloaded nothing.
    assert not [r for r in later if r.host == "upload.wikimedia.org"]
    assert not [r for r in later if "pageids" in r.query]
    assert {r.host for r in later} == {"commons.wikimedia.org"}
    # Licence and attribution travel with every kept image (here: the --save-dir sidecars).
    sidecars = [json.loads(p.read_text()) for p in saved.rglob("*.json")]
    assert len(sidecars) == sum(1 for v in expected.values() if v == "accept_candidate")
    for meta in sidecars:
        assert meta["source"] == "commons" and meta["licence"].startswith("CC BY") and meta["license_url"].startswith("https://creativecommons.org/")
        assert meta["artist"] == meta["author"] == "Emu & Photographer" and meta["credit"] == "Own work"
        assert meta["source_url"] == meta["description_url"] and meta["source_url"].startswith("https://commons.wikimedia.org/wiki/File:")
        assert meta["image_url"].startswith("https://upload.wikimedia.org:")


def test_nomad_once_source_commons_without_contact_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOMAD_",))}
    out = subprocess.run([sys.executable, "-m", "nomad", "once", "--source", "commons", "--state-dir", str(tmp_path / "s")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "NOMAD_CONTACT" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_commons_declares_its_contact_user_agent_for_its_file_host() -> None:
    from nomad.sources.base import headers_for, media_headers

    src = CommonsSource(SiteApi(HttpClient(), "commons", headers={"User-Agent": user_agent(CONTACT)}))
    table = media_headers([src])
    assert headers_for("https://upload.wikimedia.org/wikipedia/commons/a/ab/X.jpg", table) == {"User-Agent": user_agent(CONTACT)}
    assert headers_for("https://upload.wikimedia.org:8443/x.jpg", table) == {"User-Agent": user_agent(CONTACT)}
    assert headers_for("https://i.redd.it/x.jpg", table) is None and headers_for("https://evil-upload.wikimedia.org.example/x", table) is None
