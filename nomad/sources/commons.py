"""Wikimedia Commons (``commons``): new files of chosen categories and new uploads, no account needed.

Reads the MediaWiki Action API (``https://commons.wikimedia.org/w/api.php``,
``format=json&formatversion=2``):

* ``featured`` / ``quality`` / ``category:<Name>``: new members of a category,
  ``list=categorymembers`` sorted by the time a file was *added* to the
  category (``cmsort=timestamp``, ``cmdir=newer`` from the cursor). ``cmtype``
  is ignored with a timestamp sort, so files are selected with
  ``cmnamespace=6`` and checked again here.
* ``uploads``: new uploads, ``generator=allimages`` sorted by upload time.

Then ``prop=imageinfo`` gives size, MIME type, URLs and ``extmetadata``
(licence, artist, credit), which travel to the gallery with every image.
Only JPEG, PNG and WebP files are photos here (SVG, TIFF, PDF, GIF and video
are recorded as rejected, never downloaded). Commons serves thumbnails only at
fixed widths (``iiurlwidth`` rounds up to one of :data:`THUMB_STEPS`): the
smallest step whose long/short sides meet the resolution rules is asked for;
when no step below the original's width is big enough, the original is used.

Wikimedia's rules for robots: a User-Agent naming the tool and a contact
(``NOMAD_CONTACT``; the source refuses to start without one), one request at
a time with a pause between them (``--commons-interval``), ``maxlag=5`` on
every request and waiting out a ``maxlag`` error (HTTP 200 with a
``Retry-After`` header) or a 429/503 before trying again.

Durable state (per listing, in the store's cursors, so it survives kill -9):
``<listing>:start`` (the timestamp the current pass started from),
``<listing>:continue`` (the API's ``continue`` object for the next page, sent
back verbatim) and ``<listing>:newest`` (the newest timestamp of the pass).
A finished pass starts the next one from its newest timestamp, so a later
poll re-reads at most the files of that one second, which ``is_seen`` drops.

Over 400 lines on purpose, one module per site: the listings, the thumbnail
width rules, the licence metadata and the User-Agent rules are all Wikimedia's.
"""
from __future__ import annotations

import argparse
import html.parser
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import urllib3

from nomad.config import VERSION, positive
from nomad.http import parse_retry_after
from nomad.net.errors import FetchError

from .api import SiteApi, SourceContext
from .base import Candidate, Cursors, Link, ListingSource, SourceConfigError, SourceError, each_listing

log = logging.getLogger(__name__)

NAME = "commons"
DEFAULT_API = "https://commons.wikimedia.org/w/api.php"
CONTACT_ENV = "NOMAD_CONTACT"
MEDIA_HOST = "upload.wikimedia.org"
"""Where Commons keeps its files and thumbnails."""

THUMB_STEPS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
"""The thumbnail widths Commons serves (``$wgThumbnailSteps``); other widths round up."""

PHOTO_MIMES = frozenset({"image/jpeg", "image/png", "image/webp"})
CATEGORIES = {
    "featured": "Category:Featured_pictures_on_Wikimedia_Commons",
    "quality": "Category:Quality_images",
}
DEFAULT_LISTINGS = ["featured", "quality", "uploads"]
EXTMETADATA = "LicenseShortName|LicenseUrl|Artist|Credit|ObjectName|ImageDescription|DateTimeOriginal"
FILE_NS = 6
PAGE_MAX = 50
"""Titles/page ids per imageinfo request (the API's limit without the bot right)."""
PAGES_PER_POLL = 20
"""Upper bound on listing requests per listing and poll (empty pages in miser mode still advance)."""
MAXLAG = 5
MAXLAG_RETRIES = 3
API_MAX_BYTES = 16 * 1024 * 1024
UPLOADS_LOOKBACK_MAX = 3600.0
"""Commons gets about a thousand uploads an hour: a first poll of ``uploads`` starts at most an
hour back, or at 50 files a cycle it would trail a day's backlog for days."""


# --- small pure helpers ------------------------------------------------------------------------------


def user_agent(contact: str) -> str:
    """Wikimedia's required form: ``name/version (contact) library/version``."""
    return f"nomad-photo-miner/{VERSION} ({contact}) urllib3/{urllib3.__version__}"


def check_contact(raw: str | None) -> str:
    """The operator's contact for the User-Agent; SourceConfigError when missing or unusable."""
    contact = (raw or "").strip()
    if not contact:
        raise SourceConfigError(
            f"the commons source needs {CONTACT_ENV} (an e-mail address or URL where Wikimedia can reach you): "
            "Wikimedia blocks clients whose User-Agent has no contact"
        )
    if len(contact) > 200 or any(ord(c) < 32 or c in "()" for c in contact):
        raise SourceConfigError(f"{CONTACT_ENV} must be one short line without parentheses (an e-mail address or URL)")
    return contact


