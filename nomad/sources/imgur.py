"""imgur: direct files, image pages, albums and galleries (API v3 with ``Client-ID``).

Deleted images answer with a redirect to ``i.imgur.com/removed.png``, a small
placeholder; the crawler downloads imgur files with
``nomad.http.reject_removed_placeholder`` as the redirect check, so the
download stops at that hop and the image is recorded as removed, never stored. ``.gifv`` is an
HTML page around a video and animated entries are not photos: both are
marked animated, and the rules skip them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from nomad.http import HttpClient

from .api import request_json
from .base import ImageRef, Link, SourceError, UrlTarget, extension_of, host_matches, url_parts

_ID = re.compile(r"^[A-Za-z0-9]{5,10}$")
DEFAULT_API = "https://api.imgur.com"


ImgurTarget = UrlTarget
"""What an imgur URL names: ``kind`` is image | album | gallery."""


def _slug_id(segment: str) -> str | None:
    """``some-title-ID`` or ``ID`` -> ``ID`` (imgur's slug form puts the id last)."""
    candidate = segment.rsplit("-", 1)[-1]
    return candidate if _ID.match(candidate) else None


def parse_url(url: str) -> ImgurTarget | None:
    """Classify an imgur URL; None when it is not one nomad understands."""
    split = url_parts(url)
    if split is None:
        return None
    host, segments, _path = split
    if not host_matches(host, "imgur.com"):
        return None
    if not segments:
        return None
    if host in ("i.imgur.com", "i.stack.imgur.com") or host.startswith("i."):
        stem, dot, ext = segments[-1].partition(".")
        return ImgurTarget("image", stem, "." + ext.lower() if dot else "") if _ID.match(stem) else None
    head = segments[0].lower()
    if head in ("a", "gallery", "t") and len(segments) >= 2:
        ident = _slug_id(segments[-1].partition(".")[0])
        if not ident:
            return None
        return ImgurTarget("album" if head == "a" else "gallery", ident)
    if len(segments) == 1:
        stem, dot, ext = segments[0].partition(".")
        if _ID.match(stem):
            return ImgurTarget("image", stem, "." + ext.lower() if dot else "")
    return None


def _entry_ref(key: str, entry: Mapping[str, Any], link: Link) -> ImageRef:
    """One API v3 image object (album entry or single image) as an ImageRef."""
    url = str(entry.get("link") or "")
    mime = str(entry.get("type") or "")
    animated = bool(entry.get("animated")) or mime == "image/gif" or extension_of(url) in (".gif", ".gifv", ".mp4")
    meta = {**link.meta, "imgur_id": entry.get("id"), "page_url": f"https://imgur.com/{entry.get('id')}"}
    if entry.get("title"):
        meta["image_title"] = str(entry["title"])[:300]
    return ImageRef(
        key=key,
        url=url,
        width=int(entry["width"]) if isinstance(entry.get("width"), int) else None,
        height=int(entry["height"]) if isinstance(entry.get("height"), int) else None,
        animated=animated,
        media="video" if mime.startswith("video/") else "image",
        site="imgur",
        meta=meta,
    )


class ImgurClient:
    """imgur API v3 reader; without a client id only direct images are possible."""

    def __init__(self, http: HttpClient, *, api_url: str = DEFAULT_API, client_id: str | None = None) -> None:
        self.http = http
        self.api_url = api_url.rstrip("/")
        self.client_id = client_id

    def _api(self, path: str) -> Any:
        if not self.client_id:
            raise SourceError("imgur_no_client_id", "imgur albums need IMGUR_CLIENT_ID")
        headers = {"Authorization": "Client-ID " + self.client_id, "Accept": "application/json"}
        body = request_json(self.http, "GET", self.api_url + "/3/" + path.lstrip("/"), site="imgur", what="imgur API",
                            status_error=self._status_error, headers=headers)
        if not isinstance(body, Mapping) or not body.get("success", True) or "data" not in body:
            raise SourceError("imgur_bad_reply", "imgur API reply without data", transient=True)
        return body["data"]

    @staticmethod
    def _status_error(status: int) -> SourceError:
        if status in (404, 410):
            return SourceError("removed", f"imgur API: HTTP {status}")
        return SourceError("imgur_http", f"imgur API answered HTTP {status}", transient=status == 429 or status >= 500)

    def album_images(self, album_id: str) -> list[Mapping[str, Any]]:
        """``GET /3/album/{id}/images``: the album's image objects in album order."""
        data = self._api(f"album/{album_id}/images")
        if not isinstance(data, list):
            raise SourceError("imgur_bad_reply", "album images is not a list", transient=True)
        return [d for d in data if isinstance(d, Mapping)]

    def image(self, image_id: str) -> Mapping[str, Any]:
        """``GET /3/image/{id}``."""
        data = self._api(f"image/{image_id}")
        if not isinstance(data, Mapping):
            raise SourceError("imgur_bad_reply", "image is not an object", transient=True)
        return data

    def expand(self, link: Link, key_prefix: str, start: int = 0) -> list[ImageRef]:
        """Image refs behind ``link``; keys are ``key_prefix:start``, ``key_prefix:start+1``, …"""
        target = parse_url(link.url)
        if target is None:
            raise SourceError("unsupported_link", f"not an imgur image or album: {link.url}")
        meta = {**link.meta, "page_url": link.url}
        if target.kind == "image":
            if target.ext == ".gifv":
                # An HTML page around an mp4: never a photo.
                return [ImageRef(f"{key_prefix}:{start}", link.url, animated=True, site="imgur", meta=meta)]
            if target.ext and not self.client_id:
                return [ImageRef(f"{key_prefix}:{start}", link.url, link.width, link.height, link.animated or target.ext == ".gif", site="imgur", meta=meta)]
            if not self.client_id:
                # A page URL without API access: imgur serves the file under any image extension.
                # The page's port is kept (mirrors, the test emulator), as reddit's i.redd.it links do.
                try:
                    port = urlsplit(link.url).port
                except ValueError:
                    port = None
                direct = f"https://i.imgur.com{':' + str(port) if port else ''}/{target.id}.jpg"
                return [ImageRef(f"{key_prefix}:{start}", direct, link.width, link.height, site="imgur", meta=meta)]
            if target.ext in (".jpg", ".jpeg", ".png", ".webp") and link.width and link.height:
                # reddit's preview already told us the size: spare the API quota.
                return [ImageRef(f"{key_prefix}:{start}", link.url, link.width, link.height, site="imgur", meta=meta)]
            return [_entry_ref(f"{key_prefix}:{start}", self.image(target.id), Link(link.url, meta=meta))]
        if target.kind == "album":
            entries = self.album_images(target.id)
        else:
            # /gallery/ID names either an album or a single image.
            try:
                entries = self.album_images(target.id)
            except SourceError as exc:
                if exc.reason != "removed":
                    raise
                entries = [self.image(target.id)]
        if not entries:
            raise SourceError("empty_album", f"imgur album {target.id} has no images")
        return [_entry_ref(f"{key_prefix}:{start + i}", e, Link(link.url, meta={**meta, "album_id": target.id})) for i, e in enumerate(entries)]
