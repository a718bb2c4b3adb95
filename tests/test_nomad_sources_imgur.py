"""imgur URL forms, albums through API v3 (fixture in tests/fixtures), removed and animated handling."""
from __future__ import annotations

import json

import pytest

from nomad.http import FetchError, reject_removed_placeholder
from nomad.sources.base import Link, SourceError
from nomad.sources.imgur import ImgurClient, ImgurTarget, parse_url
from tests.conftest import FIXTURES
from tests.nomad_fakes import FakeHttp, Reply


@pytest.mark.parametrize(
    "url,target",
    [
        ("https://i.imgur.com/AbC12xY.jpg", ImgurTarget("image", "AbC12xY", ".jpg")),
        ("https://i.imgur.com/AbC12xY.gifv", ImgurTarget("image", "AbC12xY", ".gifv")),
        ("https://imgur.com/AbC12xY", ImgurTarget("image", "AbC12xY", "")),
        ("https://m.imgur.com/AbC12xY", ImgurTarget("image", "AbC12xY", "")),
        ("https://imgur.com/a/Xy7Pq2Z", ImgurTarget("album", "Xy7Pq2Z")),
        ("https://imgur.com/a/lakeside-at-dawn-Xy7Pq2Z", ImgurTarget("album", "Xy7Pq2Z")),
        ("https://imgur.com/gallery/Xy7Pq2Z", ImgurTarget("gallery", "Xy7Pq2Z")),
        ("https://imgur.com/gallery/my-cat-sleeping-Xy7Pq2Z", ImgurTarget("gallery", "Xy7Pq2Z")),
        ("https://imgur.com/t/cats/Xy7Pq2Z", ImgurTarget("gallery", "Xy7Pq2Z")),
    ],
)
def test_url_forms(url: str, target: ImgurTarget) -> None:
    assert parse_url(url) == target


@pytest.mark.parametrize("url", ["https://imgur.com/", "https://imgur.com/upload/now/x", "https://example.com/a/Xy7Pq2Z", "https://imgur.com/a/"])
def test_not_imgur_images(url: str) -> None:
    assert parse_url(url) is None


def album_reply() -> Reply:
    return Reply(200, json.loads((FIXTURES / "imgur_album_images.json").read_text()))


def test_album_through_api_with_client_id() -> None:
    http = FakeHttp([album_reply()])
    client = ImgurClient(http, api_url="https://api.imgur.com", client_id="cid")
    refs = client.expand(Link("https://imgur.com/a/Xy7Pq2Z"), "reddit:t3_p5")
    method, url, kw = http.calls[0]
    assert url == "https://api.imgur.com/3/album/Xy7Pq2Z/images"
    assert kw["headers"]["Authorization"] == "Client-ID cid"
    assert [r.key for r in refs] == ["reddit:t3_p5:0", "reddit:t3_p5:1", "reddit:t3_p5:2"]
    assert [(r.width, r.height) for r in refs] == [(4032, 3024), (2560, 1440), (480, 270)]
    assert [r.animated for r in refs] == [False, False, True]
    assert refs[1].meta["image_title"] == "second" and refs[0].meta["album_id"] == "Xy7Pq2Z"
    assert all(r.site == "imgur" for r in refs)


def test_album_without_client_id_is_a_clear_rejection() -> None:
    client = ImgurClient(FakeHttp([]), client_id=None)
    with pytest.raises(SourceError) as err:
        client.expand(Link("https://imgur.com/a/Xy7Pq2Z"), "k")
    assert err.value.reason == "imgur_no_client_id" and not err.value.transient


def test_removed_album_404_is_removed() -> None:
    client = ImgurClient(FakeHttp([Reply(404, {"success": False, "status": 404})]), client_id="cid")
    with pytest.raises(SourceError) as err:
        client.expand(Link("https://imgur.com/a/Xy7Pq2Z"), "k")
    assert err.value.reason == "removed" and not err.value.transient


def test_api_5xx_is_transient() -> None:
    client = ImgurClient(FakeHttp([Reply(503, {})]), client_id="cid")
    with pytest.raises(SourceError) as err:
        client.expand(Link("https://imgur.com/a/Xy7Pq2Z"), "k")
    assert err.value.transient


def test_gallery_falls_back_to_single_image() -> None:
    image = {"data": {"id": "Xy7Pq2Z", "type": "image/jpeg", "animated": False, "width": 3000, "height": 2000, "link": "https://i.imgur.com/Xy7Pq2Z.jpg"}, "success": True}
    http = FakeHttp([Reply(404, {"success": False}), Reply(200, image)])
    refs = ImgurClient(http, client_id="cid").expand(Link("https://imgur.com/gallery/title-Xy7Pq2Z"), "k")
    assert [r.url for r in refs] == ["https://i.imgur.com/Xy7Pq2Z.jpg"]
    assert http.calls[1][1].endswith("/3/image/Xy7Pq2Z")


def test_direct_file_keeps_preview_size_without_api_call() -> None:
    http = FakeHttp([])
    refs = ImgurClient(http, client_id="cid").expand(Link("https://i.imgur.com/AbC12xY.jpg", 1280, 960), "k")
    assert http.calls == [] and (refs[0].width, refs[0].height) == (1280, 960)


def test_gifv_and_gif_are_animated() -> None:
    client = ImgurClient(FakeHttp([]), client_id=None)
    assert client.expand(Link("https://i.imgur.com/AbC12xY.gifv"), "k")[0].animated
    assert client.expand(Link("https://i.imgur.com/AbC12xY.gif"), "k")[0].animated


def test_page_url_without_api_becomes_direct_file() -> None:
    refs = ImgurClient(FakeHttp([]), client_id=None).expand(Link("https://imgur.com/AbC12xY"), "k")
    assert refs[0].url == "https://i.imgur.com/AbC12xY.jpg"


def test_removed_placeholder_redirect_is_detected() -> None:
    with pytest.raises(FetchError) as err:
        reject_removed_placeholder("https://i.imgur.com/removed.png")
    assert err.value.reason == "removed"
    reject_removed_placeholder("https://i.imgur.com/AbC12xY.jpg")
