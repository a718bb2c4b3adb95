"""flickr URL forms, base58 short links, getSizes (fixture in tests/fixtures), licences and errors."""
from __future__ import annotations

import json

import pytest

from nomad.sources.base import Link, SourceError
from nomad.sources.flickr import FlickrClient, FlickrTarget, base58_decode, largest_photo, parse_url
from stack.emulator import base58 as base58_encode  # an encoder written apart from nomad's decoder
from tests.conftest import FIXTURES
from tests.nomad_fakes import FakeHttp, Reply


def sizes() -> dict:
    return json.loads((FIXTURES / "flickr_getsizes.json").read_text())


def test_base58_round_trip_and_known_value() -> None:
    assert base58_decode("2") == 1 and base58_decode("21") == 58
    for n in (1, 57, 58, 53712345678, 2**40 + 7):
        assert base58_decode(base58_encode(n)) == n
    with pytest.raises(ValueError):
        base58_decode("0OIl")  # characters flickr's alphabet leaves out


@pytest.mark.parametrize(
    "url,target",
    [
        ("https://www.flickr.com/photos/dave_photos/53712345678/", FlickrTarget("page", "53712345678", user="dave_photos")),
        ("https://flickr.com/photos/dave_photos/53712345678/in/photostream/", FlickrTarget("page", "53712345678", user="dave_photos")),
        (f"https://flic.kr/p/{base58_encode(53712345678)}", FlickrTarget("page", "53712345678")),
        ("https://live.staticflickr.com/65535/53712345678_0a9b8c7d6e_o.jpg", FlickrTarget("static", "53712345678")),
        ("https://farm66.staticflickr.com/65535/53712345678_a1b2c3d4e5.jpg", FlickrTarget("static", "53712345678")),
    ],
)
def test_url_forms(url: str, target: FlickrTarget) -> None:
    assert parse_url(url) == target


@pytest.mark.parametrize("url", ["https://www.flickr.com/photos/dave_photos/albums/7217", "https://flic.kr/s/aHsk", "https://www.flickr.com/"])
def test_non_photo_urls(url: str) -> None:
    assert parse_url(url) is None


def test_largest_photo_ignores_video_and_order() -> None:
    s = sizes()
    assert largest_photo(s)["label"] == "Original"
    s["sizes"]["size"].append({"label": "Video Original", "width": 8000, "height": 6000, "source": "https://x/v.mp4", "media": "video"})
    s["sizes"]["size"].insert(0, s["sizes"]["size"].pop(-2))  # order must not matter
    assert largest_photo(s)["label"] == "Original"
    assert largest_photo({"stat": "ok"}) is None


def test_page_expands_to_largest_with_licence() -> None:
    info = {"stat": "ok", "photo": {"id": "53712345678", "license": "4", "owner": {"username": "dave"},
            "urls": {"url": [{"type": "photopage", "_content": "https://www.flickr.com/photos/dave_photos/53712345678/"}]}}}
    http = FakeHttp([Reply(200, sizes()), Reply(200, info)])
    client = FlickrClient(http, api_url="https://api.flickr.com/services/rest", api_key="key")
    refs = client.expand(Link("https://www.flickr.com/photos/dave_photos/53712345678/"), "reddit:t3_p4")
    assert len(refs) == 1
    ref = refs[0]
    assert ref.key == "reddit:t3_p4:0" and ref.site == "flickr"
    assert ref.url == "https://live.staticflickr.com/65535/53712345678_0a9b8c7d6e_o.jpg"
    assert (ref.width, ref.height) == (6000, 4000)
    assert ref.meta["license"] == "CC BY 2.0" and ref.meta["page_url"].endswith("/53712345678/")
    _, url, kw = http.calls[0]
    assert url == "https://api.flickr.com/services/rest"
    assert kw["params"]["method"] == "flickr.photos.getSizes" and kw["params"]["photo_id"] == "53712345678"
    assert kw["params"]["format"] == "json" and kw["params"]["nojsoncallback"] == 1 and kw["params"]["api_key"] == "key"


def test_licence_is_optional() -> None:
    http = FakeHttp([Reply(200, sizes()), Reply(200, {"stat": "fail", "code": 2, "message": "Permission denied"})])
    ref = FlickrClient(http, api_key="key").expand(Link("https://www.flickr.com/photos/u/53712345678"), "k")[0]
    assert "license" not in ref.meta and ref.meta["page_url"] == "https://www.flickr.com/photos/u/53712345678"


def test_not_found_is_a_rejection() -> None:
    http = FakeHttp([Reply(200, {"stat": "fail", "code": 1, "message": "Photo not found"})])
    with pytest.raises(SourceError) as err:
        FlickrClient(http, api_key="key").expand(Link("https://flic.kr/p/2"), "k")
    assert err.value.reason == "not_found" and not err.value.transient


def test_other_api_errors_are_transient() -> None:
    http = FakeHttp([Reply(200, {"stat": "fail", "code": 105, "message": "Service currently unavailable"})])
    with pytest.raises(SourceError) as err:
        FlickrClient(http, api_key="key").expand(Link("https://flic.kr/p/2"), "k")
    assert err.value.transient


def test_without_key_static_files_pass_pages_do_not() -> None:
    client = FlickrClient(FakeHttp([]), api_key=None)
    ref = client.expand(Link("https://live.staticflickr.com/65535/53712345678_0a9b8c7d6e_o.jpg"), "k")[0]
    assert ref.url.endswith("_o.jpg") and ref.meta["flickr_id"] == "53712345678"
    with pytest.raises(SourceError) as err:
        client.expand(Link("https://www.flickr.com/photos/u/53712345678"), "k")
    assert err.value.reason == "flickr_no_api_key"


def test_bare_api_base_gets_the_rest_path() -> None:
    assert FlickrClient(FakeHttp([]), api_url="https://api.flickr.com:8443").api_url == "https://api.flickr.com:8443/services/rest"
    assert FlickrClient(FakeHttp([]), api_url="https://mirror.example/flickr/rest").api_url == "https://mirror.example/flickr/rest"
