"""The emulator itself: API shapes checked against tests/fixtures, rate limits, OAuth, files."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from nomad.http import FetchError, HttpClient, HttpConfig, HttpStatusError
from tests.conftest import FIXTURES, REPO
from stack.emulator import Emulator, Scenario, base58, default_scenario
from stack.emulator.scenario import FLICKR_ALPHABET

pytestmark = pytest.mark.timeout(60)


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(rate_limit=1000) as e:
        yield e


@pytest.fixture(scope="module")
def http(emu: Emulator) -> Iterator[HttpClient]:
    c = HttpClient(HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, retries=0))
    yield c
    c.close()


def common_keys(dicts: list[dict]) -> set[str]:
    keys = set(dicts[0])
    for d in dicts[1:]:
        keys &= set(d)
    return keys


# -- reddit -------------------------------------------------------------------------------


def oauth_get(http: HttpClient, emu: Emulator, path: str, **kw: Any) -> tuple[Any, Any]:
    """A listing through OAuth (anonymous JSON answers reddit's block page, as reddit does since 2026-05-29)."""
    env = emu.nomad_env()
    tok = http.request("POST", emu.url("www.reddit.com", "api/v1/access_token"), data={"grant_type": "client_credentials"},
                       auth=(env["REDDIT_CLIENT_ID"], env["REDDIT_CLIENT_SECRET"])).json()["access_token"]
    return http.get_json(emu.url("oauth.reddit.com", path), headers={"Authorization": f"bearer {tok}"}, **kw)


def test_listing_shape_matches_fixture(emu: Emulator, http: HttpClient) -> None:
    fx = fixture("reddit_new_listing.json")
    data, _ = oauth_get(http, emu, "r/all/new", params={"limit": 100})
    assert data["kind"] == fx["kind"]
    assert set(data["data"]) == set(fx["data"])
    fx_posts = [c["data"] for c in fx["data"]["children"]]
    posts = [c["data"] for c in data["data"]["children"]]
    assert {c["kind"] for c in data["data"]["children"]} == {"t3"}
    missing = common_keys(fx_posts) - common_keys(posts)
    assert not missing, f"emulated posts lack fixture keys {missing}"
    # Same types for the shared keys.
    for key in common_keys(fx_posts):
        assert type(posts[0][key]) in (type(fx_posts[0][key]), type(None), float, int), key
    # Gallery and preview sub-shapes.
    fx_gal = next(p for p in fx_posts if p.get("is_gallery"))
    gal = next(p for p in posts if p.get("is_gallery") and p.get("media_metadata"))
    assert set(gal["gallery_data"]["items"][0]) >= {"media_id", "id"}
    fx_meta = next(iter(fx_gal["media_metadata"].values()))
    meta = next(m for m in gal["media_metadata"].values() if m["status"] == "valid" and m["e"] == "Image")
    assert set(meta) == set(fx_meta) and set(meta["s"]) == set(fx_meta["s"])
    fx_prev = next(p for p in fx_posts if "preview" in p)["preview"]
    prev = next(p for p in posts if "preview" in p)["preview"]
    assert set(prev) == set(fx_prev) and set(prev["images"][0]) == set(fx_prev["images"][0])
    assert set(prev["images"][0]["source"]) == set(fx_prev["images"][0]["source"])


def test_gallery_metadata_order_differs_from_items(emu: Emulator) -> None:
    gal = next(p for p in emu.scenario.posts if p["id"] == "aa0007")
    order = [i["media_id"] for i in gal["gallery_data"]["items"]]
    assert list(gal["media_metadata"]) != order, "media_metadata is a map: order must come from gallery_data"
    kinds = {m["status"] + "/" + m["e"] for m in gal["media_metadata"].values()}
    assert {"valid/Image", "failed/Image", "valid/AnimatedImage"} <= kinds
    null = next(p for p in emu.scenario.posts if p["id"] == "aa0008")
    assert null["gallery_data"] is None and null["media_metadata"] is None


def test_crosspost_parent_carries_the_media(emu: Emulator) -> None:
    x = next(p for p in emu.scenario.posts if p.get("crosspost_parent_list"))
    parent = x["crosspost_parent_list"][-1]
    assert parent["url"].startswith(f"https://i.redd.it:{emu.port}/")
    assert all(p["id"] != parent["id"] for p in emu.scenario.posts)


def test_html_escaping_unless_raw_json(emu: Emulator, http: HttpClient) -> None:
    esc, _ = oauth_get(http, emu, "r/all/new", params={"limit": 100})
    raw, _ = oauth_get(http, emu, "r/all/new", params={"limit": 100, "raw_json": 1})
    esc_url = esc["data"]["children"][0]["data"]["preview"]["images"][0]["source"]["url"]
    raw_url = raw["data"]["children"][0]["data"]["preview"]["images"][0]["source"]["url"]
    assert "&amp;" in esc_url and "&amp;" not in raw_url and "&" in raw_url


def test_pagination_with_after_visits_every_post_once(emu: Emulator, http: HttpClient) -> None:
    seen: list[str] = []
    after = None
    for _ in range(50):
        data, _ = oauth_get(http, emu, "r/all/new", params={"limit": 7, "after": after, "raw_json": 1})
        page = [c["data"]["name"] for c in data["data"]["children"]]
        assert len(page) <= 7
        seen += page
        after = data["data"]["after"]
        if after is None:
            break
        assert after == page[-1]
    assert seen == [p["name"] for p in emu.scenario.posts]
    data, _ = oauth_get(http, emu, "r/all/new", params={"limit": 500})
    assert data["data"]["dist"] == min(100, len(emu.scenario.posts))


def test_subreddit_filter(emu: Emulator, http: HttpClient) -> None:
    data, _ = oauth_get(http, emu, "r/EarthPorn+nosuchsub/new", params={"raw_json": 1})
    subs = {c["data"]["subreddit"] for c in data["data"]["children"]}
    assert subs == {"EarthPorn"}


def test_rate_limit_headers_and_429() -> None:
    window = 2.0  # long enough for three requests on a loaded machine
    scn = Scenario()
    scn.reddit_anonymous_json = True  # reddit before 2026-05-29 (and mirrors): the anonymous budget
    with Emulator(scn, rate_limit=3, rate_window=window) as e:
        c = HttpClient(HttpConfig(resolve=e.resolve_entries(), ca_bundle=e.ca_bundle, retries=0))
        url = e.url("www.reddit.com", "r/all/new.json")
        remaining = []
        t_first = time.monotonic()
        for _ in range(3):
            _, r = c.get_json(url)
            remaining.append(float(r.headers["X-Ratelimit-Remaining"]))
            assert 0 <= float(r.headers["X-Ratelimit-Reset"]) <= window
        assert remaining == [2.0, 1.0, 0.0]
        with pytest.raises(HttpStatusError) as ei:
            c.get_json(url)
        assert ei.value.status == 429 and ei.value.headers["X-Ratelimit-Remaining"] == "0.0"
        time.sleep(max(0.0, t_first + window + 0.1 - time.monotonic()))  # the window resets
        _, r = c.get_json(url)
        assert r.headers["X-Ratelimit-Used"] == "1"


def test_oauth_token_flow_and_expiry() -> None:
    scn = Scenario()
    scn.token_ttl = 2
    with Emulator(scn) as e:
        c = HttpClient(HttpConfig(resolve=e.resolve_entries(), ca_bundle=e.ca_bundle, retries=0))
        env = e.nomad_env()
        token_url = e.url("www.reddit.com", "api/v1/access_token")
        listing = e.url("oauth.reddit.com", "r/all/new")
        with pytest.raises(HttpStatusError) as ei:
            c.request("POST", token_url, data={"grant_type": "client_credentials"}, auth=(env["REDDIT_CLIENT_ID"], "wrong"))
        assert ei.value.status == 401
        tok = c.request("POST", token_url, data={"grant_type": "client_credentials"},
                        auth=(env["REDDIT_CLIENT_ID"], env["REDDIT_CLIENT_SECRET"])).json()
        issued = time.monotonic()
        assert tok["token_type"] == "bearer" and tok["expires_in"] == 2
        with pytest.raises(HttpStatusError) as ei:
            c.get_json(listing)
        assert ei.value.status == 401
        data, r = c.get_json(listing, headers={"Authorization": f"bearer {tok['access_token']}"})
        assert data["kind"] == "Listing" and "X-Ratelimit-Remaining" in r.headers
        time.sleep(max(0.0, issued + 2.1 - time.monotonic()))
        with pytest.raises(HttpStatusError) as ei:
            c.get_json(listing, headers={"Authorization": f"bearer {tok['access_token']}"})
        assert ei.value.status == 401, "expired tokens are refused: nomad must refresh"


def test_anonymous_json_answers_the_block_page(emu: Emulator, http: HttpClient) -> None:
    for path in ("r/all/new.json", "r/EarthPorn/top.json", "r/pics/new/.json"):
        with pytest.raises(HttpStatusError) as ei:
            http.get_json(emu.url("www.reddit.com", path), headers={"User-Agent": "linux:anything:1.0 (by /u/any)"})
        assert ei.value.status == 403 and ei.value.headers["Server"] == "snooserv"
        assert b"whoa there, pardner!" in ei.value.body and ei.value.headers["Content-Type"].startswith("text/html")


def atom(http: HttpClient, emu: Emulator, path: str, **params: Any) -> Any:
    from defusedxml import ElementTree

    r = http.get(emu.url("www.reddit.com", path), params=params or None)
    assert r.headers["Content-Type"].startswith("application/atom+xml")
    return ElementTree.fromstring(r.body, forbid_dtd=True)


def test_atom_feed_shape_matches_fixture(emu: Emulator, http: HttpClient) -> None:
    from defusedxml import ElementTree

    ns = "{http://www.w3.org/2005/Atom}"
    fx = ElementTree.fromstring((FIXTURES / "reddit_new.atom").read_bytes())
    fx_entry = fx.find(f"{ns}entry")
    feed = atom(http, emu, "r/all/new/.rss", limit=100)
    entries = feed.findall(f"{ns}entry")
    assert {c.tag for c in entries[0]} == {c.tag for c in fx_entry}  # type: ignore[union-attr]
    assert feed.find(f"{ns}category") is not None and fx.find(f"{ns}category") is not None
    live = [p for p in emu.scenario.posts if not p.get("removed_by_category")]
    assert [e.findtext(f"{ns}id") for e in entries] == [p["name"] for p in live]  # newest first, removed left out
    assert len(atom(http, emu, "r/all/new.rss", limit=3).findall(f"{ns}entry")) == 3
    earth = atom(http, emu, "r/EarthPorn/new/.rss").findall(f"{ns}entry")
    assert {e.find(f"{ns}category").get("term") for e in earth} == {"EarthPorn"}  # type: ignore[union-attr]


def test_atom_content_is_html_escaped_inside_xml(emu: Emulator, http: HttpClient) -> None:
    r = http.get(emu.url("www.reddit.com", "r/all/new/.rss"), params={"limit": 100})
    assert b"watch?v=dQw4w9WgXcQ&amp;amp;t=1&quot;&gt;[link]&lt;/a&gt;" in r.body  # &t=1: escaped in HTML, then in XML
    assert r.headers.get("Server") != "snooserv"


def test_atom_feed_throttle_and_hostile_feeds() -> None:
    scn = default_scenario(0)
    scn.reddit_feed_interval = 30.0
    with Emulator(lambda port: scn) as e:
        c = HttpClient(HttpConfig(resolve=e.resolve_entries(), ca_bundle=e.ca_bundle, retries=0))
        assert c.get(e.url("www.reddit.com", "r/all/new/.rss")).status == 200
        with pytest.raises(HttpStatusError) as ei:
            c.get(e.url("www.reddit.com", "r/all/new/.rss"))
        assert ei.value.status == 429 and 1 <= float(ei.value.headers["Retry-After"]) <= 30
        scn.reddit_feed_interval = 0.0
        assert b"<!ENTITY" in c.get(e.url("www.reddit.com", "r/entitybomb/new/.rss")).body
        assert b"SYSTEM" in c.get(e.url("www.reddit.com", "r/xxe/new/.rss")).body
        cut = c.get(e.url("www.reddit.com", "r/truncated/new/.rss")).body
        assert cut.startswith(b"<?xml") and not cut.rstrip().endswith(b"</feed>")


def test_flickr_public_feed_formats(emu: Emulator, http: HttpClient) -> None:
    url = emu.url("api.flickr.com", "services/feeds/photos_public.gne")
    raw = http.get(url, params={"format": "json", "nojsoncallback": 1}).body.decode()
    assert "\\'" in raw and "\\/" in raw  # flickr's escapes: not JSON
    with pytest.raises(ValueError):
        json.loads(raw)
    fx = (FIXTURES / "flickr_public_feed.js").read_text()
    from nomad.sources.flickr_feed import parse_feed_text

    data, fx_data = parse_feed_text(raw), parse_feed_text(fx)
    assert set(data) == set(fx_data) and set(data["items"][0]) == set(fx_data["items"][0])
    assert [i["link"].rstrip("/").rsplit("/", 1)[1] for i in data["items"]] == [p.id for p, _ in emu.scenario.flickr_feed]
    wrapped = http.get(url, params={"format": "json"}).body.decode()
    assert wrapped.startswith("jsonFlickrFeed(") and parse_feed_text(wrapped) == data
    tagged = parse_feed_text(http.get(url, params={"format": "json", "nojsoncallback": 1, "tags": "lake,dawn"}).body.decode())
    assert len(tagged["items"]) == 1 and {"lake", "dawn"} <= set(tagged["items"][0]["tags"].split())  # tagmode=all
    anyof = parse_feed_text(http.get(url, params={"format": "json", "nojsoncallback": 1, "tags": "lake,strip",
                                                  "tagmode": "any"}).body.decode())
    assert len(anyof["items"]) == 3
    m = data["items"][0]["media"]["m"]
    assert http.download_image(m).format == "jpeg" and http.download_image(m.replace("_m.jpg", "_b.jpg")).format == "jpeg"
    cut = http.get(url, params={"format": "json", "nojsoncallback": 1, "tags": "truncated"}).body.decode()
    with pytest.raises(ValueError):
        json.loads(cut.replace("\\'", "'"))


# -- imgur --------------------------------------------------------------------------------


def test_imgur_album_shape_matches_fixture(emu: Emulator, http: HttpClient) -> None:
    fx = fixture("imgur_album_images.json")
    hdr = {"Authorization": f"Client-ID {emu.nomad_env()['IMGUR_CLIENT_ID']}"}
    data, _ = http.get_json(emu.url("api.imgur.com", "3/album/Xy7Pq2Z/images"), headers=hdr)
    assert set(data) == set(fx)
    assert [set(i) - {"gifv"} for i in data["data"]] == [set(i) for i in fx["data"]]
    assert [i["id"] for i in data["data"]] == [i["id"] for i in fx["data"]]
    album, _ = http.get_json(emu.url("api.imgur.com", "3/gallery/album/Ga1Le2R"), headers=hdr)
    assert album["data"]["is_album"] and len(album["data"]["images"]) == 1
    img, _ = http.get_json(emu.url("api.imgur.com", "3/image/Ab1Cd2E"), headers=hdr)
    assert img["data"]["link"] == emu.url("i.imgur.com", "Ab1Cd2E.jpg")
    with pytest.raises(HttpStatusError) as ei:
        http.get_json(emu.url("api.imgur.com", "3/album/Xy7Pq2Z/images"))
    assert ei.value.status == 401
    with pytest.raises(HttpStatusError) as ei:
        http.get_json(emu.url("api.imgur.com", "3/album/nope/images"), headers=hdr)
    assert ei.value.status == 404


def test_imgur_removed_redirects_to_placeholder(emu: Emulator, http: HttpClient) -> None:
    r = http.get(emu.url("i.imgur.com", "Rm0Vd9X.jpg"), allow_redirects=False)
    assert r.status == 302 and r.headers["Location"] == emu.url("i.imgur.com", "removed.png")
    dl = http.download_image(emu.url("i.imgur.com", "removed.png"))
    assert dl.format == "png" and Image.open(io.BytesIO(dl.data)).size == (161, 81)
    page = http.get(emu.url("i.imgur.com", "Gv6If7Y.gifv"))
    assert page.headers["Content-Type"].startswith("text/html")


# -- flickr -------------------------------------------------------------------------------


def flickr(http: HttpClient, emu: Emulator, **params: Any) -> Any:
    q = {"format": "json", "nojsoncallback": 1, "api_key": emu.nomad_env()["FLICKR_API_KEY"], **params}
    return http.get_json(emu.url("api.flickr.com", "services/rest/"), params=q)[0]


def test_flickr_getsizes_shape_matches_fixture(emu: Emulator, http: HttpClient) -> None:
    fx = fixture("flickr_getsizes.json")
    data = flickr(http, emu, method="flickr.photos.getSizes", photo_id="53712345678")
    assert set(data) == set(fx) and set(data["sizes"]) == set(fx["sizes"])
    assert {frozenset(s) for s in data["sizes"]["size"]} == {frozenset(s) for s in fx["sizes"]["size"]}
    widths = [s["width"] for s in data["sizes"]["size"]]
    assert widths == sorted(widths), "smallest to largest"
    largest = [s for s in data["sizes"]["size"] if s["media"] == "photo"][-1]
    dl = http.download_image(largest["source"])
    assert Image.open(io.BytesIO(dl.data)).size == (largest["width"], largest["height"])
    info = flickr(http, emu, method="flickr.photos.getInfo", photo_id="53712345678")
    assert info["stat"] == "ok" and info["photo"]["license"] == "4"
    assert info["photo"]["urls"]["url"][0]["_content"].startswith(f"https://www.flickr.com:{emu.port}/photos/")


def test_flickr_errors(emu: Emulator, http: HttpClient) -> None:
    assert flickr(http, emu, method="flickr.photos.getSizes", photo_id="53799999999") == \
        {"stat": "fail", "code": 1, "message": "Photo not found"}
    bad = flickr(http, emu, method="flickr.photos.getSizes", photo_id="53712345678", api_key="wrong")
    assert bad["stat"] == "fail" and bad["code"] == 100


def test_flic_kr_short_link(emu: Emulator, http: HttpClient) -> None:
    assert base58(53700000001) and set(base58(53700000001)) <= set(FLICKR_ALPHABET)
    n = 0
    for ch in base58(53700000001):
        n = n * 58 + FLICKR_ALPHABET.index(ch)
    assert n == 53700000001
    r = http.get(emu.url("flic.kr", f"p/{base58(53700000001)}"))
    assert r.url == emu.url("www.flickr.com", "photos/shortlinker/53700000001/") and len(r.history) == 1


# -- the default scenario -----------------------------------------------------------------


def test_default_scenario_covers_the_brief(emu: Emulator) -> None:
    labels = set(emu.scenario.expected.values())
    assert labels >= {
        "accept_candidate", "skip_small", "skip_aspect", "skip_nsfw", "skip_spoiler", "skip_video", "skip_removed",
        "skip_not_image", "skip_animated", "skip_failed", "skip_no_media", "fail_removed", "fail_not_found",
        "fail_not_image", "fail_truncated", "fail_bomb", "fail_timeout", "fail_blocked_address",
    }
    ids = {p["id"] for p in emu.scenario.posts}
    for key in emu.scenario.expected:
        assert key.split("/")[0] in ids, key
    for p in emu.scenario.posts:
        assert p["id"] in emu.scenario.expected or any(k.startswith(p["id"] + "/") for k in emu.scenario.expected)
        if "://" in p["url"] and "169.254" not in p["url"]:
            assert f":{emu.port}/" in p["url"], f"{p['url']} lacks the emulator port"


def test_scenario_images_are_what_they_claim(emu: Emulator, http: HttpClient) -> None:
    checked = 0
    for (host, path), res in emu.scenario.files.items():
        if res.kind != "image" or res.fmt == "gif" or max(res.width, res.height) > 2000:
            continue
        dl = http.download_image(emu.url(host, path))
        with Image.open(io.BytesIO(dl.data)) as im:
            assert im.size == (res.width, res.height) and dl.format == res.fmt, (host, path)
        checked += 1
    assert checked >= 20


def test_images_are_deterministic() -> None:
    a = default_scenario(1234)
    b = default_scenario(1234)
    assert a.posts == b.posts and a.expected == b.expected
    assert {k: v.seed for k, v in a.files.items()} == {k: v.seed for k, v in b.files.items()}


def test_requests_recorded_and_counted(emu: Emulator, http: HttpClient) -> None:
    before = emu.count(host="i.redd.it", path="/bigdirect1.jpeg")
    http.download_image(emu.url("i.redd.it", "bigdirect1.jpeg"))
    assert emu.count(host="i.redd.it", path="/bigdirect1.jpeg") == before + 1
    rec = emu.records()[-1]
    assert rec.method == "GET" and rec.status == 200 and rec.headers["User-Agent"]
    assert emu.count(host="i.redd.it", path="/big*") >= 1


def test_resource_delay(emu: Emulator, http: HttpClient) -> None:
    url = emu.scenario.add_image("cdn.photohost.example", "slowish.jpg", 64, 48, delay=0.3)
    t0 = time.monotonic()
    assert http.download_image(url).format == "jpeg"
    assert time.monotonic() - t0 >= 0.3


def test_wait_idle_waits_for_open_connections() -> None:
    """wait_idle() returns False while a client holds a connection (even mid slow body) and True once it closes."""
    import socket
    import ssl

    with Emulator() as e:
        ctx = ssl.create_default_context(cafile=e.ca_bundle)
        with socket.create_connection(("127.0.0.1", e.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="hostile.example") as tls:
                assert e.wait_idle(0.3) is False  # handshaken, nothing sent yet: not idle
                tls.sendall(f"GET /slow.jpg HTTP/1.1\r\nHost: hostile.example:{e.port}\r\n\r\n".encode())
                assert tls.recv(64).startswith(b"HTTP/1.")
                assert e.wait_idle(0.3) is False  # the endless body is still being written
        t0 = time.monotonic()
        assert e.wait_idle(5) is True
        assert time.monotonic() - t0 < 5
        assert e.count(host="hostile.example", path="/slow.jpg") == 1


def test_unknown_path_404(emu: Emulator, http: HttpClient) -> None:
    with pytest.raises(FetchError) as ei:
        http.get(emu.url("i.redd.it", "does-not-exist.jpg"))
    assert ei.value.reason == "http_404"


def test_nomad_args_and_ca_bundle(emu: Emulator) -> None:
    args = emu.nomad_args()
    pins = [args[i + 1] for i, a in enumerate(args) if a == "--resolve"]
    assert f"www.reddit.com:{emu.port}:127.0.0.1" in pins and f"live.staticflickr.com:{emu.port}:127.0.0.1" in pins
    assert args[args.index("--ca-bundle") + 1] == emu.ca_bundle
    assert Path(emu.ca_bundle).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert args[args.index("--reddit-url") + 1] == f"https://www.reddit.com:{emu.port}"
    for flag in ("--reddit-oauth-url", "--imgur-api-url", "--flickr-api-url"):
        assert args[args.index(flag) + 1].endswith(f":{emu.port}")


def test_wildcard_cert_covers_farm_hosts(emu: Emulator) -> None:
    c = HttpClient(HttpConfig(resolve=[f"farm42.staticflickr.com:{emu.port}:127.0.0.1"], ca_bundle=emu.ca_bundle, retries=0))
    with pytest.raises(HttpStatusError) as ei:  # TLS is fine; the file just does not exist
        c.get(f"https://farm42.staticflickr.com:{emu.port}/x.jpg")
    assert ei.value.status == 404


def test_standalone_main_prints_flags_and_stops() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stack.emulator"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(lines) < 3:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert "--resolve www.reddit.com:" in text and "--ca-bundle" in text and "REDDIT_CLIENT_ID=" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_rendered_images_are_kept_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image file is rendered once and then served from the cache; the cache drops the oldest past its bound."""
    import stack.emulator as emulator_pkg
    from stack.emulator import images as emu_images

    def scenario(port: int) -> Scenario:
        s = Scenario(port)
        s.files.clear()  # only this test's three files
        for i in range(3):
            s.add_image("i.redd.it", f"c{i}.jpeg", 320, 200, seed=50 + i)
        return s

    renders: list[int] = []
    real = emu_images.picture

    def counting(width: int, height: int, fmt: str = "jpeg", seed: int = 0, orientation: int = 1) -> bytes:
        renders.append(seed)
        return real(width, height, fmt, seed, orientation)

    monkeypatch.setattr(emu_images, "picture", counting)
    with Emulator(scenario) as e:
        assert e.prerender() == 3
        assert renders == [50, 51, 52]
        files = list(e.scenario.files.values())
        with HttpClient(HttpConfig(ca_bundle=e.ca_bundle, resolve=e.resolve_entries(), allow_private=True)) as http:
            got = http.download_image(e.url("i.redd.it", "c1.jpeg")).data
        assert got == real(320, 200, "jpeg", 51) and renders == [50, 51, 52]  # served from the cache
        sizes = [len(e.image_bytes(r)) for r in files]
        monkeypatch.setattr(emulator_pkg, "RENDER_CACHE_BYTES", sizes[1] + sizes[2])
        e._rendered.clear()
        e._rendered_bytes = 0
        renders.clear()
        for r in files:
            e.image_bytes(r)
        assert e._rendered_bytes <= sizes[1] + sizes[2] and len(e._rendered) == 2  # the oldest went
        e.image_bytes(files[1])
        e.image_bytes(files[2])
        assert renders == [50, 51, 52]  # c1 and c2 were still kept
        e.image_bytes(files[0])
        assert renders == [50, 51, 52, 50]  # c0 had gone
