"""The key-less formats: reddit's Atom feeds, reddit's JSON block page, flickr's public feed.

Served under the real host names (routed from ``server.Handler._route``):

- ``GET www.reddit.com/r/<subs>/<sort>/.rss`` (also ``/<sort>.rss``, ``?limit=`` <= 100):
  an Atom feed of the scenario's posts, removed posts left out, each entry's
  ``<content type="html">`` holding the escaped HTML with ``<a href="URL">[link]</a>``
  (URLs HTML-escaped inside HTML inside XML, as reddit does). ``scenario.reddit_feed_interval``
  > 0 throttles like reddit (429 + ``Retry-After`` when asked sooner).
  Hostile subreddits: ``r/entitybomb`` (billion laughs), ``r/xxe`` (external entity),
  ``r/truncated`` (the feed cut in the middle).
- anonymous ``GET www.reddit.com/r/…/….json``: 403, HTML "whoa there, pardner!",
  ``Server: snooserv`` (reddit since 2026-05-29), unless ``scenario.reddit_anonymous_json``.
- ``GET api.flickr.com/services/feeds/photos_public.gne``: the 20 newest of
  ``scenario.flickr_feed`` (``tags=`` filters, ``tagmode`` any|all), ``'`` escaped as
  ``\\'`` and ``/`` as ``\\/`` like flickr; ``jsonFlickrFeed(...)`` unless ``nojsoncallback=1``;
  ``tags=truncated`` answers a cut-off document.
"""
from __future__ import annotations

import html
import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

from .scenario import FlickrPhoto, Resource, Scenario

if TYPE_CHECKING:
    from .server import Handler

BLOCK_PAGE = b"""<!doctype html><html><head><title>Blocked</title></head><body>
<h1>whoa there, pardner!</h1>
<p>Your request has been blocked due to a network policy.</p>
<p>Try logging in or creating an account here to get back to browsing.</p>
<p>If you're running a script or application, please register or sign in with your developer credentials here.</p>
</body></html>"""

