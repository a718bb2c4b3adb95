"""The emulator's HTTPS server: one ThreadingHTTPServer, routed by Host header and path.

Sites:

- reddit: ``GET www.reddit.com/r/<subs>/new.json`` (anonymous: the 403 block page unless
  ``scenario.reddit_anonymous_json``; see feeds.py, which also serves the Atom feeds and
  flickr's public feed) and
  ``GET oauth.reddit.com/r/<subs>/new[.json]`` (``Authorization: bearer``), listing
  with ``limit`` (<= 100), ``after`` pagination, HTML-escaped strings unless
  ``raw_json=1``, ``X-Ratelimit-Used/Remaining/Reset`` per client and 429 when the
  budget is spent; ``POST www.reddit.com/api/v1/access_token`` (basic auth,
  ``grant_type=client_credentials``).
- imgur API v3 (``Authorization: Client-ID``): ``/3/album/{id}``, ``/3/album/{id}/images``,
  ``/3/gallery/album/{id}``, ``/3/image/{id}``, ``/3/gallery/image/{id}``.
- flickr REST ``/services/rest/?method=flickr.photos.getSizes|flickr.photos.getInfo``
  with ``api_key``, ``format=json&nojsoncallback=1``.
- Bluesky (jetstream.py): the Jetstream websocket ``wss://jetstream2.us-east.bsky.network/subscribe``
  and the AppView's ``app.bsky.actor.getProfiles``; images are ``cdn.bsky.app`` files.
- everything else: :class:`~stack.emulator.scenario.Resource` files from the scenario.
"""
from __future__ import annotations

import base64
import html
import json
import secrets
import socket
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from . import commons, feeds, images, jetstream
from .scenario import Resource

if TYPE_CHECKING:
    from . import Emulator


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator saw (tests count fetches and measure rate-limit obedience)."""

    time: float
    method: str
    host: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0


@dataclass
class RateBucket:
    """A fixed window of ``limit`` requests per ``window`` seconds, like reddit's."""

    limit: int
    window: float
    start: float = field(default_factory=time.monotonic)
    used: int = 0

    def take(self) -> tuple[bool, dict[str, str]]:
        now = time.monotonic()
        if now - self.start >= self.window:
            self.start, self.used = now, 0
        ok = self.used < self.limit
        if ok:
            self.used += 1
        reset = max(0, int(self.window - (now - self.start) + 0.999))
        return ok, {
            "X-Ratelimit-Used": str(self.used),
            "X-Ratelimit-Remaining": f"{float(self.limit - self.used):.1f}",
            "X-Ratelimit-Reset": str(reset),
        }


