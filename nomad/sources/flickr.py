"""flickr: the link expander (photo pages, ``flic.kr/p/`` short links, ``staticflickr.com`` files)
and the ``flickr`` listing source (the key-less public feed, see ``flickr_feed``).

With an API key (``FLICKR_API_KEY``) ``flickr.photos.getSizes`` picks the
largest size whose ``media`` is ``photo`` and ``flickr.photos.getInfo``
records the licence and the photo page (kept for attribution). Without a key
only direct static files can be fetched, as they are.

The listing source's rules are its own: the feed opens at most the 1024 px
``_b`` size, so by default it accepts a long side of 1024 and a short side of
576 (16:9 at 1024) instead of the global 1280x1024 (``--flickr-min-long-side``,
``--flickr-min-short-side``).
"""
from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from nomad.http import HttpClient

from .api import request_json
from .base import ImageRef, Link, SourceError, UrlTarget, host_matches, url_parts

DEFAULT_API = "https://api.flickr.com/services/rest"
BASE58 = "123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"

LICENSES = {
    "0": "All Rights Reserved",
    "1": "CC BY-NC-SA 2.0",
    "2": "CC BY-NC 2.0",
    "3": "CC BY-NC-ND 2.0",
    "4": "CC BY 2.0",
    "5": "CC BY-SA 2.0",
    "6": "CC BY-ND 2.0",
    "7": "No known copyright restrictions",
    "8": "United States Government Work",
    "9": "CC0 1.0",
    "10": "Public Domain Mark 1.0",
    "11": "CC BY 4.0",
    "12": "CC BY-SA 4.0",
    "13": "CC BY-ND 4.0",
    "14": "CC BY-NC 4.0",
    "15": "CC BY-NC-SA 4.0",
    "16": "CC BY-NC-ND 4.0",
}
"""flickr's licence ids (``flickr.photos.licenses.getInfo``) by name."""

_STATIC = re.compile(r"^/(?:\d+/)*(\d+)_([0-9a-f]+)(?:_([a-z0-9]+))?\.(jpg|jpeg|png|gif)$", re.I)

# flickr error codes that mean the photo itself is gone or private: a final rejection.
_GONE = {1, 2}


def base58_decode(text: str) -> int:
    """flic.kr short id -> numeric photo id."""
    value = 0
    for ch in text:
        idx = BASE58.find(ch)
        if idx < 0:
            raise ValueError(f"not a flic.kr id: {text!r}")
        value = value * 58 + idx
    return value


FlickrTarget = UrlTarget
"""What a flickr URL names: ``kind`` is page | static, ``id`` the photo id."""


def parse_url(url: str) -> FlickrTarget | None:
    """Classify a flickr URL; None when it names no single photo."""
    split = url_parts(url)
    if split is None:
        return None
    host, segments, path = split
    if host_matches(host, "flic.kr"):
        if len(segments) >= 2 and segments[0] == "p":
            try:
                return FlickrTarget("page", str(base58_decode(segments[1])))
            except ValueError:
                return None
        return None
    if host_matches(host, "staticflickr.com"):
        m = _STATIC.match(path)
        return FlickrTarget("static", m.group(1)) if m else None
    if host_matches(host, "flickr.com"):
        if len(segments) >= 3 and segments[0] == "photos" and segments[2].isdigit():
            return FlickrTarget("page", segments[2], user=segments[1])
    return None


def largest_photo(sizes: Any) -> Mapping[str, Any] | None:
    """The largest ``media == "photo"`` entry of a getSizes reply (by pixel count, not order)."""
    try:
        entries = sizes["sizes"]["size"]
    except (KeyError, TypeError):
        return None
    best, best_area = None, -1
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, Mapping) or e.get("media") != "photo" or not e.get("source"):
            continue
        try:
            area = int(e.get("width") or 0) * int(e.get("height") or 0)
        except (TypeError, ValueError):
            continue
        if area >= best_area:
            best, best_area = e, area
    return best