ENTITY_BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE feed [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
]>
<feed xmlns="http://www.w3.org/2005/Atom"><title>&f;</title><entry><id>t3_bomb01</id><title>&f;</title></entry></feed>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE feed [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<feed xmlns="http://www.w3.org/2005/Atom"><entry><id>t3_xxe001</id><title>&xxe;</title></entry></feed>"""


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


# -- reddit Atom --------------------------------------------------------------------------

def atom_entry(post: dict[str, Any]) -> str:
    """One ``<entry>`` shaped like reddit's for a scenario post (a t3 ``data`` dict)."""
    sub, author, title = post.get("subreddit", ""), post.get("author", ""), post.get("title", "")
    permalink = "https://www.reddit.com" + post["permalink"]
    url = post.get("url_overridden_by_dest") or post.get("url") or permalink
    thumb = ""
    try:
        thumb = post["preview"]["images"][0]["source"]["url"]
    except (KeyError, IndexError, TypeError):
        pass
    a = lambda u: html.escape(u, quote=True)  # noqa: E731 - attribute values inside the HTML
    img = f'<a href="{a(permalink)}"> <img src="{a(thumb)}" alt="{a(title)}" title="{a(title)}" /> </a>' if thumb else ""
    content = (
        f"<table> <tr><td> {img} </td><td> &#32; submitted by &#32; "
        f'<a href="https://www.reddit.com/user/{a(author)}"> /u/{html.escape(author)} </a> &#32; to &#32; '
        f'<a href="https://www.reddit.com/r/{a(sub)}/"> r/{html.escape(sub)} </a> <br/> '
        f'<span><a href="{a(url)}">[link]</a></span> &#32; <span><a href="{a(permalink)}">[comments]</a></span> </td></tr></table>'
    )
    thumb_el = f"<media:thumbnail url={quoteattr(thumb)} />" if thumb else ""
    when = _iso(float(post.get("created_utc") or 0))
    return (
        f"<entry><author><name>/u/{escape(author)}</name><uri>https://www.reddit.com/user/{escape(author)}</uri></author>"
        f"<category term={quoteattr(sub)} label={quoteattr('r/' + sub)}/>"
        f'<content type="html">{escape(content, {chr(34): "&quot;"})}</content><id>{escape(post["name"])}</id>{thumb_el}'
        f"<link href={quoteattr(permalink)} /><updated>{when}</updated><published>{when}</published>"
        f"<title>{escape(title)}</title></entry>"
    )


def atom_feed(scn: Scenario, subs: set[str], sort: str, limit: int) -> bytes:
    """The feed document: the scenario's posts of ``subs`` (``all``: every one), removed ones left out."""
    posts = [p for p in scn.posts if not p.get("removed_by_category")
             and ("all" in subs or str(p.get("subreddit", "")).lower() in subs)][:limit]
    label = "+".join(sorted(subs))
    head = (
        '<?xml version="1.0" encoding="UTF-8"?><feed xmlns="http://www.w3.org/2005/Atom" '
        'xmlns:media="http://search.yahoo.com/mrss/">'
        f'<category term="{escape(label)}" label="r/{escape(label)}"/><updated>{_iso(time.time())}</updated>'
        f"<id>/r/{escape(label)}/{escape(sort)}/.rss</id>"
        f'<link rel="self" href="https://www.reddit.com/r/{escape(label)}/{escape(sort)}/.rss" type="application/atom+xml" />'
        f"<title>{escape(sort)} submissions : {escape(label)}</title>"
    )
    return (head + "".join(atom_entry(p) for p in posts) + "</feed>").encode()


def _reddit_feed(h: "Handler") -> None:
    scn = h.emu.scenario
    interval = float(getattr(scn, "reddit_feed_interval", 0.0) or 0.0)
    if interval > 0:
        now = time.monotonic()
        last = getattr(h.emu, "_feed_last", None)
        if last is not None and now - last < interval:
            wait = max(1, int(interval - (now - last) + 0.999))
            return h._send(429, b"<html><body>Too Many Requests</body></html>", "text/html", {"Retry-After": str(wait)})
        h.emu._feed_last = now  # type: ignore[attr-defined]
    segs = [s for s in h.route.split("/") if s]
    # /r/<subs>/<sort>/.rss or /r/<subs>/<sort>.rss or /r/<subs>/.rss
    if segs and segs[-1] == ".rss":
        segs = segs[:-1]
    elif segs:
        segs[-1] = segs[-1].removesuffix(".rss")
    if len(segs) < 2 or segs[0] != "r":
        return h._send(404, b"<html><body>404</body></html>", "text/html")
    subs = {x.lower() for x in segs[1].split("+")}
    sort = segs[2] if len(segs) >= 3 else "hot"
    if "entitybomb" in subs:
        return h._send(200, ENTITY_BOMB, "application/atom+xml; charset=UTF-8")
    if "xxe" in subs:
        return h._send(200, EXTERNAL_ENTITY, "application/atom+xml; charset=UTF-8")
    try:
        limit = max(1, min(100, int(h._q("limit", "25") or 25)))
    except ValueError:
        limit = 25
    body = atom_feed(scn, subs, sort, limit)
    if "truncated" in subs:
        body = atom_feed(scn, {"all"}, sort, limit)
        body = body[: len(body) // 2]
    h._send(200, body, "application/atom+xml; charset=UTF-8")


def _block_page(h: "Handler") -> None:
    h.version_string = lambda: "snooserv"  # type: ignore[method-assign]  # the Server header of reddit's block page
    try:
        h._send(403, BLOCK_PAGE, "text/html; charset=utf-8")
    finally:
        del h.version_string  # the handler serves the connection's next request too


# -- flickr public feed -------------------------------------------------------------------

def feed_item(scn: Scenario, photo: FlickrPhoto, tags: str, published: float) -> dict[str, Any]:
    """One ``items[]`` entry of photos_public.gne for ``photo``."""
    page = f"https://www.flickr.com/photos/{photo.owner}/{photo.id}/"
    m_url = scn.flickr_static_url(photo, "m")
    scale = 240 / max(photo.width, photo.height)
    w, h = round(photo.width * scale), round(photo.height * scale)
    t = html.escape(photo.title, quote=True)
    return {
        "title": photo.title,
        "link": page,
        "media": {"m": m_url},
        "date_taken": _iso(published - 3600),
        "description": f' <p><a href="https://www.flickr.com/people/{photo.owner}/">{photo.owner}</a> posted a photo:</p> '
                       f'<p><a href="{page}" title="{t}"><img src="{m_url}" width="{w}" height="{h}" alt="{t}" /></a></p> ',
        "published": _iso(published).replace("+00:00", "Z"),
        "author": f'nobody@flickr.com ("{photo.owner}")',
        "author_id": f"{int(photo.id) % 10**8}@N00",
        "tags": tags,
    }


def flickr_feed_text(scn: Scenario, tags: list[str], tagmode: str = "all", wrapped: bool = False) -> str:
    """The feed document as flickr writes it (``\\'`` and ``\\/`` escapes, optional ``jsonFlickrFeed(...)``)."""
    items = []
    for n, (photo, photo_tags) in enumerate(scn.flickr_feed):
        have = set(photo_tags.split())
        if tags and not (have & set(tags) if tagmode == "any" else set(tags) <= have):
            continue
        items.append(feed_item(scn, photo, photo_tags, 1_717_171_000.0 - 60 * n))
    doc = {"title": "Uploads from everyone", "link": "https://www.flickr.com/photos/", "description": "",
           "modified": _iso(1_717_171_000.0).replace("+00:00", "Z"), "generator": "https://www.flickr.com",
           "items": items[:20]}
    # json.dumps never writes ' escaped, so every ' here sits inside a string: flickr's \' is safe to add.
    text = json.dumps(doc, indent=1).replace("/", "\\/").replace("'", "\\'")
    return f"jsonFlickrFeed({text})" if wrapped else text


def _flickr_feed(h: "Handler") -> None:
    tags = [t.strip().lower() for t in h._q("tags").split(",") if t.strip()]
    if "truncated" in tags:
        text = flickr_feed_text(h.emu.scenario, [])
        return h._send(200, text[: len(text) // 2].encode(), "application/json; charset=utf-8")
    wrapped = h._q("nojsoncallback") != "1"
    text = flickr_feed_text(h.emu.scenario, tags, h._q("tagmode", "all"), wrapped)
    h._send(200, text.encode(), ("application/javascript" if wrapped else "application/json") + "; charset=utf-8")


def add_feed_photo(scn: Scenario, photo: FlickrPhoto, tags: str = "", expected: str | None = None) -> None:
    """A photo in the public feed: REST answers and static files (``_m`` included), newest first."""
    scn.add_flickr_photo(photo)
    scale = 240 / max(photo.width, photo.height)
    scn.add_image("live.staticflickr.com", scn._flickr_path(photo, "m"), round(photo.width * scale),
                  round(photo.height * scale), "jpeg", int(photo.id) & 0xFFFF)
    scn.flickr_feed.append((photo, tags))
    if expected is not None:
        scn.flickr_feed_expected[f"flickr_{photo.id}"] = expected


def add_default_feed(scn: Scenario) -> None:
    """The default scenario's flickr feed: what the 1024 px rules keep and refuse, and ' in titles."""
    add_feed_photo(scn, FlickrPhoto("53800000001", "dave_photos", 2048, 1365, secret="b1c2d3e4f5",
                                    title="Dave's lake at dawn"), "lake dawn", "accept_candidate")
    add_feed_photo(scn, FlickrPhoto("53800000002", "pano_pete", 4000, 1000, secret="c2d3e4f5a6",
                                    title="Pete's panorama"), "panorama", "skip_aspect")
    add_feed_photo(scn, FlickrPhoto("53800000003", "tall_tina", 1365, 2048, secret="d3e4f5a6b7",
                                    title="Tina's \"tall\" one \\ with a backslash"), "portrait lake", "accept_candidate")
    add_feed_photo(scn, FlickrPhoto("53800000004", "wide_wendy", 2400, 1000, secret="e4f5a6b7c8",
                                    title="Wendy's strip"), "strip", "skip_small")


# -- routing ------------------------------------------------------------------------------

def route(h: "Handler") -> bool:
    """Serve the request if it is one of this module's; False to let the server route it."""
    host, path = h.host, h.route
    if host in ("www.reddit.com", "reddit.com", "old.reddit.com") and path.startswith("/r/"):
        if path.endswith(".rss"):
            _reddit_feed(h)
            return True
        if path.endswith(".json") and not getattr(h.emu.scenario, "reddit_anonymous_json", False):
            _block_page(h)
            return True
    if host == "api.flickr.com" and path == "/services/feeds/photos_public.gne":
        _flickr_feed(h)
        return True
    return False


__all__ = ["route", "atom_feed", "flickr_feed_text", "add_feed_photo", "add_default_feed", "BLOCK_PAGE", "Resource"]