def parse_listing(text: str) -> str:
    """``featured`` | ``quality`` | ``uploads`` | ``category:<Name>`` (argparse type)."""
    t = text.strip()
    if t.lower() in CATEGORIES or t.lower() == "uploads":
        return t.lower()
    if t.lower().startswith("category:") and t[9:].strip():
        return "category:" + t[9:].strip().replace(" ", "_")
    raise argparse.ArgumentTypeError(f"expected featured, quality, uploads or category:<Name>, got {text!r}")


def category_of(listing: str) -> str | None:
    """The category title a listing reads (None for uploads)."""
    if listing in CATEGORIES:
        return CATEGORIES[listing]
    if listing.startswith("category:"):
        return "Category:" + listing[9:]
    return None


def iso(ts: float) -> str:
    """MediaWiki's timestamp form, ``2024-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch(text: str | None) -> float | None:
    """Seconds since 1970 of a MediaWiki timestamp (None when absent or malformed)."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def needed_width(width: int, height: int, min_long: int, min_short: int) -> int:
    """The smallest scaled width at which a ``width`` x ``height`` image meets the size rules."""
    if width >= height:  # landscape: width is the long side
        return max(min_long, math.ceil(min_short * width / height))
    return max(min_short, math.ceil(min_long * width / height))


def thumb_step(width: int, height: int, min_long: int, min_short: int) -> int | None:
    """The thumbnail width to ask for, or None when the original must be used (or is too small)."""
    need = needed_width(width, height, min_long, min_short)
    for step in THUMB_STEPS:
        if step >= need:
            return step if step < width else None
    return None


