"""``gallery-bridge web``: the JSON API, the pages' safety (escaping, CSRF, CSP, auth) and upload caps.

The app runs in-process (Flask's test client) on a gallery filled through a
real ``gallery-bridge serve`` loop (:class:`gallery_bridge.server.Server` on a
thread), so labels go over the real ``label`` op. The browser test is
tests/test_gallery_web_browser.py.
"""
from __future__ import annotations

import io
import re
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Iterator

import pytest
from PIL import Image

from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import IngestClient
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.web import WebConfig, create_app
from gallery_bridge.web import security, services
from tests import gallery_helpers as T

pytestmark = pytest.mark.timeout(300)

HOSTILE = '<script>alert("t")</script><img src=x onerror=alert(1)>'


class Gallery:
    """A folder gallery with its serve loop on a thread; ``ids`` are entry ids, oldest first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        target = FolderTarget(root)
        self.ingester = Ingester(Catalogue(target.catalogue_path), target)
        self.server = Server(self.ingester, ServerConfig(bind="tcp://127.0.0.1:*")).start()
        self.endpoint = self.server.endpoint
        self.client = IngestClient(self.endpoint, timeout=30, retries=0)
        self.ids: list[int] = []
        self.reviews: list[int] = []

    def add(self, i: int, **meta: Any) -> int:
        meta = {"title": f"photo {i}", "author": f"author{i}", "source": "reddit" if i % 2 else "flickr",
                "licence": "CC BY 4.0", "permalink": f"https://www.reddit.com/r/pics/comments/p{i}/",
                "scores": {"gmm": -10.0 - i, "watermark": 0.01 * i}, **meta}
        reply = self.client.ingest(f"test:{i}", meta, T.encode(T.photo(100 + i, (480, 360))))
        assert reply.status == "added", reply
        self.ids.append(int(reply.raw["entry_id"]) if "entry_id" in reply.raw else self._entry_of(f"test:{i}"))
        return self.ids[-1]

    def _entry_of(self, key: str) -> int:
        return int(self.ingester.catalogue.db.execute("SELECT id FROM entries WHERE key=?", (key,)).fetchone()[0])

    def add_review(self, i: int, **meta: Any) -> int:
        meta = {"title": f"rejected {i}", "source": "flickr", "permalink": f"https://www.flickr.com/photos/x/{i}/", **meta}
        img = T.photo(500 + i, (512, 384))
        reply = self.client.review(f"rev:{i}", meta, T.encode(img, "JPEG"), {"gmm": -40.0 - i, "watermark": 0.2},
                                   "gmm")
        assert reply["status"] == "added", reply
        self.reviews.append(int(reply["review_id"]))
        return self.reviews[-1]

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.ingester.close()


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[Gallery]:
    g = Gallery(tmp_path / "gallery")
    try:
        yield g
    finally:
        g.close()


def app_for(g: Gallery, **kw: Any):
    app = create_app(WebConfig(gallery=g.root, connect=g.endpoint, timeout=20, **kw))
    app.testing = True
    return app.test_client()


def csrf_of(client: Any) -> str:
    html = client.get("/").get_data(as_text=True)
    m = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert m, "the page carries no CSRF token"
    return m.group(1)


# ---- browse API ------------------------------------------------------------------------------------------

def test_api_pages_newest_first_with_a_cursor(gallery: Gallery) -> None:
    for i in range(7):
        gallery.add(i)
    c = app_for(gallery)
    seen: list[int] = []
    before = None
    for _ in range(5):
        r = c.get("/api/images", query_string={"limit": 3, **({"before": before} if before else {})})
        assert r.status_code == 200, r.json
        seen += [it["id"] for it in r.json["items"]]
        assert r.json["total"] == 7
        before = r.json["next_before"]
        if before is None:
            break
    assert seen == sorted(gallery.ids, reverse=True)
    first = c.get("/api/images?limit=1").json["items"][0]
    assert first["item"] == f"g{first['id']}" and first["scores"] == {"gmm": -16.0, "watermark": pytest.approx(0.06)}
    assert c.get("/api/images?limit=abc").status_code == 400


def test_browse_has_no_500_cap(tmp_path: Path) -> None:
    """A gallery of 620 entries pages all the way down (the static page stopped at 500)."""
    target = FolderTarget(tmp_path / "g")
    cat = Catalogue(target.catalogue_path)
    for i in range(620):
        eid = cat.insert_pending(key=f"k{i}", sha256=f"{i:064x}", phash="0" * 144, coarse=0, signature=b"",
                                 features=None, ext="jpg", width=10, height=10, nbytes=1, meta={"title": f"t{i}"})
        cat.complete(eid, eid)
    cat.close()
    c = create_app(WebConfig(gallery=tmp_path / "g")).test_client()
    ids: list[int] = []
    before = None
    while True:
        r = c.get("/api/images", query_string={"limit": 200, **({"before": before} if before else {})}).json
        ids += [it["id"] for it in r["items"]]
        before = r["next_before"]
        if before is None:
            break
    assert len(ids) == 620 and ids == sorted(set(ids), reverse=True)
    html = c.get("/?limit=200").get_data(as_text=True)
    assert 'id="next"' in html and html.count('class="card"') == 200


def test_filters_by_source_date_and_score(gallery: Gallery) -> None:
    for i in range(6):
        gallery.add(i)
    # Spread the entries over days (the serve stamps them all now).
    db = sqlite3.connect(gallery.root / "catalogue.sqlite")
    for n, eid in enumerate(gallery.ids):
        db.execute("UPDATE entries SET added_at=? WHERE id=?", (f"2026-01-{10 + n:02d}T12:00:00Z", eid))
    db.commit()
    db.close()
    c = app_for(gallery)

    def ids(**q: Any) -> list[int]:
        r = c.get("/api/images", query_string=q)
        assert r.status_code == 200, r.json
        return sorted(it["id"] for it in r.json["items"])

    assert ids(source="reddit") == sorted(gallery.ids[1::2])
    assert ids(**{"from": "2026-01-11", "to": "2026-01-13"}) == sorted(gallery.ids[1:4])
    assert ids(score="gmm", min=-13, max=-11) == sorted(gallery.ids[1:4])
    assert ids(score="watermark", min=0.035) == sorted(gallery.ids[4:])
    assert ids(source="reddit", score="gmm", max=-14) == [gallery.ids[5]]
    for bad in ({"from": "yesterday"}, {"min": "1"}, {"score": "x') OR 1=1 --", "min": 0}, {"score": "gmm", "min": "nan"}):
        r = c.get("/api/images", query_string=bad)
        assert r.status_code == 400 and r.json["error"] == "bad_filter", bad
    page = c.get("/?source=flickr").get_data(as_text=True)
    assert page.count('class="card"') == 3 and '<option value="flickr" selected>' in page


def test_detail_shows_every_field_and_the_near_duplicates(gallery: Gallery) -> None:
    eid = gallery.add(3, subreddit="EarthPorn")
    # The same picture sent again under another key: an alias of the entry.
    again = gallery.client.ingest("test:again", {}, T.encode(T.photo(103, (480, 360))))
    assert again.status == "duplicate"
    c = app_for(gallery)
    r = c.get(f"/api/images/g{eid}")
    assert r.status_code == 200
    d = r.json
    assert (d["title"], d["author"], d["source"], d["licence"]) == ("photo 3", "author3", "reddit", "CC BY 4.0")
    assert d["permalink"] == "https://www.reddit.com/r/pics/comments/p3/" and (d["width"], d["height"]) == (480, 360)
    assert d["scores"] == {"gmm": -13.0, "watermark": pytest.approx(0.03)}
    assert [x["key"] for x in d["duplicates"]] == ["test:again"]
    assert c.get(f"/api/images/{eid}").json["id"] == eid  # a bare entry id works too
    html = c.get(f"/items/g{eid}").get_data(as_text=True)
    for text in ("photo 3", "author3", "CC BY 4.0", "r/EarthPorn", "480×360", "test:again", "gmm", "-13",
                 'href="https://www.reddit.com/r/pics/comments/p3/"', f'src="/media/images/{eid}"'):
        assert text in html, text
    img = c.get(f"/media/images/{eid}")
    assert img.status_code == 200 and img.mimetype == "image/jpeg" and img.data == T.encode(T.photo(103, (480, 360)))
    assert c.get(f"/media/thumbs/{eid}").mimetype == "image/jpeg"
    for missing in ("/api/images/g999", "/api/images/x1", "/api/images/g1;drop", "/media/images/999"):
        assert c.get(missing).status_code == 404, missing


def test_healthz_and_the_empty_state(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    c = create_app(WebConfig(gallery=tmp_path / "empty")).test_client()
    assert c.get("/healthz").json == {"status": "ok", "version": c.get("/healthz").json["version"], "catalogue": False,
                                      "entries": 0}
    html = c.get("/").get_data(as_text=True)
    assert 'id="empty"' in html and "make demo" in html and "make up" in html
    assert c.get("/api/images").json == {"items": [], "next_before": None, "total": 0}


# ---- safety ------------------------------------------------------------------------------------------------

class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.in_script = not dict(attrs).get("src")
        self.handlers += [f"{tag} {k}" for k, _ in attrs if k.startswith("on")]

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.inline.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False


def test_every_field_is_escaped_and_no_page_has_inline_script(gallery: Gallery) -> None:
    eid = gallery.add(1, title=HOSTILE, author=HOSTILE, licence=HOSTILE, source=HOSTILE[:60])
    rid = gallery.add_review(1, title=HOSTILE, author=HOSTILE)
    # A link that slipped past ingest's checks must still not become a javascript: link.
    db = sqlite3.connect(gallery.root / "catalogue.sqlite")
    db.execute("UPDATE entries SET source_url='javascript:alert(1)' WHERE id=?", (eid,))
    db.commit()
    db.close()
    c = app_for(gallery)
    for path in ("/", f"/items/g{eid}", "/review", f"/items/r{rid}", "/search?q=" + HOSTILE, "/login"):
        r = c.get(path)
        html = r.get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert "javascript:" not in html, path
        parsed = _Scripts()
        parsed.feed(html)
        assert parsed.inline == [] and parsed.handlers == [], (path, parsed.inline, parsed.handlers)
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp, path
        assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert "&lt;script&gt;alert(" in c.get(f"/items/g{eid}").get_data(as_text=True)


def test_post_without_the_csrf_token_is_refused(gallery: Gallery) -> None:
    eid = gallery.add(1)
    c = app_for(gallery)
    for headers in ({}, {"X-CSRF-Token": "forged"}):
        r = c.post(f"/api/items/g{eid}/label", json={"label": "good"}, headers=headers)
        assert r.status_code == 403 and r.json["error"] == "csrf"
    r = c.post("/search/upload", data={"image": (io.BytesIO(T.encode(T.photo(1))), "a.jpg")})
    assert r.status_code == 403
    # Another browser session's token is no good either.
    other = app_for(gallery)
    token = csrf_of(other)
    csrf_of(c)
    assert c.post(f"/api/items/g{eid}/label", json={"label": "good"}, headers={"X-CSRF-Token": token}).status_code == 403
    # The session cookie never goes along with a cross-site request.
    cookie = app_for(gallery).get("/").headers.get("Set-Cookie", "")
    assert "SameSite=Strict" in cookie and "HttpOnly" in cookie


def test_label_through_the_api_reaches_serve(gallery: Gallery) -> None:
    keep, drop = gallery.add(1), gallery.add(2)
    rid = gallery.add_review(1)
    c = app_for(gallery)
    tok = csrf_of(c)

    def label(item: str, value: str) -> Any:
        return c.post(f"/api/items/{item}/label", json={"label": value}, headers={"X-CSRF-Token": tok})

    r = label(f"g{keep}", "good")
    assert r.status_code == 200 and r.json["label"] == "good", r.json
    assert c.get(f"/api/images/g{keep}").json["label"] == "good"
    r = label(f"g{drop}", "bad")
    assert r.status_code == 200 and r.json["removed"] is True, r.json
    assert c.get(f"/api/images/g{drop}").status_code == 404
    assert drop not in [it["id"] for it in c.get("/api/images").json["items"]]
    r = label(f"r{rid}", "good")
    assert r.status_code == 200 and isinstance(r.json["gallery_id"], int), r.json
    item = c.get(f"/api/images/r{rid}").json
    assert item["label"] == "good"
    assert c.get("/api/images").json["total"] == 2  # keep + the review item flipped to good
    assert label(f"g{keep}", "maybe").status_code == 400
    assert label("g99999", "bad").status_code == 404
    assert label("x1", "bad").status_code == 404


def test_review_api_lists_items_newest_first(gallery: Gallery) -> None:
    rids = [gallery.add_review(i) for i in range(3)]
    c = app_for(gallery)
    r = c.get("/api/review?limit=2")
    assert r.status_code == 200
    assert [it["item"] for it in r.json["items"]] == [f"r{rids[2]}", f"r{rids[1]}"] and r.json["total"] == 3
    first = r.json["items"][0]
    assert first["rejected_by"] == "gmm" and first["scores"]["gmm"] == -42.0
    assert c.get(first["image_url"]).mimetype == "image/jpeg"
    html = c.get("/review").get_data(as_text=True)
    assert html.count('class="card"') == 3 and "rejected by gmm" in html and "<kbd>g</kbd>" in html


def test_label_and_search_answer_503_when_their_parts_are_missing(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    eid = gallery.add(1)
    c = app_for(gallery)
    tok = csrf_of(c)
    real = services.optional
    monkeypatch.setattr(services, "optional", lambda name: None if name in ("search", "reviews") else real(name))
    for path in ("/api/search?q=lake", f"/api/search?like=g{eid}", "/api/review"):
        r = c.get(path)
        assert r.status_code == 503 and r.json["error"] == "unavailable" and "missing" in r.json["message"], path
    assert "gallery_bridge.search is missing" in c.get("/search?q=lake").get_data(as_text=True)
    monkeypatch.undo()
    # serve gone: the label cannot be written, and the page says so instead of hanging.
    gallery.server.close()
    cfg_client = app_for(gallery)
    cfg_client.application.extensions["gallery_web"]["config"].timeout = 0.5
    tok = csrf_of(cfg_client)
    r = cfg_client.post(f"/api/items/g{eid}/label", json={"label": "good"}, headers={"X-CSRF-Token": tok})
    assert r.status_code == 503 and "does not answer" in r.json["message"]


# ---- access when exposed -------------------------------------------------------------------------------------

def test_non_loopback_needs_a_token(gallery: Gallery, tmp_path: Path) -> None:
    assert security.is_loopback("127.0.0.1") and security.is_loopback("::1") and security.is_loopback("localhost")
    assert not security.is_loopback("0.0.0.0") and not security.is_loopback("192.168.1.5")
    with pytest.raises(security.UserError, match="GALLERY_BRIDGE_WEB_TOKEN"):
        security.check_exposure("0.0.0.0", None)
    security.check_exposure("0.0.0.0", "x" * 20)
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    cli = [sys.executable, "-m", "gallery_bridge", "web", "--gallery", str(gallery.root), "--bind", "0.0.0.0:0"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "GALLERY_BRIDGE_WEB_TOKEN" in out.stderr, out.stderr
    # Never a flag: a token on the command line would show in ps.
    out = subprocess.run(cli + ["--token", "x" * 20], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, env={**env, "GALLERY_BRIDGE_WEB_TOKEN": "short"})
    assert out.returncode == 2 and "at least 16" in out.stderr and "short" not in out.stderr.replace("short)", "")


def test_with_a_token_every_request_needs_it(gallery: Gallery) -> None:
    eid = gallery.add(1)
    token = "t0ken-" + "x" * 20
    c = app_for(gallery, token=token)
    assert c.get("/healthz").status_code == 200
    assert c.get("/api/images").status_code == 401
    assert c.get(f"/media/images/{eid}").status_code in (302, 401)
    r = c.get("/review")
    assert r.status_code == 302 and "/login" in r.headers["Location"]
    assert c.get("/api/images", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.get("/api/images", headers={"Authorization": "Bearer wrong"}).status_code == 401
    login = c.get("/login").get_data(as_text=True)
    tok = re.search(r'name="csrf_token" value="([^"]+)"', login).group(1)
    assert c.post("/login", data={"token": "wrong", "csrf_token": tok}).status_code == 401
    assert c.post("/login", data={"token": token}).status_code == 403  # the login form is CSRF-checked too
    r = c.post("/login?next=//evil.example/", data={"token": token, "csrf_token": tok})
    assert r.status_code == 302 and r.headers["Location"] == "/"  # no open redirect
    assert c.get("/api/images").status_code == 200 and c.get(f"/media/images/{eid}").status_code == 200


def test_token_file_is_created_when_asked(tmp_path: Path) -> None:
    from gallery_bridge.web.serve import resolve_token

    path = tmp_path / "secrets" / "web-token"
    env = {"GALLERY_BRIDGE_WEB_TOKEN_FILE": str(path)}
    with pytest.raises(security.UserError, match="GALLERY_BRIDGE_WEB_TOKEN_FILE"):
        resolve_token(False, env)  # named but missing, and not asked to create it: one clear line
    token = resolve_token(True, env)
    assert token and path.read_text().strip() == token and (path.stat().st_mode & 0o777) == 0o600
    assert resolve_token(True, env) == token  # kept across restarts


# ---- uploads -----------------------------------------------------------------------------------------------

def test_uploads_are_capped_and_checked_like_ingest(gallery: Gallery) -> None:
    gallery.add(1)
    c = app_for(gallery, max_upload_bytes=200_000, max_upload_pixels=1_000_000)
    tok = csrf_of(c)

    def upload(data: bytes) -> Any:
        return c.post("/api/search/image", data={"image": (io.BytesIO(data), "f.bin")}, headers={"X-CSRF-Token": tok},
                      content_type="multipart/form-data")

    big = upload(b"\xff\xd8\xff" + b"\0" * 400_000)
    assert big.status_code == 413, big.json
    # Few bytes, many pixels: a 4000x4000 flat PNG is small on disk but over the pixel cap.
    buf = io.BytesIO()
    Image.new("RGB", (4000, 4000), (10, 20, 30)).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    r = upload(buf.getvalue())
    assert r.status_code == 413 and "pixels" in r.json["message"], r.json
    r = upload(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    assert r.status_code == 400 and "magic bytes" in r.json["message"]
    r = upload(T.encode(T.photo(7, (300, 200)))[:3000])  # a truncated JPEG
    assert r.status_code == 400
    ok = upload(T.encode(T.photo(7, (300, 200))))
    assert ok.status_code in (200, 503), ok.json  # 503 only when search is not available: the checks passed


def test_the_web_apps_reads_never_block_ingest_and_cannot_write(gallery: Gallery) -> None:
    """WAL: a reader mid-transaction (a slow page) does not stop serve from committing; the connection is read-only."""
    import time

    from gallery_bridge.web import queries

    gallery.add(1)
    conn = queries.connect(gallery.root / "catalogue.sqlite")
    assert conn is not None
    try:
        conn.execute("BEGIN")
        assert queries.count(conn) == 1  # holds a read snapshot open
        t0 = time.monotonic()
        gallery.add(2)  # serve's write commits while the snapshot is open
        assert time.monotonic() - t0 < 10
        assert queries.count(conn) == 1  # the open snapshot still sees the old state ...
        conn.execute("COMMIT")
        assert queries.count(conn) == 2  # ... and the next read sees the new entry
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            conn.execute("DELETE FROM entries")
    finally:
        conn.close()
