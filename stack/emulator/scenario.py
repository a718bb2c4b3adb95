"""What the fake internet contains: reddit posts, imgur/flickr objects, files, and expected outcomes.

A :class:`Scenario` is plain data. The emulator serves it; tests read
``scenario.expected`` to check what nomad decided for each post.

Outcome labels (``Scenario.expected``), keyed by reddit post id, or by
``"<post id>/<n>"`` for the n-th item (0-based, source order) of a post with
several images (gallery, imgur album):

=========================  ==========================================================
``accept_candidate``       downloaded, decoded, passes the rules: sent to anti_sus
``skip_small``             below the minimum resolution (1280x1024, orientation-aware)
``skip_aspect``            aspect ratio beyond W/H <= 3 or H/W <= 2
``skip_nsfw``              ``over_18``
``skip_spoiler``           ``spoiler``
``skip_video``             ``is_video``
``skip_removed``           ``removed_by_category`` set (removed post)
``skip_not_image``         link to something that is not an image (youtube, …)
``skip_animated``          AnimatedImage gallery entry, animated imgur entry, ``.gifv``
``skip_failed``            gallery entry whose ``media_metadata`` status is not valid
``skip_no_media``          gallery whose ``gallery_data``/``media_metadata`` is null
``fail_<reason>``          a FetchError/ImageError with that reason: ``fail_removed``
                           (imgur removed.png redirect), ``fail_not_found`` (flickr
                           "Photo not found"), ``fail_not_image`` (HTML as .jpg),
                           ``fail_truncated``, ``fail_bomb``, ``fail_timeout`` (endless
                           slow body; needs a short ``--deadline``),
                           ``fail_blocked_address`` (redirect to a private address)
=========================  ==========================================================
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

from .jetstream import HOSTS as BLUESKY_HOSTS, JetstreamFeed, add_bluesky

# Hosts the emulator's certificate covers and nomad_args() pins to 127.0.0.1.
REAL_HOSTS = [
    "www.reddit.com", "reddit.com", "oauth.reddit.com", "i.redd.it", "preview.redd.it",
    "external-preview.redd.it", "v.redd.it",
    "imgur.com", "i.imgur.com", "api.imgur.com",
    "flickr.com", "www.flickr.com", "flic.kr", "api.flickr.com", "live.staticflickr.com",
    "farm1.staticflickr.com", "farm2.staticflickr.com", "farm3.staticflickr.com",
    "farm4.staticflickr.com", "farm5.staticflickr.com", "farm6.staticflickr.com",
    "farm7.staticflickr.com", "farm8.staticflickr.com", "farm9.staticflickr.com",
    "www.youtube.com", *BLUESKY_HOSTS,
    "commons.wikimedia.org", "upload.wikimedia.org",
]
OTHER_HOSTS = ["cdn.photohost.example"]
"""An ordinary third-party image host (direct links by extension)."""
HOSTILE_HOSTS = ["hostile.example", "rebind.hostile.example"]
"""Hosts serving hostile content (HTML as .jpg, truncated, bomb, slow body, private redirect)."""
HOSTS = REAL_HOSTS + OTHER_HOSTS + HOSTILE_HOSTS
WILDCARDS = ["*.staticflickr.com"]

FLICKR_ALPHABET = "123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"


def base58(n: int) -> str:
    """flic.kr short-link encoding of a numeric photo id."""
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = FLICKR_ALPHABET[r] + out
    return out or FLICKR_ALPHABET[0]


@dataclass
class Resource:
    """One thing a (host, path) serves.

    kind: ``image`` (generated from width/height/fmt/seed/orientation), ``bytes``
    (``body`` with ``content_type``), ``truncated``, ``bomb``, ``html``, ``slow``
    (endless body, one small piece every ``interval`` seconds), ``redirect``
    (``location`` with ``status``). ``delay``: seconds to wait before answering
    (a distant or busy server).
    """

    kind: str
    width: int = 0
    height: int = 0
    fmt: str = "jpeg"
    seed: int = 0
    orientation: int = 1
    body: bytes = b""
    content_type: str = "application/octet-stream"
    location: str = ""
    status: int = 200
    interval: float = 0.2
    delay: float = 0.0


@dataclass
class ImgurImage:
    """An imgur image as API v3 describes it."""

    id: str
    width: int
    height: int
    type: str = "image/jpeg"
    animated: bool = False
    title: str | None = None

    @property
    def ext(self) -> str:
        return {"image/jpeg": "jpg", "image/png": "png", "image/gif": "gif", "image/webp": "webp"}[self.type]


@dataclass
class FlickrPhoto:
    """A flickr photo: owner, size of the original, licence id."""

    id: str
    owner: str
    width: int
    height: int
    secret: str = "a1b2c3d4e5"
    server: str = "65535"
    license: str = "4"
    title: str = "a photo"


class Scenario:
    """The emulated internet. Build with :func:`default_scenario` or piece by piece.

    ``port`` is the emulator's port, known once it has bound its socket; every
    URL a scenario emits carries it (``https://i.redd.it:PORT/abc.jpg``).
    """

    def __init__(self, port: int = 443) -> None:
        self.port = port
        self.posts: list[dict[str, Any]] = []
        self.expected: dict[str, str] = {}
        self.files: dict[tuple[str, str], Resource] = {}
        self.imgur_images: dict[str, ImgurImage] = {}
        self.imgur_albums: dict[str, list[str]] = {}
        self.flickr_photos: dict[str, FlickrPhoto] = {}
        # Key-less formats (stack/emulator/feeds.py): flickr's public feed (photo, tags), newest first, and
        # its outcome labels keyed by post id (flickr_<id>); reddit's anonymous JSON answers the block page
        # unless reddit_anonymous_json; reddit_feed_interval > 0 throttles the Atom feeds like reddit (429).
        self.flickr_feed: list[tuple[FlickrPhoto, str]] = []
        self.flickr_feed_expected: dict[str, str] = {}
        self.reddit_anonymous_json = False
        self.reddit_feed_interval = 0.0
        self.jetstream = JetstreamFeed()  # Bluesky's Jetstream frames (stack/emulator/jetstream.py)
        self.commons: Any = None  # a stack.emulator.commons.CommonsSite, set by add_commons()
        self.listing_cap = 1000
        # Credentials the emulated APIs accept.
        self.reddit_clients: dict[str, str] = {"emu-client-id": "emu-client-secret"}
        self.imgur_client_ids: set[str] = {"emu-imgur-client"}
        self.flickr_api_keys: set[str] = {"emu-flickr-key"}
        self.token_ttl = 3600
        # (host, path) -> statuses to answer before serving normally (e.g. [503, 429]).
        self.inject: dict[tuple[str, str], list[int]] = {}
        self._clock = 1_717_171_717.0
        # imgur's placeholder for deleted images (a small PNG; nomad must never store it).
        self.files[("i.imgur.com", "/removed.png")] = Resource("image", 161, 81, "png", 404)

    # -- URLs ------------------------------------------------------------------------------

    def url(self, host: str, path: str) -> str:
        """``https://host:PORT/path``."""
        return f"https://{host}:{self.port}/{path.lstrip('/')}"

    # -- content ---------------------------------------------------------------------------

    def add_file(self, host: str, path: str, resource: Resource) -> str:
        """Serve ``resource`` at ``https://host:PORT/path``; returns that URL."""
        self.files[(host, "/" + path.lstrip("/"))] = resource
        return self.url(host, path)

    def add_image(
        self, host: str, path: str, width: int, height: int, fmt: str = "jpeg", seed: int | None = None,
        orientation: int = 1, delay: float = 0.0,
    ) -> str:
        """Serve a generated image (deterministic from size, format and seed); returns its URL."""
        seed = zlib.crc32(f"{host}{path}".encode()) & 0xFFFF if seed is None else seed
        return self.add_file(host, path, Resource("image", width, height, fmt, seed, orientation, delay=delay))

    def add_imgur_image(self, img: ImgurImage, *, removed: bool = False) -> str:
        """Register an imgur image (API + i.imgur.com file, or a removed.png redirect)."""
        self.imgur_images[img.id] = img
        path = f"/{img.id}.{img.ext}"
        if removed:
            self.add_file("i.imgur.com", path, Resource("redirect", location=self.url("i.imgur.com", "removed.png"), status=302))
        elif img.animated:
            self.add_file("i.imgur.com", f"/{img.id}.gifv", Resource("html"))
            self.add_file("i.imgur.com", path, Resource("image", img.width, img.height, "gif", zlib.crc32(img.id.encode()) & 0xFFFF))
        else:
            fmt = {"jpg": "jpeg"}.get(img.ext, img.ext)
            self.add_image("i.imgur.com", path, img.width, img.height, fmt)
        return self.url("i.imgur.com", path)

    def add_flickr_photo(self, photo: FlickrPhoto) -> str:
        """Register a flickr photo: getSizes/getInfo answers and its static files; returns the page URL."""
        self.flickr_photos[photo.id] = photo
        for suffix, _label, w, h in self.flickr_sizes(photo):
            self.add_image("live.staticflickr.com", self._flickr_path(photo, suffix), w, h, "jpeg", int(photo.id) & 0xFFFF)
        return self.url("www.flickr.com", f"photos/{photo.owner}/{photo.id}/")

    @staticmethod
    def _flickr_path(photo: FlickrPhoto, suffix: str) -> str:
        secret = photo.secret if suffix != "o" else photo.secret[::-1]
        return f"/{photo.server}/{photo.id}_{secret}{'_' + suffix if suffix else ''}.jpg"

    @staticmethod
    def flickr_sizes(photo: FlickrPhoto) -> list[tuple[str, str, int, int]]:
        """(suffix, label, width, height), smallest to largest, like getSizes."""
        sizes = [("s", "Square", 75, 75)]
        long_side = max(photo.width, photo.height)
        for suffix, label, edge in (("", "Medium", 500), ("b", "Large", 1024)):
            if edge < long_side:
                f = edge / long_side
                sizes.append((suffix, label, round(photo.width * f), round(photo.height * f)))
        sizes.append(("o", "Original", photo.width, photo.height))
        return sizes

    def flickr_static_url(self, photo: FlickrPhoto, suffix: str) -> str:
        return self.url("live.staticflickr.com", self._flickr_path(photo, suffix))

    # -- reddit posts ----------------------------------------------------------------------

    def add_post(self, post_id: str, url: str, *, expected: str | None = None, preview: tuple[int, int] | None = None, **fields: Any) -> dict[str, Any]:
        """Append a t3 ``data`` dict shaped like reddit's (newest first: later posts are older)."""
        self._clock -= 5
        sub = fields.pop("subreddit", "pics")
        data: dict[str, Any] = {
            "id": post_id, "name": f"t3_{post_id}", "subreddit": sub, "title": f"post {post_id}",
            "author": "emulated", "created_utc": self._clock, "score": 1, "over_18": False,
            "spoiler": False, "is_video": False, "removed_by_category": None,
            "domain": url.split("/")[2].split(":")[0] if "://" in url else f"self.{sub}",
            "post_hint": "image", "url": url, "url_overridden_by_dest": url,
            "permalink": f"/r/{sub}/comments/{post_id}/post_{post_id}/",
        }
        if preview is not None:
            w, h = preview
            data["preview"] = {"enabled": True, "images": [{
                "id": f"pv{post_id}",
                "source": {"url": self.url("preview.redd.it", f"{post_id}.jpeg?auto=webp&s=1f2e{post_id}"), "width": w, "height": h},
                "resolutions": [{"url": self.url("preview.redd.it", f"{post_id}.jpeg?width=108&crop=smart&auto=webp&s=aa11"), "width": 108, "height": max(1, round(108 * h / w))}],
                "variants": {},
            }]}
        data.update(fields)
        self.posts.append(data)
        if expected is not None:
            self.expected[post_id] = expected
        return data

    def add_gallery(self, post_id: str, items: list[dict[str, Any]], *, null_metadata: bool = False, **fields: Any) -> dict[str, Any]:
        """A reddit gallery. Each item: media_id, width, height, fmt, status, e, expected.

        ``media_metadata`` is written in a different order from ``gallery_data.items``
        (it is an unordered map on reddit too).
        """
        url = self.url("www.reddit.com", f"gallery/{post_id}")
        meta: dict[str, Any] = {}
        for n, it in enumerate(items):
            mid, fmt = it["media_id"], it.get("fmt", "jpeg")
            ext = {"jpeg": "jpg", "png": "png", "gif": "gif"}[fmt]
            mime = {"jpeg": "image/jpg", "png": "image/png", "gif": "image/gif"}[fmt]
            e = it.get("e", "Image")
            entry: dict[str, Any] = {"status": it.get("status", "valid"), "e": e, "m": mime, "id": mid}
            if entry["status"] == "valid":
                w, h = it["width"], it["height"]
                entry["p"] = [{"y": round(108 * h / w), "x": 108, "u": self.url("preview.redd.it", f"{mid}.{ext}?width=108&crop=smart&auto=webp&s=cc33")}]
                if e == "AnimatedImage":
                    entry["s"] = {"y": h, "x": w, "gif": self.url("i.redd.it", f"{mid}.gif"), "mp4": self.url("preview.redd.it", f"{mid}.gif?format=mp4&s=ee")}
                    self.add_image("i.redd.it", f"{mid}.gif", w, h, "gif")
                else:
                    entry["s"] = {"y": h, "x": w, "u": self.url("preview.redd.it", f"{mid}.{ext}?width={w}&format=pjpg&auto=webp&s=dd44")}
                    self.add_image("i.redd.it", f"{mid}.{ext}", w, h, fmt)
            meta[mid] = entry
            if "expected" in it:
                self.expected[f"{post_id}/{n}"] = it["expected"]
        fields.setdefault("post_hint", None)
        data = self.add_post(
            post_id, url, is_gallery=True,
            gallery_data=None if null_metadata else {"items": [{"media_id": it["media_id"], "id": 456789000 + n} for n, it in enumerate(items)]},
            media_metadata=None if null_metadata else dict(reversed(list(meta.items()))),
            **fields,
        )
        data["domain"] = "reddit.com"
        return data


def default_scenario(port: int) -> Scenario:
    """A rich scenario: every parser path, every rule, every hostile case (see module docs)."""
    s = Scenario(port)
    big = (1600, 1200)

    # reddit-hosted
    s.add_post("aa0001", s.add_image("i.redd.it", "bigdirect1.jpeg", *big), expected="accept_candidate", preview=big, subreddit="EarthPorn")
    s.add_post("aa0002", s.add_image("i.redd.it", "smallpic2.jpeg", 1000, 800), expected="skip_small", preview=(1000, 800))
    s.add_post("aa0003", s.add_image("i.redd.it", "panorama3.jpeg", 4000, 1000), expected="skip_aspect", preview=(4000, 1000))
    s.add_post("aa0004", s.add_image("i.redd.it", "portrait4.png", 1200, 1600, "png"), expected="accept_candidate", preview=(1200, 1600))
    # Preview claims a big image, the file is small: the decoded size is re-checked.
    s.add_post("aa0005", s.add_image("i.redd.it", "liar5.jpeg", 900, 700), expected="skip_small", preview=big)
    s.add_post("aa0006", s.add_image("i.redd.it", "rotated6.jpeg", 1600, 1200, orientation=6), expected="accept_candidate", preview=(1200, 1600))
    s.add_gallery("aa0007", [
        {"media_id": "gal7one", "width": 1600, "height": 1200, "expected": "accept_candidate"},
        {"media_id": "gal7two", "width": 1600, "height": 1200, "status": "failed", "expected": "skip_failed"},
        {"media_id": "gal7anim", "width": 1600, "height": 1200, "fmt": "gif", "e": "AnimatedImage", "expected": "skip_animated"},
        {"media_id": "gal7three", "width": 1280, "height": 1024, "fmt": "png", "expected": "accept_candidate"},
        {"media_id": "gal7tiny", "width": 640, "height": 480, "expected": "skip_small"},
    ], subreddit="EarthPorn")
    s.add_gallery("aa0008", [{"media_id": "gal8gone", "width": 1600, "height": 1200}], null_metadata=True)
    s.expected["aa0008"] = "skip_no_media"
    parent = s.add_post("aa0009", s.add_image("i.redd.it", "xpostparent9.jpeg", *big), preview=big, subreddit="pics", expected="accept_candidate")
    s.posts.remove(parent)  # the parent lives only inside the crosspost
    s.add_post("aa0010", s.url("www.reddit.com", parent["permalink"]), expected="accept_candidate",
               crosspost_parent="t3_aa0009", crosspost_parent_list=[parent], post_hint="link", domain="self.pics")
    s.expected.pop("aa0009")

    # imgur
    s.add_post("bb0001", s.add_imgur_image(ImgurImage("Ab1Cd2E", *big)), expected="accept_candidate", preview=big)
    s.add_imgur_image(ImgurImage("Pg2Hi3J", *big))
    s.add_file("imgur.com", "/Pg2Hi3J", Resource("html", body=f'<meta property="og:image" content="{s.url("i.imgur.com", "Pg2Hi3J.jpg")}">'.encode()))
    s.add_post("bb0002", s.url("imgur.com", "Pg2Hi3J"), expected="accept_candidate", post_hint="link")
    # 1600x1000: short side under 1024, so the second album entry is too small.
    album = [ImgurImage("Kq3Lm9a", *big), ImgurImage("Zr8Tn2b", 1600, 1000, "image/png", title="second"),
             ImgurImage("Gf5Yh7c", 480, 270, "image/gif", animated=True)]
    for img in album:
        s.add_imgur_image(img)
    s.imgur_albums["Xy7Pq2Z"] = [i.id for i in album]
    s.add_post("bb0003", s.url("imgur.com", "a/Xy7Pq2Z"), post_hint="link")
    s.expected.update({"bb0003/0": "accept_candidate", "bb0003/1": "skip_small", "bb0003/2": "skip_animated"})
    s.add_imgur_image(ImgurImage("Gl4Ry5K", *big))
    s.imgur_albums["Ga1Le2R"] = ["Gl4Ry5K"]
    s.add_post("bb0004", s.url("imgur.com", "gallery/Ga1Le2R"), post_hint="link")
    s.expected["bb0004/0"] = "accept_candidate"
    s.add_post("bb0005", s.add_imgur_image(ImgurImage("Rm0Vd9X", *big), removed=True), expected="fail_removed", preview=big)
    s.add_imgur_image(ImgurImage("Gv6If7Y", 640, 360, "image/gif", animated=True))
    s.add_post("bb0006", s.url("i.imgur.com", "Gv6If7Y.gifv"), expected="skip_animated", post_hint="link")

    # flickr
    photo = FlickrPhoto("53712345678", "dave_photos", 1600, 1067)
    s.add_post("cc0001", s.add_flickr_photo(photo), expected="accept_candidate", post_hint="link", domain="flickr.com")
    short = FlickrPhoto("53700000001", "shortlinker", 1600, 1200, secret="f0e1d2c3b4", license="2")
    s.add_flickr_photo(short)
    s.add_file("flic.kr", f"/p/{base58(int(short.id))}", Resource("redirect", location=s.url("www.flickr.com", f"photos/{short.owner}/{short.id}/"), status=301))
    s.add_post("cc0002", s.url("flic.kr", f"p/{base58(int(short.id))}"), expected="accept_candidate", post_hint="link")
    direct = FlickrPhoto("53700000002", "directlinker", 1600, 1200, secret="9a8b7c6d5e")
    s.add_flickr_photo(direct)
    s.add_post("cc0003", s.flickr_static_url(direct, "o"), expected="accept_candidate", preview=big)
    s.add_post("cc0004", s.url("www.flickr.com", "photos/ghost/53799999999/"), expected="fail_not_found", post_hint="link")

    # post-level rules
    s.add_post("dd0001", s.add_image("i.redd.it", "nsfw1.jpeg", *big), expected="skip_nsfw", preview=big, over_18=True)
    s.add_post("dd0002", s.add_image("i.redd.it", "spoiler2.jpeg", *big), expected="skip_spoiler", preview=big, spoiler=True)
    s.add_post("dd0003", s.url("v.redd.it", "q1w2e3r4t5"), expected="skip_video", is_video=True, post_hint="hosted:video",
               media={"reddit_video": {"fallback_url": s.url("v.redd.it", "q1w2e3r4t5/DASH_720.mp4"), "width": 1280, "height": 720}})
    s.add_post("dd0004", s.add_image("i.redd.it", "removed4.jpeg", *big), expected="skip_removed", preview=big, removed_by_category="moderator")
    s.add_post("dd0005", s.url("www.youtube.com", "watch?v=dQw4w9WgXcQ&t=1"), expected="skip_not_image", post_hint="rich:video")
    s.add_post("dd0006", s.add_image("cdn.photohost.example", "photos/2024/lake.jpg", *big), expected="accept_candidate", post_hint="link")
    s.add_post("dd0007", s.add_image("cdn.photohost.example", "photos/2024/modern.webp", *big, fmt="webp"), expected="accept_candidate", post_hint="link")

    # hostile
    s.add_post("ee0001", s.add_file("hostile.example", "html.jpg", Resource("html")), expected="fail_not_image", preview=big)
    s.add_post("ee0002", s.add_file("hostile.example", "cut.jpg", Resource("truncated", 1600, 1200)), expected="fail_truncated", preview=big)
    s.add_post("ee0003", s.add_file("hostile.example", "bomb.png", Resource("bomb", 100_000, 100_000)), expected="fail_bomb", preview=big)
    s.add_post("ee0004", s.add_file("hostile.example", "slow.jpg", Resource("slow", interval=0.2)), expected="fail_timeout", preview=big)
    s.add_post("ee0005", s.add_file("hostile.example", "metadata.jpg", Resource("redirect", location="http://169.254.169.254/latest/meta-data/", status=302)), expected="fail_blocked_address", preview=big)
    s.add_post("ee0006", s.add_file("hostile.example", "intranet.jpg", Resource("redirect", location="http://10.0.0.1/admin.jpg", status=301)), expected="fail_blocked_address", preview=big)
    add_bluesky(s)
    from .feeds import add_default_feed  # here: feeds.py imports this module

    add_default_feed(s)
    from .commons import add_commons  # here: commons.py imports this module

    add_commons(s)
    return s


ScenarioFactory = Callable[[int], Scenario]