class _Text(html.parser.HTMLParser):
    """Collects the text of an HTML fragment (Commons' ``Artist``/``Credit`` are HTML)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def plain_text(value: Any, limit: int = 1000) -> str:
    """HTML -> plain text: tags dropped, entities decoded, whitespace collapsed, length capped."""
    if not isinstance(value, str) or not value:
        return ""
    p = _Text()
    try:
        p.feed(value)
        p.close()
    except Exception:  # noqa: BLE001 - html.parser is lenient; never let odd markup stop a poll
        return ""
    return re.sub(r"\s+", " ", "".join(p.parts)).strip()[:limit]


def _meta(ext: Any, key: str) -> Any:
    entry = ext.get(key) if isinstance(ext, Mapping) else None
    return entry.get("value") if isinstance(entry, Mapping) else None


@dataclass
class Entry:
    """One file a listing page named, with its imageinfo once known."""

    pageid: int
    title: str
    timestamp: str
    info: dict[str, Any] | None = None
    thumb: tuple[str, int, int] | None = None
    missing: bool = False

    @property
    def post_id(self) -> str:
        return f"M{self.pageid}"


@dataclass
class CommonsSource(ListingSource):
    """Polls Commons listings through a paced :class:`SiteApi`; see the module docstring."""

    api: SiteApi
    api_url: str = DEFAULT_API
    listings: list[str] = field(default_factory=lambda: list(DEFAULT_LISTINGS))
    limit: int = 50
    lookback: float = 24 * 3600.0
    min_long: int = 1280
    min_short: int = 1024
    clock: Callable[[], float] = time.time

    name = NAME
    needs = CONTACT_ENV

    def describe(self) -> str:
        return f"commons: {', '.join(self.listings)} from {self.api_url} (contact in the User-Agent, key-less)"

    def media_headers(self) -> dict[str, dict[str, str]]:
        """Wikimedia's User-Agent rule holds for its file servers too: the image downloads carry the contact."""
        ua = self.api.headers.get("User-Agent")
        return {MEDIA_HOST: {"User-Agent": ua}} if ua else {}

    # --- API calls --------------------------------------------------------------------------------
    def query(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """One ``action=query`` call; maxlag errors are waited out, other API errors raise SourceError."""
        full = {"action": "query", "format": "json", "formatversion": "2", "maxlag": MAXLAG, **params}
        for attempt in range(MAXLAG_RETRIES + 1):
            resp = self.api.get(self.api_url, params=full, headers={"Accept": "application/json"}, max_bytes=API_MAX_BYTES)
            try:
                body = resp.json()
            except FetchError as exc:
                self.api.mark("error", "answer is not JSON")
                raise SourceError("bad_answer", "Commons answered something that is not JSON (cut short?)", transient=True) from exc
            if not isinstance(body, dict):
                self.api.mark("error", "answer is not a JSON object")
                raise SourceError("bad_answer", "Commons answered JSON that is not an object", transient=True)
            error = body.get("error")
            if not isinstance(error, Mapping):
                return body
            code, info = str(error.get("code") or "unknown"), str(error.get("info") or "")[:200]
            if code == "maxlag":
                self.api.mark("rate_limited", f"maxlag: {info}")
                if attempt >= MAXLAG_RETRIES:
                    raise SourceError("maxlag", f"Commons is lagged ({info}); trying again next cycle", transient=True)
                wait = parse_retry_after(resp.headers.get("Retry-After"))
                self.api.wait(self.api.backoff_for(attempt, wait if wait is not None else MAXLAG), "maxlag")
                continue
            self.api.mark("error", f"API error {code}")
            raise SourceError("commons_api_error", f"Commons API error {code}: {info}")
        raise SourceError("maxlag", "Commons stayed lagged", transient=True)  # pragma: no cover

    def _info_params(self) -> dict[str, Any]:
        return {
            "prop": "imageinfo",
            "iiprop": "timestamp|url|size|mime|extmetadata",
            "iiextmetadatafilter": EXTMETADATA,
            # The most common step (a 3:2 landscape): most files need no second request.
            "iiurlwidth": thumb_step(3000, 2000, self.min_long, self.min_short) or THUMB_STEPS[-1],
        }

    @staticmethod
    def _thumb_of(info: Mapping[str, Any]) -> tuple[str, int, int] | None:
        url, w, h = info.get("thumburl"), info.get("thumbwidth"), info.get("thumbheight")
        if isinstance(url, str) and isinstance(w, int) and isinstance(h, int):
            return url, w, h
        return None

    def _apply_pages(self, pages: Any, by_id: Mapping[int, Entry], width: int | None) -> None:
        """Copy imageinfo of ``query.pages`` onto the entries (and the thumb if ``width`` was asked)."""
        for page in pages if isinstance(pages, list) else []:
            if not isinstance(page, Mapping) or page.get("pageid") not in by_id:
                continue
            e = by_id[page["pageid"]]
            infos = page.get("imageinfo")
            info = infos[0] if isinstance(infos, list) and infos and isinstance(infos[0], dict) else None
            if info is None:
                e.missing = True
                continue
            if width is None or e.info is None:
                e.info = info
            thumb = self._thumb_of(info)
            if thumb is not None and width is not None:
                e.thumb = thumb

    def _page(self, listing: str, start: str | None, cont: Mapping[str, Any] | None, n: int, newest_first: bool = False) -> tuple[list[Entry], dict[str, Any] | None]:
        """One listing page: its file entries (oldest first unless ``newest_first``) and the next ``continue``."""
        category = category_of(listing)
        direction = "older" if newest_first else "newer"
        if category is not None:
            params: dict[str, Any] = {
                "list": "categorymembers", "cmtitle": category, "cmnamespace": FILE_NS, "cmsort": "timestamp",
                "cmdir": direction, "cmprop": "ids|title|timestamp", "cmlimit": n,
            }
            if start:
                params["cmstart"] = start
        else:
            params = {"generator": "allimages", "gaisort": "timestamp", "gaidir": direction, "gailimit": n, **self._info_params()}
            if start:
                params["gaistart"] = start
        body = self.query({**params, **(cont or {})})
        q = body.get("query") if isinstance(body.get("query"), Mapping) else {}
        entries: list[Entry] = []
        if category is not None:
            for m in q.get("categorymembers") or []:
                if isinstance(m, Mapping) and m.get("ns") == FILE_NS and isinstance(m.get("pageid"), int):
                    entries.append(Entry(m["pageid"], str(m.get("title") or ""), str(m.get("timestamp") or "")))
        else:
            width = params["iiurlwidth"]
            by_id: dict[int, Entry] = {}
            for page in q.get("pages") or []:
                if isinstance(page, Mapping) and page.get("ns") == FILE_NS and isinstance(page.get("pageid"), int):
                    by_id[page["pageid"]] = Entry(page["pageid"], str(page.get("title") or ""), "")
            self._apply_pages(q.get("pages"), by_id, width)
            for e in by_id.values():
                e.timestamp = str((e.info or {}).get("timestamp") or "")
            # A generator's pages come in page-id order: put them back in time order.
            entries = sorted(by_id.values(), key=lambda e: e.timestamp, reverse=newest_first)
        nxt = body.get("continue")
        return entries, (dict(nxt) if isinstance(nxt, Mapping) and nxt else None)

    def _fill(self, entries: list[Entry]) -> None:
        """imageinfo for entries that lack it, then the thumbnails whose width differs from the default."""
        width = self._info_params()["iiurlwidth"]
        todo = [e for e in entries if e.info is None and not e.missing]
        for i in range(0, len(todo), PAGE_MAX):
            chunk = todo[i : i + PAGE_MAX]
            body = self.query({**self._info_params(), "pageids": "|".join(str(e.pageid) for e in chunk)})
            self._apply_pages((body.get("query") or {}).get("pages"), {e.pageid: e for e in chunk}, width)
        groups: dict[int, list[Entry]] = {}
        for e in entries:
            step = self._step(e)
            if step is not None and step != width:
                groups.setdefault(step, []).append(e)
        for step, group in sorted(groups.items()):
            for i in range(0, len(group), PAGE_MAX):
                chunk = group[i : i + PAGE_MAX]
                body = self.query({"prop": "imageinfo", "iiprop": "url", "iiurlwidth": step,
                                   "pageids": "|".join(str(e.pageid) for e in chunk)})
                for e in chunk:
                    e.thumb = None  # the default-width thumb is the wrong size for this one
                self._apply_pages((body.get("query") or {}).get("pages"), {e.pageid: e for e in chunk}, step)

    def _step(self, e: Entry) -> int | None:
        info = e.info or {}
        w, h = info.get("width"), info.get("height")
        if e.missing or info.get("mime") not in PHOTO_MIMES or not isinstance(w, int) or not isinstance(h, int) or w <= 0 or h <= 0:
            return None
        return thumb_step(w, h, self.min_long, self.min_short)

    # --- candidates ---------------------------------------------------------------------------------
    def candidate(self, e: Entry, listing: str) -> Candidate:
        """The post for one file: the thumbnail or original to fetch, licence and attribution in ``extra``."""
        info = e.info or {}
        ext = info.get("extmetadata")
        name = e.title.split(":", 1)[-1]
        desc_url = str(info.get("descriptionurl") or "")
        extra: dict[str, Any] = {"commons_listing": listing, "commons_title": e.title}
        for key, field_ in (("license", "LicenseShortName"), ("license_url", "LicenseUrl"), ("artist", "Artist"), ("credit", "Credit")):
            text = plain_text(_meta(ext, field_))
            if text:
                extra[key] = text
        if desc_url:
            extra["description_url"] = desc_url
            extra["page_url"] = desc_url  # the page the gallery credits (ingest's source_url)
        post = Candidate(
            source=NAME, post_id=e.post_id, url=desc_url, title=plain_text(_meta(ext, "ObjectName")) or name.rsplit(".", 1)[0],
            author=extra.get("artist", ""), permalink=desc_url, domain="commons.wikimedia.org",
            created_utc=epoch(e.timestamp), extra=extra,
        )
        if e.missing or not info:
            post.removed = True  # deleted between the listing and the imageinfo request
            return post
        mime = str(info.get("mime") or "")
        w, h, size = info.get("width"), info.get("height"), info.get("size")
        if mime.startswith("video/") or mime.startswith("audio/"):
            post.is_video = True
            return post
        if mime == "image/gif":
            post.links = [Link(str(info.get("url") or ""), w, h, animated=True)]
            return post
        if mime not in PHOTO_MIMES or not isinstance(w, int) or not isinstance(h, int):
            return post  # SVG, TIFF, PDF, …: no links, so the post rules say no_image
        step = self._step(e)
        if step is not None and e.thumb is not None:
            url, tw, th = e.thumb
            post.links = [Link(url, tw, th, meta={"commons_thumb_width": tw, "original_width": w, "original_height": h})]
        else:
            # The original: too small anyway (the size rule rejects it unfetched), or no step below its
            # width is big enough, so it is at most one step wide (<= 3840 px with the default rules) and
            # the downloader's byte and pixel caps still apply to it.
            post.links = [Link(str(info.get("url") or ""), w, h, meta={"original_bytes": size})]
        return post

    def _candidates(self, entries: list[Entry], listing: str, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        fresh = [e for e in entries if not is_seen(e.post_id)]
        if fresh:
            self._fill(fresh)
        for e in fresh:
            yield self.candidate(e, listing)

    # --- polling ---------------------------------------------------------------------------------------
    def poll(self, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        """New files of every listing, at most ``limit`` per listing; cursors advance after each page's posts."""
        yield from each_listing(NAME, self.listings, lambda listing: self._poll_listing(listing, cursors, is_seen))

    def _poll_listing(self, listing: str, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        k_start, k_cont, k_newest = f"{listing}:start", f"{listing}:continue", f"{listing}:newest"
        start = cursors.get(k_start) or ""
        if not start:
            # Fixed before the first request: a continue token only makes sense with the same start.
            back = min(self.lookback, UPLOADS_LOOKBACK_MAX) if category_of(listing) is None else self.lookback
            start = iso(self.clock() - back)
            cursors.set(k_start, start)
        budget = self.limit
        for _ in range(PAGES_PER_POLL):
            if budget <= 0:
                return
            cont = _load_continue(cursors.get(k_cont))
            entries, nxt = self._page(listing, start, cont, min(budget, PAGE_MAX))
            budget -= max(1, len(entries))
            yield from self._candidates(entries, listing, is_seen)
            # Every post of the page is recorded now: move past it.
            newest = max([cursors.get(k_newest) or "", start, *(e.timestamp for e in entries)])
            cursors.set(k_newest, newest)
            if nxt is not None:
                cursors.set(k_cont, json.dumps(nxt, sort_keys=True))
                continue
            cursors.set(k_start, newest)  # caught up: the next pass starts at the newest file seen
            cursors.set(k_cont, "")
            return

    def newest(self, listing: str, limit: int) -> Iterator[Candidate]:
        """The ``limit`` newest files of a listing, newest first, without cursors (the taste bootstrap)."""
        cont: dict[str, Any] | None = None
        left = max(0, limit)
        for _ in range(max(1, math.ceil(left / PAGE_MAX)) + PAGES_PER_POLL):
            if left <= 0:
                return
            entries, cont = self._page(listing, None, cont, min(left, PAGE_MAX), newest_first=True)
            entries = entries[:left]
            left -= len(entries)
            yield from self._candidates(entries, listing, lambda _pid: False)
            if cont is None:
                return


def _load_continue(raw: str | None) -> dict[str, Any] | None:
    """A stored ``continue`` object; an unreadable one restarts the pass from its start."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else None


# --- the registry's module interface ------------------------------------------------------------------


def non_negative(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_flags(flags: Any) -> None:
    """``--commons-…`` flags (env ``NOMAD_COMMONS_…``); the contact comes from ``NOMAD_CONTACT``."""
    flags.add("--commons-api-url", default=DEFAULT_API,
              help=f"Wikimedia Commons Action API (the commons source needs {CONTACT_ENV}: an e-mail address or URL for the User-Agent)")
    flags.add("--commons-listing", type=parse_listing, many=True, default=list(DEFAULT_LISTINGS),
              help="Commons listing, repeatable: featured (Featured pictures), quality (Quality images), uploads (new uploads), category:<Name>")
    flags.add("--commons-limit", type=positive(int), default=50, help="files read per Commons listing and cycle")
    flags.add("--commons-interval", type=non_negative, default=1.0, help="seconds between two Commons API requests (they are serial)")
    flags.add("--commons-lookback", type=positive(float), default=24.0,
              help="hours back a Commons listing starts from on its first poll (uploads: at most 1)")


def available(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """Commons needs nothing but a contact for the User-Agent."""
    return bool((environ.get(CONTACT_ENV) or "").strip())


def credentials(environ: Mapping[str, str]) -> str:
    """What ``nomad sources`` shows: no key, only the contact Wikimedia requires."""
    contact = (environ.get(CONTACT_ENV) or "").strip()
    return f"none (contact {contact})" if contact else f"none, but {CONTACT_ENV} is unset"


def _listings(args: argparse.Namespace) -> list[str]:
    given = getattr(args, "commons_listing", None)
    values = list(given) if given else list(getattr(args, "commons_listing_default", None) or DEFAULT_LISTINGS)
    return list(dict.fromkeys(values))  # order kept, duplicates dropped


def build(args: argparse.Namespace, ctx: SourceContext) -> CommonsSource:
    """The source from parsed flags; SourceConfigError (one sentence) without ``NOMAD_CONTACT``."""
    contact = check_contact(ctx.environ.get(CONTACT_ENV))
    api = SiteApi(
        ctx.http, NAME,
        min_interval=getattr(args, "commons_interval", 1.0),
        headers={"User-Agent": user_agent(contact)},
        sleep=ctx.sleep,
        on_status=ctx.on_status,
    )
    return CommonsSource(
        api,
        api_url=getattr(args, "commons_api_url", DEFAULT_API),
        listings=_listings(args),
        limit=getattr(args, "commons_limit", 50),
        lookback=getattr(args, "commons_lookback", 24.0) * 3600.0,
        min_long=getattr(args, "min_long_side", 1280),
        min_short=getattr(args, "min_short_side", 1024),
    )
