"""Mining rules: each rule, each reason code, orientation-aware resolution."""
from __future__ import annotations

import pytest

from nomad import rules as R
from nomad.rules import Rules
from nomad.sources.base import Candidate, ImageRef, Link


def cand(**kw: object) -> Candidate:
    base = dict(source="reddit", post_id="t3_x", subreddit="pics", links=[Link("https://i.redd.it/a.jpg")])
    base.update(kw)
    return Candidate(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "w,h,reason",
    [
        (1280, 1024, None),
        (1024, 1280, None),  # portrait passes exactly like landscape
        (1279, 1024, R.TOO_SMALL),
        (1280, 1023, R.TOO_SMALL),
        (1023, 1280, R.TOO_SMALL),
        (4000, 3000, None),
        (3072, 1024, None),  # W/H == 3 is allowed
        (3073, 1024, R.TOO_WIDE),
        (1280, 2560, None),  # H/W == 2 is allowed
        (1280, 2561, R.TOO_TALL),
        (None, None, None),  # unknown before download: checked after decoding
    ],
)
def test_size_rules(w: int | None, h: int | None, reason: str | None) -> None:
    assert Rules().check_size(w, h) == reason


def test_size_flags_change_the_limits() -> None:
    r = Rules(min_long=100, min_short=50, max_wide=10, max_tall=10)
    assert r.check_size(100, 50) is None and r.check_size(99, 50) == R.TOO_SMALL
    assert r.check_size(1000, 100) is None


def test_post_rules_each_reason() -> None:
    r = Rules()
    assert r.check_post(cand()) is None
    assert r.check_post(cand(removed=True)) == R.REMOVED
    assert r.check_post(cand(over_18=True)) == R.NSFW
    assert r.check_post(cand(spoiler=True)) == R.SPOILER
    assert r.check_post(cand(is_video=True)) == R.VIDEO
    assert r.check_post(cand(links=[])) == R.NO_IMAGE
    assert Rules(skip_nsfw=False).check_post(cand(over_18=True)) is None
    assert Rules(skip_spoilers=False).check_post(cand(spoiler=True)) is None


def test_subreddit_deny_list_case_insensitive() -> None:
    r = Rules(deny_subreddits=["r/Pics", "memes"])
    assert r.check_post(cand(subreddit="pics")) == R.SUBREDDIT_DENIED
    assert r.check_post(cand(subreddit="MEMES")) == R.SUBREDDIT_DENIED
    assert r.check_post(cand(subreddit="EarthPorn")) is None


def test_domain_allow_and_deny_match_subdomains() -> None:
    r = Rules(deny_domains=["bad.example"])
    assert r.check_domain("https://cdn.bad.example/x.jpg") == R.DOMAIN_DENIED
    assert r.check_domain("https://notbad.example/x.jpg") is None
    a = Rules(allow_domains=["redd.it", "imgur.com"])
    assert a.check_domain("https://i.redd.it/x.jpg") is None
    assert a.check_domain("https://i.imgur.com/x.jpg") is None
    assert a.check_domain("https://example.org/x.jpg") == R.DOMAIN_NOT_ALLOWED


def test_ref_rules() -> None:
    r = Rules()
    ok = ImageRef("k", "https://i.redd.it/a.jpg", 4000, 3000)
    assert r.check_ref(ok) is None
    assert r.check_ref(ImageRef("k", "https://i.redd.it/a.gif", animated=True)) == R.ANIMATED
    assert r.check_ref(ImageRef("k", "https://v.redd.it/a", media="video")) == R.VIDEO
    assert r.check_ref(ImageRef("k", "", media="unavailable")) == R.UNAVAILABLE
    assert r.check_ref(ImageRef("k", "https://i.redd.it/a.jpg", 640, 480)) == R.TOO_SMALL
    assert Rules(deny_domains=["redd.it"]).check_ref(ok) == R.DOMAIN_DENIED
