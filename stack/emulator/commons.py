"""Wikimedia Commons for the emulator: the Action API at ``commons.wikimedia.org/w/api.php``
and the files at ``upload.wikimedia.org``.

Served (``action=query&format=json&formatversion=2``, the shapes of
``tests/fixtures/commons_*.json``):

- ``list=categorymembers`` with ``cmsort=timestamp`` (the time a page was
  *added* to the category), ``cmdir`` newer/asc or older/desc, ``cmstart``,
  ``cmlimit``, ``cmnamespace``, ``cmprop``; ``cmtype`` is ignored with a
  timestamp sort, as on the real wiki, so a subcategory shows up unless
  ``cmnamespace=6`` is sent. Paging through ``continue.cmcontinue``.
- ``generator=allimages`` (``gaisort=timestamp``, ``gaidir``, ``gaistart``,
  ``gailimit``, ``continue.gaicontinue``); a generator's pages come back in
  page-id order, not in time order.
- ``prop=imageinfo`` (``pageids=`` or from the generator) with ``iiprop``
  timestamp/url/size/mime/extmetadata, ``iiextmetadatafilter`` and
  ``iiurlwidth``, which rounds up to the thumbnail steps (a width at or above
  the original's gives the original).

Robot policy and hostile answers: a User-Agent without a contact in
parentheses gets Wikimedia's 403 page; ``CommonsSite.maxlag_next`` requests
get a ``maxlag`` error (HTTP 200, ``Retry-After``); ``truncate_next`` requests
get a JSON body cut in half. 429 with Retry-After comes from the emulator's
generic ``scenario.inject[("commons.wikimedia.org", "/w/api.php")]``.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .scenario import Resource, Scenario

if TYPE_CHECKING:
    from .server import Handler

API_HOST = "commons.wikimedia.org"
UPLOAD_HOST = "upload.wikimedia.org"
FEATURED = "Category:Featured_pictures_on_Wikimedia_Commons"
QUALITY = "Category:Quality_images"
STEPS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
RASTER = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}
# Wikimedia answers generic clients with a 403 page; a contact in parentheses passes.
_UA_OK = re.compile(r"^[\w.-]+/[\w.+-]+ \([^()]{3,}\)")
UA_BLOCK_PAGE = (b"<!DOCTYPE html><html><head><title>Wikimedia Error</title></head><body>"
                 b"<p>Please set a user-agent and respect our robot policy https://w.wiki/4wJS.</p></body></html>")


def mw_ts(epoch: float) -> str:
    """``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _from_ts(text: str) -> float | None:
    for fmt in ("%Y-%m-%dT%H:%M:%SZ", "%Y%m%d%H%M%S"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


@dataclass
class CommonsFile:
    """One file page: its original's size and type, when it was uploaded, which categories it joined when."""

    pageid: int
    name: str  # "Alpine_lake.jpg" (underscores, as in URLs)
    width: int
    height: int
    mime: str = "image/jpeg"
    uploaded: float = 0.0
    categories: dict[str, float] = field(default_factory=dict)
    license: str = "CC BY-SA 4.0"
    license_url: str = "https://creativecommons.org/licenses/by-sa/4.0"
    artist: str = '<a href="//commons.wikimedia.org/wiki/User:Emu_Photographer" title="User:Emu Photographer">Emu &amp; Photographer</a>'
    credit: str = '<span class="int-own-work" lang="en">Own work</span>'
    deleted: bool = False
    """Listed in a category but gone when imageinfo is asked (deleted in between)."""
    expected: str | None = None

    @property
    def title(self) -> str:
        return "File:" + self.name.replace("_", " ")

    @property
    def hash_path(self) -> str:
        digest = hashlib.md5(self.name.encode()).hexdigest()
        return f"{digest[0]}/{digest[:2]}"

    @property
    def size(self) -> int:
        per_pixel = {"image/png": 3, "image/jpeg": 0.4, "image/webp": 0.3}.get(self.mime, 0.5)
        return int(self.width * self.height * per_pixel) + 1000


class CommonsSite:
    """The emulated wiki: files, category members, and the hostile switches."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.files: dict[int, CommonsFile] = {}
        self.subcategories: dict[str, list[tuple[int, str, float]]] = {}
        self.maxlag_next = 0
        self.truncate_next = 0
        self.lock = threading.Lock()

    @property
    def expected(self) -> dict[str, str]:
        """Outcome labels by post id (``M<pageid>``), like ``Scenario.expected`` for reddit."""
        return {f"M{f.pageid}": f.expected for f in self.files.values() if f.expected}

    # -- URLs ------------------------------------------------------------------------------
    def original_url(self, f: CommonsFile) -> str:
        return self.scenario.url(UPLOAD_HOST, f"wikipedia/commons/{f.hash_path}/{quote(f.name)}")

    def thumb_url(self, f: CommonsFile, width: int) -> str:
        suffix = ".png" if f.mime not in RASTER or f.mime == "image/gif" else ""
        return self.scenario.url(UPLOAD_HOST, f"wikipedia/commons/thumb/{f.hash_path}/{quote(f.name)}/{width}px-{quote(f.name)}{suffix}")

    def add(self, f: CommonsFile) -> CommonsFile:
        """Register a file: API entries, and for raster types the original and every thumbnail step below it."""
        self.files[f.pageid] = f
        fmt = RASTER.get(f.mime)
        seed = f.pageid & 0xFFFF
        if fmt:
            self.scenario.add_image(UPLOAD_HOST, self.original_url(f).split(f":{self.scenario.port}", 1)[1], f.width, f.height, fmt, seed)
            for step in STEPS:
                if step < f.width and fmt != "gif":
                    path = self.thumb_url(f, step).split(f":{self.scenario.port}", 1)[1]
                    self.scenario.add_image(UPLOAD_HOST, path, step, max(1, round(f.height * step / f.width)), fmt, seed)
        else:
            self.scenario.add_file(UPLOAD_HOST, self.original_url(f).split(f":{self.scenario.port}", 1)[1],
                                   Resource("bytes", body=b"not a photo", content_type=f.mime))
        return f

    # -- API answers -----------------------------------------------------------------------
    def members(self, category: str) -> list[tuple[float, int, int, str]]:
        """(added, pageid, ns, title) of a category, oldest first."""
        rows = [(f.categories[category], f.pageid, 6, f.title) for f in self.files.values() if category in f.categories]
        rows += [(added, pid, 14, title) for pid, title, added in self.subcategories.get(category, [])]
        return sorted(rows)

    def imageinfo(self, f: CommonsFile, q: dict[str, str]) -> dict[str, Any]:
        props = set(q.get("iiprop", "timestamp|user").split("|"))
        info: dict[str, Any] = {}
        if "timestamp" in props:
            info["timestamp"] = mw_ts(f.uploaded)
        if "size" in props:
            info.update(size=f.size, width=f.width, height=f.height)
        if "url" in props:
            want = q.get("iiurlwidth", "")
            if want.isdigit() and int(want) > 0:
                step = next((s for s in STEPS if s >= int(want)), int(want))
                if step >= f.width and f.mime in RASTER:
                    info.update(thumburl=self.original_url(f), thumbwidth=f.width, thumbheight=f.height)
                else:
                    info.update(thumburl=self.thumb_url(f, step), thumbwidth=step,
                                thumbheight=max(1, round(f.height * step / f.width)))
            info["url"] = self.original_url(f)
            info["descriptionurl"] = f"https://commons.wikimedia.org/wiki/{quote(f.title.replace(' ', '_'), safe=':/(),')}"
            info["descriptionshorturl"] = f"https://commons.wikimedia.org/w/index.php?curid={f.pageid}"
        if "mime" in props:
            info["mime"] = f.mime
        if "extmetadata" in props:
            meta = {
                "DateTime": mw_ts(f.uploaded).replace("T", " ").rstrip("Z"),
                "ObjectName": f.name.rsplit(".", 1)[0].replace("_", " "),
                "Credit": f.credit,
                "Artist": f.artist,
                "LicenseShortName": f.license,
                "LicenseUrl": f.license_url,
                "UsageTerms": f"Creative Commons Attribution-Share Alike {f.license.split()[-1]}",
                "Copyrighted": "True",
            }
            wanted = set(filter(None, q.get("iiextmetadatafilter", "").split("|")))
            info["extmetadata"] = {k: {"value": v, "source": "commons-desc-page", **({"hidden": ""} if k in ("DateTime",) else {})}
                                   for k, v in meta.items() if not wanted or k in wanted}
        return info

    def page(self, pageid: int, q: dict[str, str]) -> dict[str, Any]:
        f = self.files.get(pageid)
        if f is None or f.deleted:
            return {"pageid": pageid, "missing": True}
        out: dict[str, Any] = {"pageid": f.pageid, "ns": 6, "title": f.title}
        if "imageinfo" in q.get("prop", "").split("|"):
            out["imagerepository"] = "local"
            out["imageinfo"] = [self.imageinfo(f, q)]
        return out


def _limit(value: str, default: int = 10) -> int:
    if value == "max":
        return 500
    try:
        return max(1, min(500, int(value)))
    except ValueError:
        return default


def _walk(rows: list[Any], key: Any, q: dict[str, str], prefix: str) -> tuple[list[Any], str | None]:
    """One page of ``rows`` (sorted oldest first) after start/continue/dir/limit; the next continue token."""
    desc = q.get(f"{prefix}dir", "newer") in ("older", "desc", "descending")
    if desc:
        rows = rows[::-1]
    start = _from_ts(q.get(f"{prefix}start", "")) if q.get(f"{prefix}start") else None
    if start is not None:
        rows = [r for r in rows if (key(r)[0] <= start if desc else key(r)[0] >= start)]
    token = q.get(f"{prefix}continue", "")
    if token:
        ts_text, _, tail = token.partition("|")
        at = _from_ts(ts_text) or 0.0
        hit = next((i for i, r in enumerate(rows) if key(r)[0] == at and str(key(r)[1]) == tail), None)
        if hit is not None:
            rows = rows[hit:]
        else:  # the row the token named is gone: resume by time
            rows = [r for r in rows if (key(r)[0] <= at if desc else key(r)[0] >= at)]
    n = _limit(q.get(f"{prefix}limit", "10"))
    page, rest = rows[:n], rows[n:]
    nxt = None
    if rest:
        ts, tail = key(rest[0])
        nxt = datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y%m%d%H%M%S") + f"|{tail}"
    return page, nxt


def api(h: "Handler") -> None:
    """``GET /w/api.php`` on commons.wikimedia.org."""
    site: CommonsSite | None = getattr(h.emu.scenario, "commons", None)
    if site is None:
        site = CommonsSite(h.emu.scenario)
    q = {k: v[0] for k, v in h.query.items()}
    if not _UA_OK.match(h.headers.get("User-Agent", "")):
        return h._send(403, UA_BLOCK_PAGE, "text/html; charset=utf-8")
    with site.lock:
        maxlag = site.maxlag_next > 0 and "maxlag" in q
        if maxlag:
            site.maxlag_next -= 1
        truncate = not maxlag and site.truncate_next > 0
        if truncate:
            site.truncate_next -= 1
    if maxlag:
        return h._json({"error": {"code": "maxlag", "info": "Waiting for 10.64.16.8: 6.2 seconds lagged.", "host": "10.64.16.8",
                                  "lag": 6.2, "type": "db", "*": "See https://commons.wikimedia.org/w/api.php for API usage."},
                        "servedby": "mw-api-ext.eqiad.main-emu"}, 200, {"Retry-After": "1", "X-Database-Lag": "6"})
    if q.get("action") != "query" or q.get("format") != "json":
        return h._json({"error": {"code": "badvalue", "info": "only action=query&format=json is emulated"}}, 200,
                       {"MediaWiki-API-Error": "badvalue"})
    body: dict[str, Any] = {"batchcomplete": True}
    query: dict[str, Any] = {}
    cont: dict[str, Any] = {}
    if q.get("list") == "categorymembers":
        cat = q.get("cmtitle", "").replace(" ", "_")
        rows = site.members(cat)
        if q.get("cmnamespace"):
            keep = {int(x) for x in q["cmnamespace"].split("|") if x.lstrip("-").isdigit()}
            rows = [r for r in rows if r[2] in keep]
        elif q.get("cmsort") != "timestamp" and q.get("cmtype"):
            kinds = {"file": 6, "subcat": 14, "page": 0}
            keep = {kinds[t] for t in q["cmtype"].split("|") if t in kinds}
            rows = [r for r in rows if r[2] in keep]
        page, nxt = _walk(rows, lambda r: (r[0], r[1]), q, "cm")
        props = set(q.get("cmprop", "ids|title").split("|"))
        out = []
        for added, pid, ns, title in page:
            m: dict[str, Any] = {}
            if "ids" in props:
                m["pageid"] = pid
            if "title" in props:
                m.update(ns=ns, title=title)
            if "timestamp" in props:
                m["timestamp"] = mw_ts(added)
            out.append(m)
        query["categorymembers"] = out
        if nxt:
            cont = {"cmcontinue": nxt, "continue": "-||"}
    elif q.get("generator") == "allimages":
        files = sorted((f.uploaded, f.name, f) for f in site.files.values() if not f.deleted)
        page, nxt = _walk([(t, n) for t, n, _f in files], lambda r: (r[0], r[1]), q, "gai")
        names = {n for _t, n in page}
        chosen = [f for f in site.files.values() if f.name in names]
        query["pages"] = [site.page(f.pageid, q) for f in sorted(chosen, key=lambda f: f.pageid)]
        if nxt:
            cont = {"gaicontinue": nxt, "continue": "gaicontinue||"}
    elif q.get("pageids"):
        ids = [int(x) for x in q["pageids"].split("|") if x.isdigit()][:50]
        query["pages"] = [site.page(pid, q) for pid in sorted(set(ids))]
    else:
        return h._json({"error": {"code": "badvalue", "info": "unsupported query for the emulator"}})
    if cont:
        body["continue"] = cont
        body.pop("batchcomplete")
    body["query"] = query
    data = json.dumps(body).encode()
    if truncate:
        data = data[: len(data) // 2]
    h._send(200, data, "application/json; charset=utf-8")


def add_commons(s: Scenario, now: float | None = None) -> CommonsSite:
    """Commons content for a scenario (``scenario.commons``): every outcome the source can produce.

    Category additions and uploads are stamped relative to ``now`` (default: the
    current time), so the source's default look-back of a day sees them.
    """
    now = time.time() if now is None else now
    site = CommonsSite(s)
    s.commons = site  # type: ignore[attr-defined]
    old = now - 40 * 86400  # featured files were uploaded long before they were promoted
    F, Q = FEATURED, QUALITY
    # Files promoted into Featured (F) or Quality (Q) images: page id, name, size, MIME type,
    # {category: seconds before now it was added}, expected outcome, anything else that differs.
    promoted: list[tuple[int, str, int, int, str, dict[str, float], str, dict[str, Any]]] = [
        (90000001, "Alpine_lake_at_dawn.jpg", 4000, 3000, "image/jpeg", {F: 5000, Q: 4200}, "accept_candidate", {}),
        (90000002, "Old_town_portrait.jpg", 3000, 4500, "image/jpeg", {F: 4800}, "accept_candidate",
         {"license": "CC BY 4.0", "license_url": "https://creativecommons.org/licenses/by/4.0"}),
        (90000003, "Coat_of_arms.svg", 512, 512, "image/svg+xml", {F: 4600}, "skip_not_image", {}),
        (90000004, "Small_flower.jpg", 1000, 750, "image/jpeg", {F: 4400}, "skip_small", {}),
        (90000005, "Spinning_globe.gif", 1600, 1200, "image/gif", {F: 4000}, "skip_animated", {}),
        (90000006, "Harbour_at_night.png", 1600, 1200, "image/png", {F: 3800}, "accept_candidate", {}),
        (90000012, "Deleted_view.jpg", 4000, 3000, "image/jpeg", {F: 3600}, "skip_removed", {"deleted": True}),
        (90000007, "Wide_panorama.jpg", 9000, 2000, "image/jpeg", {Q: 3400}, "skip_aspect", {}),
        (90000008, "Forest_stream.webp", 2400, 1600, "image/webp", {Q: 3200}, "accept_candidate", {}),
        (90000009, "Scanned_map.tif", 5000, 4000, "image/tiff", {Q: 3000}, "skip_not_image", {}),
    ]
    for n, (pageid, name, width, height, mime, added, expected, more) in enumerate(promoted):
        site.add(CommonsFile(pageid, name, width, height, mime, uploaded=old + 60 * n,
                             categories={cat: now - ago for cat, ago in added.items()}, expected=expected, **more))
    site.subcategories[F] = [(90000100, "Category:Featured pictures of landscapes", now - 3500)]
    # New uploads, in no category yet.
    site.add(CommonsFile(90000010, "Beach_sunset.jpg", 3200, 2400, uploaded=now - 2000, expected="accept_candidate"))
    site.add(CommonsFile(90000011, "Timelapse_clouds.webm", 1920, 1080, "video/webm", uploaded=now - 1800,
                         expected="skip_video"))
    return site