def _escape(obj: Any) -> Any:
    """reddit's default: every string HTML-escaped (``&`` -> ``&amp;``) unless raw_json=1."""
    if isinstance(obj, str):
        return html.escape(obj, quote=False)
    if isinstance(obj, list):
        return [_escape(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _escape(v) for k, v in obj.items()}
    return obj


class EmulatorHTTPServer(ThreadingHTTPServer):
    """TLS handshakes happen in the handler threads, so one slow client cannot stall accept()."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, emulator: "Emulator", port: int = 0) -> None:
        self.emulator = emulator
        super().__init__(("127.0.0.1", port), Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:  # type: ignore[override]
        # Counted from accept to close, so Emulator.wait_idle() knows when every request a
        # client sent (even one it gave up on) has been recorded.
        self.emulator._connection(+1)
        try:
            try:
                request.settimeout(10)
                tls = self.emulator.tls.context.wrap_socket(request, server_side=True)
            except (OSError, ValueError):
                request.close()
                return
            try:
                Handler(tls, client_address, self)
            finally:
                try:
                    tls.close()
                except OSError:
                    pass
        finally:
            self.emulator._connection(-1)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body (nomad's byte cap, deadline) are expected here.
        pass


class Handler(BaseHTTPRequestHandler):
    """Routes one request; see the module docstring for the endpoints."""

    protocol_version = "HTTP/1.1"
    server: EmulatorHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ------------------------------------------------------------------------

    @property
    def emu(self) -> "Emulator":
        return self.server.emulator

    def _dispatch(self) -> None:
        parts = urlsplit(self.path)
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower() if not (self.headers.get("Host") or "").startswith("[") else ""
        self.host, self.route, self.query = host, parts.path, parse_qs(parts.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(min(length, 1 << 20)) if length else b""
        self.status = 0
        self._recorded = False
        try:
            injected = self.emu._injected(host, parts.path)
            if injected:
                self._json({"error": injected, "message": "injected failure"}, injected, {"Retry-After": "1"} if injected == 429 else None)
            else:
                self._route()
        finally:
            self._record(self.status)

    def _record(self, status: int) -> None:
        """Log the request once, *before* the response goes out: a client that has its
        answer must find its request in ``emulator.requests``."""
        if self._recorded:
            return
        self._recorded = True
        self.emu._record(RequestRecord(time.time(), self.command, self.host, urlsplit(self.path).path, self.query,
                                       {k: v for k, v in self.headers.items()}, status))

    do_GET = _dispatch
    do_POST = _dispatch
    do_HEAD = _dispatch

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=UTF-8", headers)

    def _q(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    # -- routing -------------------------------------------------------------------------

    def _route(self) -> None:
        host, path = self.host, self.route
        if feeds.route(self):  # reddit Atom feeds, reddit's JSON block page, flickr's public feed
            return
        if host in ("www.reddit.com", "reddit.com", "oauth.reddit.com"):
            if path == "/api/v1/access_token" and host != "oauth.reddit.com":
                return self._reddit_token()
            if path.startswith("/r/"):
                return self._reddit_listing()
        if host == jetstream.JETSTREAM_HOST and path == "/subscribe":
            return jetstream.serve(self)
        if host == jetstream.APPVIEW_HOST:
            return jetstream.appview(self)
        if host == "api.imgur.com" and path.startswith("/3/"):
            return self._imgur_api()
        if host == commons.API_HOST and path == "/w/api.php":
            return commons.api(self)
        if host == "api.flickr.com" and path.rstrip("/") == "/services/rest":
            return self._flickr_api()
        if host == "www.flickr.com" and path.startswith("/photos/"):
            return self._send(200, b"<!DOCTYPE html><html><body>flickr photo page</body></html>", "text/html; charset=utf-8")
        res = self.emu.scenario.files.get((host, path))
        if res is None:
            return self._send(404, b"<html><body>404 Not Found</body></html>", "text/html")
        return self._serve(res)

    # -- reddit --------------------------------------------------------------------------

    def _reddit_token(self) -> None:
        scn = self.emu.scenario
        auth = self.headers.get("Authorization", "")
        form = parse_qs(self.body.decode("utf-8", "replace"))
        try:
            cid, secret = base64.b64decode(auth.split(" ", 1)[1]).decode().split(":", 1)
        except (IndexError, ValueError):
            cid, secret = "", None
        if self.command != "POST" or scn.reddit_clients.get(cid) != secret:
            return self._json({"message": "Unauthorized", "error": 401}, 401)
        if form.get("grant_type") != ["client_credentials"]:
            return self._json({"error": "unsupported_grant_type"}, 400)
        token = secrets.token_urlsafe(16)
        self.emu._tokens[token] = (cid, time.monotonic() + scn.token_ttl)
        self._json({"access_token": token, "token_type": "bearer", "expires_in": scn.token_ttl, "scope": "*"})

    def _reddit_listing(self) -> None:
        scn = self.emu.scenario
        if self.host == "oauth.reddit.com":
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            entry = self.emu._tokens.get(token)
            if entry is None or entry[1] < time.monotonic():
                return self._json({"message": "Unauthorized", "error": 401}, 401,
                                  {"WWW-Authenticate": 'Bearer realm="reddit", error="invalid_token"'})
            client = f"oauth:{entry[0]}"
        else:
            client = "anonymous"
        ok, headers = self.emu._bucket(client).take()
        if not ok:
            return self._json({"message": "Too Many Requests", "error": 429}, 429, headers)
        segs = self.route.strip("/").split("/")
        sort = segs[2].split(".")[0] if len(segs) >= 3 else ""
        if sort not in ("new", "top"):
            return self._json({"message": "Not Found", "error": 404}, 404, headers)
        subs = {x.lower() for x in segs[1].split("+")}
        posts = [p for p in scn.posts if "all" in subs or p.get("subreddit", "").lower() in subs][: scn.listing_cap]
        if sort == "top":  # the `t` window is ignored: every emulated post is "of all time"
            posts = sorted(posts, key=lambda p: -int(p.get("score", 0) or 0))
        try:
            limit = max(1, min(100, int(self._q("limit", "25") or 25)))
        except ValueError:
            limit = 25
        start = 0
        after = self._q("after")
        if after:
            names = [p["name"] for p in posts]
            # reddit answers an unknown `after` with an empty listing.
            start = names.index(after) + 1 if after in names else len(posts)
        page = posts[start : start + limit]
        more = start + limit < len(posts)
        listing = {"kind": "Listing", "data": {
            "after": page[-1]["name"] if page and more else None, "before": None, "dist": len(page),
            "modhash": "", "geo_filter": "", "children": [{"kind": "t3", "data": p} for p in page]}}
        if self._q("raw_json") != "1":
            listing = _escape(listing)
        self._json(listing, 200, headers)

    # -- imgur ---------------------------------------------------------------------------

    def _imgur_api(self) -> None:
        scn = self.emu.scenario
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Client-ID ") or auth[10:].strip() not in scn.imgur_client_ids:
            return self._json({"data": {"error": "Authentication required", "request": self.route, "method": self.command},
                               "success": False, "status": 401}, 401)
        segs = self.route.strip("/").split("/")[1:]
        if segs and segs[0] == "gallery":
            segs = segs[1:]
        if len(segs) >= 2 and segs[0] == "album" and segs[1] in scn.imgur_albums:
            imgs = [self._imgur_obj(i) for i in scn.imgur_albums[segs[1]]]
            if segs[2:] == ["images"]:
                return self._json({"data": imgs, "success": True, "status": 200})
            if len(segs) == 2:
                return self._json({"data": {"id": segs[1], "title": None, "is_album": True, "images_count": len(imgs),
                                            "link": scn.url("imgur.com", f"a/{segs[1]}"), "images": imgs},
                                   "success": True, "status": 200})
        if len(segs) == 2 and segs[0] == "image" and segs[1] in scn.imgur_images:
            return self._json({"data": self._imgur_obj(segs[1]), "success": True, "status": 200})
        self._json({"data": {"error": "Unable to find an album with the id", "request": self.route, "method": self.command},
                    "success": False, "status": 404}, 404)

    def _imgur_obj(self, image_id: str) -> dict[str, Any]:
        img = self.emu.scenario.imgur_images[image_id]
        obj: dict[str, Any] = {"id": img.id, "title": img.title, "description": None, "datetime": 1717171000,
                               "type": img.type, "animated": img.animated, "width": img.width, "height": img.height,
                               "size": img.width * img.height // 3, "views": 1,
                               "link": self.emu.scenario.url("i.imgur.com", f"{img.id}.{img.ext}")}
        if img.animated:
            obj["mp4"] = self.emu.scenario.url("i.imgur.com", f"{img.id}.mp4")
            obj["gifv"] = self.emu.scenario.url("i.imgur.com", f"{img.id}.gifv")
        return obj

    # -- flickr --------------------------------------------------------------------------

    def _flickr_api(self) -> None:
        scn = self.emu.scenario
        if self._q("api_key") not in scn.flickr_api_keys:
            return self._json({"stat": "fail", "code": 100, "message": "Invalid API Key (Key not found)"})
        method, photo = self._q("method"), scn.flickr_photos.get(self._q("photo_id"))
        if method not in ("flickr.photos.getSizes", "flickr.photos.getInfo"):
            return self._json({"stat": "fail", "code": 112, "message": f'Method "{method}" not found'})
        if photo is None:
            return self._json({"stat": "fail", "code": 1, "message": "Photo not found"})
        page = scn.url("www.flickr.com", f"photos/{photo.owner}/{photo.id}/")
        if method == "flickr.photos.getSizes":
            sizes = [{"label": label, "width": w, "height": h, "source": scn.flickr_static_url(photo, suffix),
                      "url": f"{page}sizes/{suffix or 'm'}/", "media": "photo"}
                     for suffix, label, w, h in scn.flickr_sizes(photo)]
            return self._json({"sizes": {"canblog": 0, "canprint": 0, "candownload": 1, "size": sizes}, "stat": "ok"})
        self._json({"photo": {"id": photo.id, "secret": photo.secret, "server": photo.server, "license": photo.license,
                              "owner": {"nsid": f"{zlib.crc32(photo.owner.encode()) % 10**8}@N00", "username": photo.owner},
                              "title": {"_content": photo.title}, "media": "photo",
                              "urls": {"url": [{"type": "photopage", "_content": page}]}}, "stat": "ok"})

    # -- files ---------------------------------------------------------------------------

    def _serve(self, res: Resource) -> None:
        kind = res.kind
        if res.delay > 0:
            self.emu._stopping.wait(res.delay)
        if kind == "image":
            return self._send(200, self.emu.image_bytes(res), f"image/{res.fmt}")
        if kind == "bytes":
            return self._send(res.status, res.body, res.content_type)
        if kind == "html":
            return self._send(200, res.body or images.HTML_PAGE, "text/html; charset=utf-8")
        if kind == "truncated":
            return self._send(200, images.truncated_jpeg(res.width or 1600, res.height or 1200), "image/jpeg")
        if kind == "bomb":
            return self._send(200, images.pixel_bomb(res.width or 100_000, res.height or 100_000), "image/png")
        if kind == "redirect":
            return self._send(res.status if res.status in (301, 302, 303, 307, 308) else 302, b"", "text/plain",
                              {"Location": res.location})
        if kind == "slow":
            return self._slow(res)
        self._send(500, f"unknown resource kind {kind}".encode(), "text/plain")

    def _slow(self, res: Resource) -> None:
        """An endless body: JPEG magic, then a byte every ``interval`` s (stops when the client leaves)."""
        self.status = 200
        self._record(200)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")  # no length: the body ends only when we stop
        self.end_headers()
        self.close_connection = True
        payload = images.picture(64, 64, "jpeg", 1)
        stop = self.emu._stopping
        for i in range(int(600 / max(res.interval, 0.01))):  # bounded: at most ~10 minutes
            if stop.is_set():
                return
            try:
                self.wfile.write(payload[i % len(payload) : i % len(payload) + 1])
                self.wfile.flush()
            except OSError:
                return
            stop.wait(res.interval)


def free_port() -> int:
    """A currently free loopback port (for callers that need one before starting)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
