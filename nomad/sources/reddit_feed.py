"""reddit's Atom feeds (``/r/<sub>/new/.rss``): the listing that still answers without an account.

Since 2026-05-29 every anonymous ``*.json`` on reddit answers 403 with an HTML
block page; the Atom feeds still answer (throttled to about one request per
minute per IP). An entry carries the post's fullname (``<id>t3_…</id>``), its
subreddit (``<category term=…>``), title, permalink, ``<published>``, an
optional 640 px ``<media:thumbnail>`` and ``<content type="html">`` whose HTML
holds ``<a href="URL">[link]</a>``: the post's media (for image posts the
full-size ``i.redd.it`` / ``i.imgur.com`` / ``flic.kr`` URL).

What the feed does not say: width/height (sizes are checked after decoding),
``over_18`` (NSFW posts are not recognisable here: ``--deny-subreddit`` and
anti_sus are the guard), spoilers and gallery items (a gallery post is
recorded as ``no_media``).

The XML is parsed with defusedxml and DTDs refused outright, so an entity
bomb or an external entity is a rejected feed, never an expanded one.
"""
from __future__ import annotations

import re
from datetime import datetime
from html.parser import HTMLParser
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree as SafeET

from .base import Candidate, Link, SourceError, extension_of, host_matches, host_of, is_http_url, site_of

ATOM = "{http://www.w3.org/2005/Atom}"
MEDIA = "{http://search.yahoo.com/mrss/}"
_FULLNAME = re.compile(r"^t3_[0-9a-z]{1,16}$")

BLOCK_MARKERS = ("whoa there, pardner", "your request has been blocked")
"""Phrases of reddit's HTML block page (served with 403 and ``Server: snooserv``)."""


class _LinkFinder(HTMLParser):
    """Collects the href of the ``<a>`` whose text is ``[link]`` (attribute values come unescaped)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._href: str | None = None
        self._text: list[str] = []
        self.link: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            if "".join(self._text).strip() == "[link]" and self.link is None:
                self.link = self._href
            self._href = None


def link_of(content_html: str) -> str:
    """The ``[link]`` URL of an entry's HTML content ('' when there is none)."""
    finder = _LinkFinder()
    try:
        finder.feed(content_html)
        finder.close()
    except (ValueError, AssertionError):  # HTMLParser is lenient; be safe on odd input anyway
        return ""
    return (finder.link or "").strip()


def _text(el: Element | None) -> str:
    return (el.text or "").strip() if el is not None else ""


def _time(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None
    except ValueError:
        return None


def _links(url: str) -> tuple[list[Link], bool, bool]:
    """(links, is_gallery, is_video) of a post whose media is ``url``."""
    if not is_http_url(url):
        return [], False, False
    host = host_of(url)
    if host_matches(host, "reddit.com") and "/gallery/" in url:
        return [], True, False  # the feed lists no gallery items: nothing to fetch
    site = site_of(url)
    if site == "video":
        return [Link(url=url, media="video")], False, host_matches(host, "v.redd.it")
    if site == "unsupported":
        return [], False, False  # a self post, an article, a permalink of a crosspost
    return [Link(url=url, animated=extension_of(url) in (".gif", ".gifv"))], False, False


def parse_entry(entry: Element) -> Candidate | None:
    """One Atom ``<entry>`` as a :class:`Candidate`; None when it is not a post (no ``t3_`` id)."""
    post_id = _text(entry.find(f"{ATOM}id"))
    if not _FULLNAME.match(post_id):
        return None
    category = entry.find(f"{ATOM}category")
    subreddit = (category.get("term") or "") if category is not None else ""
    link_el = entry.find(f"{ATOM}link")
    permalink = (link_el.get("href") or "") if link_el is not None else ""
    author = _text(entry.find(f"{ATOM}author/{ATOM}name")).removeprefix("/u/")
    content = entry.find(f"{ATOM}content")
    url = link_of(content.text or "") if content is not None else ""
    thumb = entry.find(f"{MEDIA}thumbnail")
    links, is_gallery, is_video = _links(url)
    extra: dict[str, Any] = {}
    if thumb is not None and thumb.get("url"):
        extra["thumbnail_url"] = thumb.get("url")
    return Candidate(
        source="reddit",
        post_id=post_id,
        url=url,
        title=_text(entry.find(f"{ATOM}title")),
        author=author,
        subreddit=subreddit,
        permalink=permalink,
        domain=host_of(url),
        created_utc=_time(_text(entry.find(f"{ATOM}published"))),
        is_video=is_video,
        is_gallery=is_gallery,
        links=links,
        extra=extra,
    )


def parse_feed(body: bytes) -> list[Candidate]:
    """Posts of one Atom feed, newest first as served; hostile or broken XML is a SourceError."""
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise SourceError("hostile_feed", f"reddit feed refused: {type(exc).__name__}", transient=True) from exc
    except (ParseError, ValueError) as exc:
        raise SourceError("bad_feed", f"reddit feed is not well-formed XML: {exc}", transient=True) from exc
    if root.tag != f"{ATOM}feed":
        raise SourceError("bad_feed", f"reddit answered {root.tag!r}, not an Atom feed", transient=True)
    posts = []
    for entry in root.findall(f"{ATOM}entry"):
        post = parse_entry(entry)
        if post is not None:
            posts.append(post)
    return posts


def is_block_page(status: int, headers: Any, body: bytes) -> bool:
    """reddit's anonymous-JSON block: 403, an HTML body with its phrases or ``Server: snooserv``."""
    if status != 403:
        return False
    text = body[:20000].decode("utf-8", "replace").lower()
    server = ""
    try:
        server = str({k.lower(): v for k, v in dict(headers or {}).items()}.get("server", "")).lower()
    except (TypeError, ValueError, AttributeError):
        pass
    return any(m in text for m in BLOCK_MARKERS) or "snooserv" in server