class FlickrClient:
    """flickr REST reader (``format=json&nojsoncallback=1``)."""

    def __init__(self, http: HttpClient, *, api_url: str = DEFAULT_API, api_key: str | None = None) -> None:
        self.http = http
        # A bare base URL (a mirror, the test emulator) gets flickr's REST path appended.
        parts = urlsplit(api_url)
        self.api_url = api_url.rstrip("/") + "/services/rest" if parts.path in ("", "/") else api_url
        self.api_key = api_key

    def call(self, method: str, **params: Any) -> Mapping[str, Any]:
        """One REST call; ``stat: fail`` replies become SourceErrors with flickr's message."""
        if not self.api_key:
            raise SourceError("flickr_no_api_key", "flickr pages need FLICKR_API_KEY")
        query = {"method": method, "api_key": self.api_key, "format": "json", "nojsoncallback": 1, **params}
        body = request_json(self.http, "GET", self.api_url, site="flickr", what="flickr API", params=query,
                            headers={"Accept": "application/json"})
        if not isinstance(body, Mapping):
            raise SourceError("flickr_bad_reply", "flickr API reply is not an object", transient=True)
        if body.get("stat") != "ok":
            code = body.get("code")
            message = str(body.get("message") or "unknown error")
            if code in _GONE:
                raise SourceError("not_found", f"flickr: {message}")
            raise SourceError("flickr_api_error", f"flickr error {code}: {message}", transient=True)
        return body

    def info(self, photo_id: str) -> dict[str, Any]:
        """Licence, owner and page link of a photo; empty when getInfo fails (attribution is best effort)."""
        try:
            body = self.call("flickr.photos.getInfo", photo_id=photo_id)
        except SourceError:
            return {}
        photo = body.get("photo") if isinstance(body.get("photo"), Mapping) else {}
        out: dict[str, Any] = {}
        lic = photo.get("license")
        if lic is not None:
            out["license_id"] = str(lic)
            out["license"] = LICENSES.get(str(lic), f"flickr licence {lic}")
        owner = photo.get("owner") if isinstance(photo.get("owner"), Mapping) else {}
        if owner.get("username"):
            out["flickr_owner"] = str(owner["username"])
        try:
            for u in photo["urls"]["url"]:
                if u.get("type") == "photopage" and u.get("_content"):
                    out["page_url"] = str(u["_content"])
        except (KeyError, TypeError, AttributeError):
            pass
        return out

    def expand(self, link: Link, key_prefix: str, start: int = 0) -> list[ImageRef]:
        """The largest photo behind a flickr link, with licence and page link when known."""
        target = parse_url(link.url)
        if target is None:
            raise SourceError("unsupported_link", f"not a flickr photo: {link.url}")
        key = f"{key_prefix}:{start}"
        meta = {**link.meta, "flickr_id": target.id}
        if target.kind == "page":
            meta["page_url"] = link.url
        if target.kind == "static" and not self.api_key:
            return [ImageRef(key, link.url, link.width, link.height, site="flickr", meta=meta)]
        sizes = self.call("flickr.photos.getSizes", photo_id=target.id)
        best = largest_photo(sizes)
        if best is None:
            raise SourceError("no_photo_size", f"flickr photo {target.id} has no photo size")
        meta.update(self.info(target.id))
        return [
            ImageRef(
                key,
                str(best["source"]),
                int(best.get("width") or 0) or None,
                int(best.get("height") or 0) or None,
                site="flickr",
                meta=meta,
            )
        ]


# --- the ``flickr`` listing source (key-less public feed) ---------------------------------

NAME = "flickr"


def add_flags(flags: Any) -> None:
    """The feed source's flags, ``--flickr-…`` (env ``NOMAD_FLICKR_…``)."""
    from nomad.config import non_negative

    from .flickr_feed import DEFAULT_FEED

    flags.add("--flickr-feed-url", default=DEFAULT_FEED, help="flickr's public photo feed (no API key needed)")
    flags.add("--flickr-tags", many=True, default=[], help="only photos with any of these tags, repeatable; empty: everyone's uploads")
    flags.add("--flickr-feed-interval", type=non_negative(float), default=60.0,
              help="seconds between two requests to the flickr feed")
    flags.add("--flickr-min-long-side", type=int, default=1024,
              help="minimum long side of photos from the flickr feed (its files are 1024 px without an API key)")
    flags.add("--flickr-min-short-side", type=int, default=576,
              help="minimum short side of photos from the flickr feed (576: 16:9 at 1024)")


def available(args: Any, environ: Mapping[str, str]) -> bool:
    """The public feed needs nothing."""
    return True


def credentials(environ: Mapping[str, str]) -> str:
    """Which credentials the source (and the flickr link expander) use, for ``nomad sources``."""
    from nomad.config import secret

    if secret("FLICKR_API_KEY", environ):
        return "FLICKR_API_KEY (largest sizes and licences through the REST API)"
    return "none (public feed, 1024 px files)"


def size_rules(args: Any) -> tuple[int, int]:
    """(min long side, min short side) for images from this source."""
    return args.flickr_min_long_side, args.flickr_min_short_side


def build(args: Any, ctx: Any) -> Any:
    """The feed source from the parsed flags."""
    from nomad.config import many, secret

    from .api import SiteApi
    from .flickr_feed import FlickrFeedSource

    on_wait = getattr(ctx, "on_wait", None)
    api = SiteApi(
        ctx.http, NAME, min_interval=args.flickr_feed_interval, headers={"User-Agent": ctx.user_agent},
        sleep=ctx.sleep, on_status=ctx.on_status, on_wait=(lambda why, s: on_wait(NAME, why, s)) if on_wait else None,
    )
    return FlickrFeedSource(api, args.flickr_feed_url, tags=many(args, "flickr_tags"),
                            keyed=bool(secret("FLICKR_API_KEY", ctx.environ)))
