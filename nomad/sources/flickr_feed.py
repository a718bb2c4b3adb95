"""flickr without an API key: the public photo feed (``photos_public.gne``), 20 newest photos a request.

The feed is *almost* JSON: flickr escapes ``'`` as ``\\'``, which JSON does not
allow, and without ``nojsoncallback=1`` wraps the object in
``jsonFlickrFeed(...)``. :func:`parse_feed_text` accepts both. Each item's
``media.m`` is the 240 px ``_m`` file; the 1024 px ``_b`` file shares its
secret, so the link is rewritten to ``_b``. Larger sizes have secrets of their
own and need the REST API (``FLICKR_API_KEY``: the flickr link expander asks
``getSizes`` for the largest). The feed names no licence: photos from it carry
the photographer and the photo page, and their licence only with a key.
"""
from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from .api import SiteApi
from .base import Candidate, Cursors, Link, ListingSource, SourceError, host_of, is_http_url

log = logging.getLogger(__name__)

NAME = "flickr"
DEFAULT_FEED = "https://api.flickr.com/services/feeds/photos_public.gne"
FEED_PATH = "/services/feeds/photos_public.gne"
FEED_MAX_BYTES = 2 * 1024 * 1024
LARGE_EDGE = 1024
"""Long side of flickr's ``_b`` size, the largest the feed's secret opens."""

_WRAPPED = re.compile(r"^\s*jsonFlickrFeed\s*\((.*)\)\s*;?\s*$", re.S)
_ESCAPE = re.compile(r"\\(.)", re.S)
_STATIC_FILE = re.compile(r"^(\d+)_([0-9a-f]+)(?:_[a-z0-9]{1,2})?\.(jpg|jpeg|png|gif)$", re.I)
_PAGE = re.compile(r"/photos/([^/]+)/(\d+)")
_AUTHOR = re.compile(r'\("(.*)"\)\s*$')
_IMG_SIZE = re.compile(r'width="(\d+)"\s+height="(\d+)"')


def feed_endpoint(url: str) -> str:
    """A bare base URL (a mirror, the test emulator) gets the feed's path appended."""
    parts = urlsplit(url)
    return url.rstrip("/") + FEED_PATH if parts.path in ("", "/") else url


def parse_feed_text(text: str) -> Any:
    """The feed object from flickr's lenient JSON: ``\\'`` escapes and the ``jsonFlickrFeed(...)`` form."""
    m = _WRAPPED.match(text)
    body = m.group(1) if m else text
    # Escapes are read pairwise from the left, so an escaped backslash before a quote stays one.
    body = _ESCAPE.sub(lambda e: "'" if e.group(1) == "'" else e.group(0), body)
    try:
        return json.loads(body, strict=False)  # strict=False: raw control characters in titles
    except ValueError as exc:
        raise SourceError("bad_feed", f"flickr feed is not (lenient) JSON: {exc}", transient=True) from exc


def large_url(media_m: str) -> str:
    """``…/123_abc_m.jpg`` -> ``…/123_abc_b.jpg`` (same secret); '' when it is no static photo file."""
    if not is_http_url(media_m):
        return ""
    parts = urlsplit(media_m)
    head, _, name = parts.path.rpartition("/")
    m = _STATIC_FILE.match(name)
    if not m:
        return ""
    ext = m.group(3).lower()
    return urlunsplit(parts._replace(path=f"{head}/{m.group(1)}_{m.group(2)}_b.{ext}", query="", fragment=""))


def _photo_id(item: Mapping[str, Any], media_m: str) -> str:
    page = _PAGE.search(str(item.get("link") or ""))
    if page:
        return page.group(2)
    m = _STATIC_FILE.match(urlsplit(media_m).path.rpartition("/")[2]) if media_m else None
    return m.group(1) if m else ""


def _large_size(description: str) -> tuple[int | None, int | None]:
    """The ``_b`` size estimated from the ``_m`` thumbnail's size in the description (aspect kept)."""
    m = _IMG_SIZE.search(description or "")
    if not m:
        return None, None
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        return None, None
    scale = LARGE_EDGE / max(w, h)
    return round(w * scale), round(h * scale)


def _time(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else None
    except ValueError:
        return None


def parse_item(item: Any) -> Candidate | None:
    """One feed item as a :class:`Candidate` (``flickr_<id>``); None when it names no photo."""
    if not isinstance(item, Mapping):
        return None
    media = item.get("media") if isinstance(item.get("media"), Mapping) else {}
    media_m = str(media.get("m") or "")
    photo_id = _photo_id(item, media_m)
    url = large_url(media_m)
    if not photo_id or not url:
        return None
    page = str(item.get("link") or "")
    author_m = _AUTHOR.search(str(item.get("author") or ""))
    author = author_m.group(1) if author_m else ""
    width, height = _large_size(str(item.get("description") or ""))
    extra: dict[str, Any] = {"description_url": page, "flickr_id": photo_id}
    if author:
        extra["artist"] = author
        extra["credit"] = f"{author} on flickr"
    if item.get("tags"):
        extra["tags"] = str(item["tags"])[:500]
    return Candidate(
        source=NAME,
        post_id=f"flickr_{photo_id}",
        url=page,
        title=str(item.get("title") or "")[:300],
        author=author,
        permalink=page,
        domain=host_of(url),
        created_utc=_time(item.get("published")),
        links=[Link(url=url, width=width, height=height, meta={"page_url": page, "flickr_id": photo_id})],
        extra=extra,
    )


def parse_feed(text: str) -> list[Candidate]:
    """Photos of one feed answer, newest first as served."""
    obj = parse_feed_text(text)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("items"), list):
        raise SourceError("bad_feed", "flickr feed without items", transient=True)
    return [c for c in (parse_item(i) for i in obj["items"]) if c is not None]


class FlickrFeedSource(ListingSource):
    """The ``flickr`` listing source: one public-feed request a poll, photos as 1024 px ``_b`` links."""

    name = NAME
    needs = "nothing (public feed, 1024 px); FLICKR_API_KEY for the largest size and the licence"

    def __init__(self, api: SiteApi, feed_url: str = DEFAULT_FEED, *, tags: list[str] | None = None,
                 keyed: bool = False) -> None:
        self.api = api
        self.feed_url = feed_endpoint(feed_url)
        self.tags = [t.strip() for t in (tags or []) if t.strip()]
        self.keyed = keyed

    def describe(self) -> str:
        what = f"tags {', '.join(self.tags)}" if self.tags else "everyone's uploads"
        size = "largest size via getSizes (FLICKR_API_KEY)" if self.keyed else "1024 px files (no API key)"
        return f"flickr: public feed, 20 newest photos of {what} every {self.api.min_interval:g}s or more; {size}"

    def ratelimit(self) -> str:
        return f"feed requests={self.api.requests} status={self.api.status.state}"

    def poll(self, cursors: Cursors, is_seen: Callable[[str], bool]) -> Iterator[Candidate]:
        """One feed read, oldest first; the cursor names the newest photo handled."""
        params: dict[str, Any] = {"format": "json", "nojsoncallback": 1}
        if self.tags:
            params["tags"] = ",".join(self.tags)
            params["tagmode"] = "any"
        resp = self.api.get(self.feed_url, params=params, headers={"Accept": "application/json"},
                            max_bytes=FEED_MAX_BYTES)
        posts = parse_feed(resp.body.decode("utf-8", "replace"))
        log.debug("flickr feed: %d photos", len(posts))
        for post in reversed(posts):
            yield post
            cursors.set("newest", post.post_id)
